"""Distillation (recipe.md §4.6, §10.3): a frozen trained model with its heads provides the targets.

The recipe stays the SSL one (DINO local and global, iBOT at the sampled positions, KoLeo; no Gram):
only the source of the logits changes. The frozen teacher lives outside the students' recipes — it is
neither trained, averaged nor checkpointed — so several students can share its forward pass.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from opendino.recipes.ssl import SSLModel, build_student
from opendino.train.checkpoint import load_latest
from opendino.train.config import load_train_config


def load_distillation_teacher(run: str | Path, *students: SSLModel) -> SSLModel:
    """The EMA teacher (backbone and both heads) of an OpenDINO run's newest checkpoint, frozen. Its heads
    must have the students' prototype counts (the targets are distributions over the same prototypes)."""
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(
            f"distill.teacher={run}: not an `opendino train` run folder (no config.yaml). A backbone without "
            "heads needs its heads fitted first: `opendino train ... init.backbone=FILE init.head_warmup_steps=N`"
        )
    previous = load_latest(run / "checkpoints")
    if previous is None:
        raise FileNotFoundError(f"distill.teacher={run}: no readable checkpoint in its checkpoints/")
    _, state = previous
    teacher = build_student(load_train_config(run / "config.yaml"))
    weights = {k[len("teacher.") :]: v for k, v in state["model"].items() if k.startswith("teacher.")}
    teacher.load_state_dict(weights)
    for student in students:
        for head in ("dino_head", "ibot_head"):
            ours, theirs = (getattr(m, head).last_layer.out_features for m in (student, teacher))
            if ours != theirs:
                raise ValueError(
                    f"{head}: the student has {ours} prototypes, the teacher {theirs}; set {head}.prototypes={theirs}"
                )
    return teacher.requires_grad_(False).eval()


@torch.no_grad()
def distillation_teacher_logits(
    teacher: nn.Module, batch: dict, resolution_scale: float = 1.0
) -> tuple[Tensor, Tensor]:
    """The teacher's DINO logits of the global crops ``[2B, K]`` and iBOT logits at the masked positions
    ``[M, K]``. With ``resolution_scale`` s > 1 the teacher sees the crops downscaled by s (antialiased),
    so that its patch grid is the grid of a student with s times its stride."""
    crops = batch["global"]
    if resolution_scale != 1.0:
        crops = F.interpolate(crops, scale_factor=1 / resolution_scale, mode="bilinear", antialias=True)
    with torch.autocast(crops.device.type, dtype=torch.bfloat16, enabled=crops.is_cuda):
        _, cls, patches = teacher([crops], mask_indices=batch["mask_indices_list"])
    return cls.float(), patches.float()
