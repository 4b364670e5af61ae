"""Distillation (docs/design/recipe.md §4.6, §10.3): a frozen trained model with its heads provides the
targets.

The recipe stays the SSL one (DINO local and global, iBOT at the sampled positions, KoLeo; no Gram):
only the source of the logits changes. The frozen teacher is the recipe's shared pass — neither trained,
averaged nor checkpointed — so the several students of one run share its forward pass.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from opendino import runs
from opendino.config import ConfigError, build
from opendino.models.registry import input_channels
from opendino.recipes.base import ParallelPlan
from opendino.recipes.config import HeadConfig, LossConfig, ModelConfig
from opendino.recipes.ssl import SSLModel, build_student
from opendino.runs import newest_state, prefixed, read_config


def load_distillation_teacher(run: str | Path, *students: SSLModel) -> SSLModel:
    """The EMA teacher (backbone and both heads) of an OpenDINO run's newest checkpoint, frozen. Its heads
    must have the students' prototype counts (the targets are distributions over the same prototypes)."""
    try:
        _, state = newest_state(run, "distill.teacher")
    except FileNotFoundError as e:
        if runs.is_run(run):
            raise
        raise FileNotFoundError(
            f"{e}. A backbone without heads needs its heads fitted first: "
            "`opendino train ... init.backbone=FILE init.head_warmup_steps=N`"
        ) from None
    tree = read_config(run)
    sections = {"model": ModelConfig, "dino_head": HeadConfig, "ibot_head": HeadConfig, "loss": LossConfig}
    teacher = build_student(types.SimpleNamespace(**{k: build(c, tree.get(k, {}), k) for k, c in sections.items()}))
    teacher.load_state_dict(prefixed(state["model"], "teacher."))
    for student in students:
        for head in ("dino_head", "ibot_head"):
            ours, theirs = (sum(getattr(m, head).level_sizes) for m in (student, teacher))
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


class SharedTeacher(nn.Module):
    """The frozen distillation teacher as the SSL recipe's shared pass: adds ``teacher_logits`` to each
    batch, once for all students."""

    def __init__(self, cfg: Any, students: list[SSLModel]) -> None:
        super().__init__()
        self.model = load_distillation_teacher(cfg.distill.teacher, *students)
        self.resolution_scale = cfg.crops.teacher_to_student_resolution_scale
        if (channels := input_channels(self.model.backbone)) != cfg.model.in_chans:
            raise ConfigError(
                f"distill.teacher={cfg.distill.teacher} takes {channels} input channels and the students "
                f"model.in_chans={cfg.model.in_chans}: both see the same crops"
            )

    def forward(self, batch: dict) -> dict:
        return {"teacher_logits": distillation_teacher_logits(self.model, batch, self.resolution_scale)}

    def parallel_plan(self) -> ParallelPlan:
        m = self.model
        return ParallelPlan(trained=None, sharded=[m], compiled=[m], dynamic=[m.dino_head, m.ibot_head])
