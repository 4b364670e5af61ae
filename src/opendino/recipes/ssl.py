"""The DINOv3 student-teacher recipe: DINO + iBOT + KoLeo with Sinkhorn-Knopp centring (recipe.md §2-3).

One ``step`` computes the loss of a collated batch: the EMA teacher (eval mode, no grad) sees the 2
unmasked global crops; the student sees the masked global crops and the local crops in one call; the
DINO head runs on all student CLS tokens at once and the iBOT head on the masked patch tokens. Every
quantity stays on the device (no host synchronisation inside the step).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from opendino.losses import (
    LossWeights,
    dino_loss,
    gram_loss,
    ibot_loss_masked,
    koleo_loss,
    koleo_loss_distributed,
    sinkhorn_knopp,
    total_loss,
)
from opendino.models import DINOHead, build_model
from opendino.train.config import TrainConfig

N_GLOBAL = 2


@torch.no_grad()
def lerp_by_tensor_(targets: list[Tensor], sources: list[Tensor], weight: Tensor) -> None:
    """``t += weight * (s - t)`` for every pair, with ``weight`` a 0-dim tensor that is never read on the host."""
    step = torch._foreach_sub(sources, targets)
    torch._foreach_mul_(step, weight)
    torch._foreach_add_(targets, step)


class SSLModel(nn.Module):
    """A backbone with its DINO and iBOT heads (the student, or the EMA teacher).

    Its ``forward`` is the one call through which data parallelism sees the model: DDP and FSDP hook the
    module's ``__call__``, so every use of the backbone and the heads in a step goes through it."""

    def __init__(self, backbone: nn.Module, dino_head: nn.Module, ibot_head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.dino_head, self.ibot_head = backbone, dino_head, ibot_head

    def forward(
        self, crops: list[Tensor], masks: list[Tensor | None] | None = None, mask_indices: Tensor | None = None
    ) -> tuple[list[dict], Tensor, Tensor | None]:
        """Backbone outputs of each crop group, the DINO head on all their CLS tokens (in group order) and,
        with ``mask_indices``, the iBOT head on those patch tokens of the first group (flattened)."""
        outs = self.backbone(crops, masks=masks, is_training=True)
        cls_logits = self.dino_head(torch.cat([o["x_norm_clstoken"] for o in outs]))
        patch_logits = None
        if mask_indices is not None:
            patch_logits = self.ibot_head(outs[0]["x_norm_patchtokens"].flatten(0, 1)[mask_indices])
        return outs, cls_logits, patch_logits


def build_student(cfg: TrainConfig) -> SSLModel:
    backbone = build_model(cfg.model.arch, **{"drop_path_rate": cfg.model.drop_path_rate, **cfg.model.kwargs})
    heads = [
        DINOHead(
            backbone.embed_dim,
            h.prototypes,
            hidden_dim=h.hidden_dim,
            bottleneck_dim=h.bottleneck_dim,
            nlayers=h.nlayers,
            last_layer_std=h.last_layer_std,
        )
        for h in (cfg.dino_head, cfg.ibot_head)
    ]
    return SSLModel(backbone, *heads)


class SSLRecipe(nn.Module):
    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.student = build_student(cfg)
        self.teacher = copy.deepcopy(self.student)  # identical start, as the official recipe
        self.teacher.requires_grad_(False)
        self.teacher.eval()  # no drop path, no RoPE augmentation, ever
        # ... and no stochastic depth in the arguments its export records either (recipe.md §3.1)
        backbone = self.teacher.backbone
        if getattr(backbone, "model_kwargs", {}).get("drop_path_rate"):
            backbone.model_kwargs = {**backbone.model_kwargs, "drop_path_rate": 0.0}
            if hasattr(backbone, "drop_path_rate"):
                backbone.drop_path_rate = 0.0
        # Gram anchoring: a frozen backbone whose patch-similarity structure the student keeps.
        self.gram_teacher = copy.deepcopy(self.teacher.backbone) if cfg.gram.enabled else None
        self.weights = LossWeights(
            cfg.loss.dino_weight, cfg.loss.koleo_weight, cfg.loss.ibot_weight, cfg.loss.global_ignore_diagonal
        )

    def train(self, mode: bool = True) -> SSLRecipe:
        super().train(mode)
        self.teacher.eval()
        if self.gram_teacher is not None:
            self.gram_teacher.eval()
        return self

    @torch.no_grad()
    def refresh_gram_teacher(self) -> None:
        """The Gram teacher becomes a copy of the current EMA teacher (the official ``rep_update``)."""
        for gram, ema in zip(self.gram_teacher.parameters(), self.teacher.backbone.parameters(), strict=True):
            gram.copy_(ema)

    @torch.no_grad()
    def gram_targets(self, crops: Tensor, grid: int) -> Tensor:
        """The Gram teacher's patch features of its (larger) crops, resized bicubically (no antialias) to
        the student's ``grid x grid`` patches: ``[2B, grid * grid, D]``."""
        tokens = self.gram_teacher(crops, is_training=True)["x_norm_patchtokens"]
        side = int(round(tokens.shape[1] ** 0.5))
        if side != grid:
            maps = tokens.transpose(1, 2).unflatten(2, (side, side)).float()
            maps = F.interpolate(maps, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
            tokens = maps.flatten(2).transpose(1, 2)
        return tokens

    @torch.no_grad()
    def ema_teacher_logits(self, batch: dict) -> tuple[Tensor, Tensor]:
        """The EMA teacher's DINO logits of the 2 unmasked global crops ``[2B, K]`` (crop-major) and its
        iBOT logits of the patch tokens that the student sees masked ``[M, K]``."""
        _, cls, patches = self.teacher([batch["global"]], mask_indices=batch["mask_indices_list"])
        return cls, patches

    def forward(
        self,
        batch: dict,
        teacher_temp: float,
        dino_local_weight: float = 1.0,
        gram_weight: float = 0.0,
        teacher_logits: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, dict]:
        """The total loss and its terms (tensors) for a collated batch already on the device. With
        ``teacher_logits`` (distillation) the targets come from them and the student's global crops are
        not masked (unless ``distill.mask_student``); the iBOT term still uses the sampled positions."""
        masks = batch["collated_masks"]
        stride = self.student.backbone.feature_stride
        tokens = (batch["global"].shape[-2] // stride) * (batch["global"].shape[-1] // stride)
        if tokens != masks.shape[1]:
            raise ValueError(
                f"the student has {tokens} patch tokens per global crop but the masks have {masks.shape[1]}: "
                "set crops.teacher_to_student_resolution_scale to the ratio of the student's output stride "
                "to the teacher's patch size"
            )
        student_masks = None if teacher_logits is not None and not self.cfg.distill.mask_student else masks
        if teacher_logits is None:
            teacher_logits = self.ema_teacher_logits(batch)
        (glob, _), logits, patch_logits = self.student(
            [batch["global"], batch["local"]], masks=[student_masks, None], mask_indices=batch["mask_indices_list"]
        )
        terms = self.loss_terms(
            *teacher_logits,
            logits,
            patch_logits,
            glob["x_norm_clstoken"],
            masks,
            batch["masks_weight"],
            batch["n_masked_patches"],
            teacher_temp,
        )
        if self.gram_teacher is not None:
            g = self.cfg.gram
            student_patches = glob["x_norm_patchtokens"]
            grid = int(round(student_patches.shape[1] ** 0.5))
            terms["gram"] = gram_loss(
                student_patches,
                self.gram_targets(batch["gram"], grid),
                normalize=g.normalized,
                img_level=g.img_level,
                remove_neg=g.remove_neg,
                remove_only_teacher_neg=g.remove_only_teacher_neg,
            )
        n_local = batch["local"].shape[0] // (batch["global"].shape[0] // N_GLOBAL)  # local crops per image
        loss = total_loss(
            self.weights, N_GLOBAL, n_local, dino_local_weight=dino_local_weight, gram_weight=gram_weight, **terms
        )
        return loss, terms

    def loss_terms(
        self,
        teacher_cls: Tensor,
        teacher_patches: Tensor,
        student_cls: Tensor,
        student_patches: Tensor,
        global_cls_tokens: Tensor,
        masks: Tensor,
        masks_weight: Tensor,
        n_masked: Tensor,
        teacher_temp: float,
    ) -> dict[str, Tensor]:
        """Sinkhorn-Knopp targets from the teacher's logits, then the DINO (local and global), KoLeo and
        iBOT terms. One function of tensors, so that ``train.compile`` can fuse the passes over the
        ``[M, K]`` logits (softmax, cross-entropy, Sinkhorn-Knopp) into few kernels.
        ``student_cls``: the student's DINO logits of the global then the local crops, crop-major."""
        iterations, temp = self.cfg.loss.sinkhorn_iterations, self.cfg.loss.student_temp
        cls_probs = sinkhorn_knopp(teacher_cls, teacher_temp, iterations).unflatten(0, (N_GLOBAL, -1))
        patch_probs = sinkhorn_knopp(teacher_patches, teacher_temp, iterations, n_samples=n_masked)
        n_global_rows = global_cls_tokens.shape[0]
        global_logits = student_cls[:n_global_rows].unflatten(0, (N_GLOBAL, -1))
        local_logits = student_cls[n_global_rows:].unflatten(0, (-1, cls_probs.shape[1]))
        return {
            "dino_local": dino_loss(local_logits, cls_probs, temp),
            "dino_global": dino_loss(
                global_logits, cls_probs, temp, ignore_diagonal=self.weights.global_ignore_diagonal
            ),
            "koleo": sum(self._koleo(c) for c in global_cls_tokens.chunk(N_GLOBAL)) / N_GLOBAL,
            "ibot": ibot_loss_masked(student_patches, patch_probs, masks, masks_weight, temp),
        }

    def _koleo(self, cls: Tensor) -> Tensor:
        """KoLeo within this rank's crops (official), or over groups of the global batch across ranks."""
        group = self.cfg.loss.koleo_group_size
        if group == 0:
            return koleo_loss(cls)
        return koleo_loss_distributed(cls, group_size=None if group < 0 else group)

    @torch.no_grad()
    def update_teacher(self, momentum: float, enabled: Tensor | None = None) -> None:
        """EMA of the parameters (buffers are constant); one fused multi-tensor update.

        ``enabled`` (a bool scalar on the device) turns the update off without a host synchronisation:
        ``_foreach_lerp_`` has no tensor-weight overload (a CUDA scalar would be read with ``.item()``,
        stalling the host every step), so there the update is ``t += w * (s - t)`` with the multi-tensor
        ops' tensor overloads. On the CPU reading the flag costs nothing and one ``lerp`` pass is faster.
        """
        teacher, student = list(self.teacher.parameters()), list(self.student.parameters())
        if enabled is not None and enabled.device.type != "cpu":
            lerp_by_tensor_(teacher, student, enabled.to(teacher[0].dtype) * (1.0 - momentum))
        elif enabled is None or bool(enabled):
            torch._foreach_lerp_(teacher, student, 1.0 - momentum)

    def clip_gradients(self, max_norm: float) -> dict[str, Tensor]:
        """Per-submodule clipping (backbone, DINO head, iBOT head), as the official recipe; ``max_norm`` 0
        turns clipping off (the norms are still measured). Under FSDP the norms are replicated DTensors;
        their local value is the full norm."""
        norms = {
            name: torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm or float("inf"), foreach=True)
            for name, module in self.student.named_children()
        }
        return {name: n.to_local() if hasattr(n, "to_local") else n for name, n in norms.items()}
