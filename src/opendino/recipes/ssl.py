"""The DINOv3 student-teacher recipe: DINO + iBOT + KoLeo with Sinkhorn-Knopp centring
(docs/design/recipe.md §2-3), an implementation of the recipe contract (recipes/base.py).

One ``step`` computes the loss of a collated batch: the EMA teacher (eval mode, no grad) sees the 2
unmasked global crops; the student sees the masked global crops and the local crops in one call; the
DINO head runs on all student CLS tokens at once and the iBOT head on the masked patch tokens. Every
quantity stays on the device (no host synchronisation inside the step). Gram anchoring is a component
(recipes/gram.py); distillation is this recipe with a frozen teacher's logits in the batch
(recipes/distill.py), shared by the students of one run.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from opendino.config import ConfigError
from opendino.losses import (
    LossWeights,
    SoftmaxCenter,
    dino_loss,
    ibot_loss_masked,
    koleo_loss,
    koleo_loss_distributed,
    sinkhorn_knopp,
    total_loss,
)
from opendino.recipes.base import DataNeeds, MaskSpec, ParallelPlan, Recipe, clip_per_submodule, ema_update_
from opendino.recipes.gram import GramAnchor
from opendino.recipes.param_groups import param_groups, param_settings
from opendino.schedules import build_schedules

N_GLOBAL = 2


class SSLModel(nn.Module):
    """A backbone with its DINO and iBOT heads (the student, or the EMA teacher).

    Its ``forward`` is the one call through which data parallelism sees the model: DDP and FSDP hook the
    module's ``__call__``, so every use of the backbone and the heads in a step goes through it."""

    def __init__(self, backbone: nn.Module, dino_head: nn.Module, ibot_head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.dino_head, self.ibot_head = backbone, dino_head, ibot_head

    @property
    def patch_head(self) -> nn.Module:
        """The head of the iBOT term: its own, or the DINO head with ``loss.shared_head``."""
        return self.dino_head if self.ibot_head is None else self.ibot_head

    def forward(
        self, crops: list[Tensor], masks: list[Tensor | None] | None = None, mask_indices: Tensor | None = None
    ) -> tuple[list[dict], Tensor, Tensor | None]:
        """Backbone outputs of each crop group, the DINO head on all their CLS tokens (in group order) and,
        with ``mask_indices``, the iBOT head on those patch tokens of the first group (flattened)."""
        outs = self.backbone(crops, masks=masks, is_training=True)
        cls_logits = self.dino_head(torch.cat([o["x_norm_clstoken"] for o in outs]))
        patch_logits = None
        if mask_indices is not None:
            patch_logits = self.patch_head(outs[0]["x_norm_patchtokens"].flatten(0, 1)[mask_indices])
        return outs, cls_logits, patch_logits


def build_student(cfg: Any) -> SSLModel:
    """A backbone and its two heads as the ``model``, ``dino_head`` and ``ibot_head`` sections of ``cfg``
    say; with ``loss.shared_head`` the iBOT term uses the DINO head (``ibot_head`` is None)."""
    backbone = cfg.model.build()
    dino_head = cfg.dino_head.build(backbone.embed_dim)
    return SSLModel(backbone, dino_head, None if cfg.loss.shared_head else cfg.ibot_head.build(backbone.embed_dim))


class SSLRecipe(Recipe):
    """DINOv3 SSL pretraining at every stage (Gram anchoring, high resolution) and, with
    ``distill.teacher``, distillation; configured by the whole run configuration."""

    REQUIRED_SCHEDULES = ("teacher_temp", "momentum")
    OPTIONAL_SCHEDULES = ("dino_local_loss_weight", "gram_loss_weight")
    CAPTURABLE = True
    STEP_SCALARS = ("teacher_temp", "ema_weight", "local_weight", "gram_weight")

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.student = build_student(cfg)
        self.teacher = copy.deepcopy(self.student)  # identical start, as the official recipe
        self.teacher.requires_grad_(False)
        self.teacher.eval()  # no drop path, no RoPE augmentation, ever
        # ... and no stochastic depth in the arguments its export records either (docs/design/recipe.md §3.1)
        backbone = self.teacher.backbone
        if getattr(backbone, "model_kwargs", {}).get("drop_path_rate"):
            backbone.model_kwargs = {**backbone.model_kwargs, "drop_path_rate": 0.0}
            if hasattr(backbone, "drop_path_rate"):
                backbone.drop_path_rate = 0.0
        self.weights = LossWeights(
            cfg.loss.dino_weight, cfg.loss.koleo_weight, cfg.loss.ibot_weight, cfg.loss.global_ignore_diagonal
        )
        own = {k: v for k, v in cfg.schedules.items() if k in (*self.REQUIRED_SCHEDULES, *self.OPTIONAL_SCHEDULES)}
        self.schedules = build_schedules(own, cfg.optim.epochs, cfg.train.epoch_length, 1.0)
        # Softmax centring (DINO, DINOv2): the EMA centres of the teacher's CLS and patch logits, in the state dict
        self.centers = None
        if cfg.loss.centering == "softmax":
            momentum = cfg.loss.center_momentum
            heads = self.student.dino_head, self.student.patch_head
            sizes = [sum(h.level_sizes) for h in heads]
            self.centers = nn.ModuleDict(
                {name: SoftmaxCenter(k, momentum) for name, k in zip(("dino", "ibot"), sizes, strict=True)}
            )
        self.gram = None
        self.gram_teacher = None  # a frozen backbone whose patch-similarity structure the student keeps
        if cfg.gram.enabled:
            self.gram = GramAnchor(cfg.gram, self.teacher.backbone, self.schedules.get("gram_loss_weight"))
            self.gram_teacher = self.gram.teacher
        self._set_scalars(0)  # the values of step 0 until before_step sets a step's

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        if cfg.distill.teacher and cfg.gram.enabled:
            raise ConfigError("distillation has no Gram anchoring (docs/design/recipe.md §4.6): set gram.enabled=false")
        if cfg.init.backbone_blocks is not None and not (cfg.init.backbone or cfg.distill.teacher):
            raise ConfigError("init.backbone_blocks: the blocks of what? Set init.backbone (or distill.teacher)")
        nested = cfg.dino_head.nested_levels or cfg.ibot_head.nested_levels
        if cfg.distill.teacher and (nested or cfg.loss.centering != "sinkhorn" or cfg.loss.shared_head):
            raise ConfigError("distillation: nested heads, softmax centring and loss.shared_head are not supported")
        if cfg.loss.shared_head and cfg.ibot_head.nested_levels != cfg.dino_head.nested_levels:
            raise ConfigError("loss.shared_head: ibot_head is unused, set its nested_levels like dino_head's")
        if not cfg.distill.teacher and cfg.loss.centering == "sinkhorn" and cfg.loss.sinkhorn_iterations == 0:
            raise ConfigError(
                "loss.sinkhorn_iterations=0 (no centring) needs a frozen distill.teacher: an EMA teacher collapses"
            )

    @classmethod
    def shared_pass(cls, cfg: Any, recipes: list[Recipe]) -> nn.Module | None:
        """With ``distill.teacher``: the frozen teacher whose logits all students learn from."""
        if not cfg.distill.teacher:
            return None
        from opendino.recipes.distill import SharedTeacher

        return SharedTeacher(cfg, [r.student for r in recipes])

    def data_needs(self, shared: nn.Module | None = None) -> DataNeeds:
        # The mask grid is the token grid of the network that sees the unmasked crops: the EMA teacher,
        # or the frozen distillation teacher (on crops downscaled by crops.teacher_to_student_resolution_scale).
        owner = shared.model if shared is not None else self.student
        patch = getattr(owner.backbone, "patch_size", 16)
        loss, gram = self.cfg.loss, self.cfg.gram
        masks = MaskSpec(patch, tuple(loss.mask_ratio), loss.mask_probability, loss.pad_masked_rows)
        return DataNeeds(masks, gram.needs_crops, gram.crop_scale, gram.no_distortions)

    def start_fresh(self, say: Callable[[str], None]) -> tuple[int, dict | None]:
        from opendino.recipes.init import initialise

        return initialise(self, say)

    def parallel_plan(self) -> ParallelPlan:
        models = [self.student, self.teacher]
        return ParallelPlan(
            trained=self.student,
            sharded=[self.teacher, *([self.gram_teacher] if self.gram_teacher is not None else [])],
            compiled=models,
            dynamic=[head for m in models for head in (m.dino_head, m.ibot_head) if head is not None],
            compiled_methods=["loss_terms"],
        )

    def param_groups(self) -> list[dict]:
        optim = self.cfg.optim
        settings = param_settings(self.student, optim.layerwise_decay, optim.patch_embed_lr_mult)
        init = self.cfg.init
        return param_groups(
            settings,
            frozen_until={"backbone": init.head_warmup_steps},
            ramp_steps={"backbone": init.backbone_ramp_steps},
        )

    def train(self, mode: bool = True) -> SSLRecipe:
        super().train(mode)
        self.teacher.eval()
        if self.gram_teacher is not None:
            self.gram_teacher.eval()
        return self

    def _set_scalars(self, step: int) -> dict[str, float]:
        s = self.schedules
        values = {
            "teacher_temp": s["teacher_temp"][step],
            "momentum": s["momentum"][step],
            "dino_local_weight": s["dino_local_loss_weight"][step] if "dino_local_loss_weight" in s else 1.0,
        }
        self.set_scalar("teacher_temp", values["teacher_temp"])
        self.set_scalar("ema_weight", 1.0 - values["momentum"])  # the student's share in the EMA teacher
        self.set_scalar("local_weight", values["dino_local_weight"])
        self.set_scalar("gram_weight", self.gram.weight if self.gram is not None else 0.0)
        return values

    def before_step(self, step: int) -> dict[str, float]:
        values = self._set_scalars(step)
        if self.gram is not None:
            values.update(self.gram.before_step(step))
            self.set_scalar("gram_weight", values["gram_weight"])
        return values  # the scheduled floats: logging them reads nothing from the device

    @torch.no_grad()
    def ema_teacher_outputs(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        """The EMA teacher's DINO logits of the 2 unmasked global crops ``[2B, K]`` (crop-major), its iBOT
        logits of the patch tokens that the student sees masked ``[M, K]`` and its patch features."""
        (out,), cls, patches = self.teacher([batch["global"]], mask_indices=batch["mask_indices_list"])
        return cls, patches, out["x_norm_patchtokens"]

    def forward(self, batch: dict) -> tuple[Tensor, dict]:
        """The total loss and its terms (tensors) for a collated batch already on the device. With
        ``batch["teacher_logits"]`` (distillation) the targets come from them and the student's global crops
        are not masked (unless ``distill.mask_student``); the iBOT term still uses the sampled positions."""
        masks = batch["collated_masks"]
        stride = self.student.backbone.feature_stride
        tokens = (batch["global"].shape[-2] // stride) * (batch["global"].shape[-1] // stride)
        if tokens != masks.shape[1]:
            raise ValueError(
                f"the student has {tokens} patch tokens per global crop but the masks have {masks.shape[1]}: "
                "set crops.teacher_to_student_resolution_scale to the ratio of the student's output stride "
                "to the teacher's patch size"
            )
        teacher_logits, ema_patches = batch.get("teacher_logits"), None
        student_masks = None if teacher_logits is not None and not self.cfg.distill.mask_student else masks
        if teacher_logits is None:
            *teacher_logits, ema_patches = self.ema_teacher_outputs(batch)
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
            self.teacher_temp,
            batch.get("mask_valid"),
        )
        if self.gram is not None:
            terms["gram"] = self.gram.loss(glob["x_norm_patchtokens"], batch, ema_patches)
        n_local = batch["local"].shape[0] // (batch["global"].shape[0] // N_GLOBAL)  # local crops per image
        loss = total_loss(
            self.weights, N_GLOBAL, n_local, dino_local_weight=self.local_weight, gram_weight=self.gram_weight, **terms
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
        mask_valid: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Sinkhorn-Knopp targets from the teacher's logits, then the DINO (local and global), KoLeo and
        iBOT terms. One function of tensors, so that ``train.compile`` can fuse the passes over the
        ``[M, K]`` logits (softmax, cross-entropy, Sinkhorn-Knopp) into few kernels.
        ``student_cls``: the student's DINO logits of the global then the local crops, crop-major.
        ``mask_valid``: with padded masked rows, the real ones (padding gets no target and no weight)."""
        temp = self.cfg.loss.student_temp
        n_global_rows = global_cls_tokens.shape[0]
        student_global, student_local = student_cls[:n_global_rows], student_cls[n_global_rows:]
        terms = {"dino_local": 0.0, "dino_global": 0.0, "ibot": 0.0}
        # One level for a plain head; Franca's nested heads: each level's targets and losses, summed.
        dino_sizes = self.student.dino_head.level_sizes
        ibot_sizes = self.student.patch_head.level_sizes
        for level, (t_cls, s_glob, s_loc, t_patch, s_patch) in enumerate(
            zip(
                teacher_cls.split(dino_sizes, -1),
                student_global.split(dino_sizes, -1),
                student_local.split(dino_sizes, -1),
                teacher_patches.split(ibot_sizes, -1),
                student_patches.split(ibot_sizes, -1),
                strict=True,
            )
        ):
            cls_probs = self._targets("dino", level, t_cls, teacher_temp).unflatten(0, (N_GLOBAL, -1))
            patch_probs = self._targets("ibot", level, t_patch, teacher_temp, n_masked, mask_valid)
            terms["dino_local"] = terms["dino_local"] + dino_loss(
                s_loc.unflatten(0, (-1, cls_probs.shape[1])), cls_probs, temp
            )
            terms["dino_global"] = terms["dino_global"] + dino_loss(
                s_glob.unflatten(0, (N_GLOBAL, -1)),
                cls_probs,
                temp,
                ignore_diagonal=self.weights.global_ignore_diagonal,
            )
            terms["ibot"] = terms["ibot"] + ibot_loss_masked(s_patch, patch_probs, masks, masks_weight, temp)
        if self.centers is not None:  # batch n's statistics centre batch n + 1 (DINOv2)
            self.centers["dino"].update(teacher_cls)
            self.centers["ibot"].update(teacher_patches, valid=mask_valid)
        terms["koleo"] = sum(self._koleo(c) for c in global_cls_tokens.chunk(N_GLOBAL)) / N_GLOBAL
        return terms

    def _targets(
        self,
        head: str,
        level: int,
        logits: Tensor,
        teacher_temp: float,
        n_samples: Tensor | None = None,
        valid: Tensor | None = None,
    ) -> Tensor:
        """The teacher's target distributions of one head level: Sinkhorn-Knopp, or the softmax around
        that level's slice of the EMA centre (``valid``: the real rows; padding rows get zeros)."""
        if self.centers is None:
            iterations = self.cfg.loss.sinkhorn_iterations
            return sinkhorn_knopp(logits, teacher_temp, iterations, n_samples=n_samples, valid=valid)
        sizes = (
            self.student.dino_head if head == "dino" else self.student.ibot_head or self.student.dino_head
        ).level_sizes
        center = self.centers[head].center.split(sizes, -1)[level]
        probs = torch.softmax((logits.float() - center) / teacher_temp, dim=-1)
        return probs if valid is None else probs * valid[:, None]

    def _koleo(self, cls: Tensor) -> Tensor:
        """KoLeo within this rank's crops (official), or over groups of the global batch across ranks."""
        group = self.cfg.loss.koleo_group_size
        if group == 0:
            return koleo_loss(cls)
        return koleo_loss_distributed(cls, group_size=None if group < 0 else group)

    def after_update(self, step: int, finite: Tensor) -> None:
        """The teacher: EMA of the student's parameters (buffers are constant)."""
        ema_update_(list(self.teacher.parameters()), list(self.student.parameters()), self.ema_weight, finite)

    def export_module(self) -> nn.Module:
        return self.teacher.backbone  # the EMA teacher (the student's EMA in distillation)

    def monitored(self) -> tuple[nn.Module, nn.Module | None]:
        return self.teacher.backbone, self.gram_teacher

    def clip_gradients(self, max_norm: float) -> dict[str, Tensor]:
        """Per-submodule clipping (backbone, DINO head, iBOT head), as the official recipe."""
        return clip_per_submodule(self.student, max_norm)
