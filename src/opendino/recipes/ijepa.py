"""I-JEPA as a recipe of the contract (recipes/base.py): predict, in feature space, what an EMA target
encoder says about masked blocks of an image from what a context encoder says about the rest
(Assran et al. 2023; docs/design/peers.md §I-JEPA).

Per image of the batch (every global crop is one image here: I-JEPA uses no multi-crop), a multi-block
sampler (data/masking.py) draws ``ijepa.n_targets`` target blocks and one context block with the targets
removed. The context encoder (our ViT) sees only the context patches (:meth:`forward_kept`); a narrow
predictor (models/predictor.py) turns them, plus mask tokens at each target block's positions, into
predictions of the target encoder's layer-normalised patch features there. The loss is smooth-L1 (the
reference code) or the paper's L2. The EMA target encoder is exported. Gram anchoring plugs in as for any
recipe with patch features (recipes/gram.py): the context encoder's patch features are kept close, in
their patch-to-patch similarities, to a Gram teacher's at the same positions.

Masks are drawn inside the step from a generator seeded by (run seed, step, rank), so a resumed run draws
the masks an uninterrupted one would.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from opendino.config import ConfigError, check_choice, check_minima
from opendino.data.masking import MultiBlockSpec, multiblock_masks
from opendino.models.predictor import JEPAPredictor
from opendino.recipes.base import DataNeeds, ParallelPlan, Recipe, clip_per_submodule, ema_update_
from opendino.recipes.gram import GramAnchor
from opendino.recipes.param_groups import param_groups, param_settings
from opendino.schedules import build_schedules


@dataclasses.dataclass
class IJEPAConfig:
    """The I-JEPA recipe's section (``train.recipe=ijepa``); defaults are the paper's ViT-H/14 setting."""

    predictor_dim: int = 384  # width of the predictor transformer
    predictor_depth: int = 12  # its blocks (16 in the ViT-g setting)
    predictor_heads: int = 0  # its attention heads; 0: the encoder's
    n_targets: int = 4  # target blocks per image
    target_scale: tuple[float, float] = (0.15, 0.2)  # each target block's share of the patch grid
    target_aspect: tuple[float, float] = (0.75, 1.5)  # its height / width
    context_scale: tuple[float, float] = (0.85, 1.0)  # the context block's share, before the targets are cut out
    min_keep: int = 10  # fewest context patches an image may keep (else the block is drawn again)
    loss: str = "smooth_l1"  # smooth_l1 (the reference code, beta 1) | l2 (the paper's text)

    def check(self) -> None:
        check_choice("ijepa.loss", self.loss, ("smooth_l1", "l2"))
        check_minima("ijepa", self, {"predictor_dim": 1, "predictor_depth": 1, "n_targets": 1, "min_keep": 1})
        for name in ("target_scale", "target_aspect", "context_scale"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ConfigError(f"ijepa.{name}={[low, high]}: need 0 < low <= high")
        if self.target_scale[1] > 1 or self.context_scale[1] > 1:
            raise ConfigError("ijepa.target_scale and ijepa.context_scale are shares of the grid: at most 1")

    def mask_spec(self) -> MultiBlockSpec:
        return MultiBlockSpec(
            n_targets=self.n_targets,
            target_scale=tuple(self.target_scale),
            target_aspect=tuple(self.target_aspect),
            context_scale=tuple(self.context_scale),
            min_keep=self.min_keep,
        )


class JEPAModel(nn.Module):
    """The trained pair: the context encoder (``backbone``) and the predictor, called once per step so that
    data parallelism hooks one module."""

    def __init__(self, backbone: nn.Module, predictor: JEPAPredictor) -> None:
        super().__init__()
        self.backbone, self.predictor = backbone, predictor

    def forward(self, images: Tensor, context: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Predictions ``[B, n_targets, K_tgt, D]`` and the context encoder's patch features ``[B, K_ctx, D]``."""
        stride = self.backbone.feature_stride
        grid = (images.shape[-2] // stride, images.shape[-1] // stride)
        patches = self.backbone.forward_kept(images, context)["x_norm_patchtokens"]
        return self.predictor(patches, context, targets, grid), patches


class IJEPARecipe(Recipe):
    """I-JEPA: a context encoder and predictor trained against an EMA target encoder."""

    REQUIRED_SCHEDULES = ("momentum",)
    OPTIONAL_SCHEDULES = ("gram_loss_weight",)

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.cfg, own = cfg, cfg.ijepa
        backbone = cfg.model.build()
        if not hasattr(backbone, "forward_kept"):
            raise ConfigError(f"ijepa: model.arch={cfg.model.arch} cannot encode a subset of patches (a ViT can)")
        heads = own.predictor_heads or backbone.num_heads
        predictor = JEPAPredictor(backbone.embed_dim, own.predictor_dim, own.predictor_depth, heads)
        self.student = JEPAModel(backbone, predictor)
        self.target = copy.deepcopy(backbone).requires_grad_(False).eval()
        if self.target.model_kwargs.get("drop_path_rate"):  # the export records no stochastic depth
            self.target.model_kwargs = {**self.target.model_kwargs, "drop_path_rate": 0.0}
            self.target.drop_path_rate = 0.0
        specs = {k: v for k, v in cfg.schedules.items() if k in (*self.REQUIRED_SCHEDULES, *self.OPTIONAL_SCHEDULES)}
        self.schedules = build_schedules(specs, cfg.optim.epochs, cfg.train.epoch_length, 1.0)
        self.gram, self.gram_teacher = None, None
        if cfg.gram.enabled:
            self.gram = GramAnchor(cfg.gram, self.target, self.schedules.get("gram_loss_weight"))
            self.gram_teacher = self.gram.teacher
        self.mask_spec = own.mask_spec()
        self.step, self.momentum, self.micro_batch = 0, self.schedules["momentum"][0], 0
        self.rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        if cfg.crops.n_local:
            raise ConfigError(f"ijepa uses no local crops: set crops.n_local=0 (is {cfg.crops.n_local})")
        if cfg.gram.enabled and cfg.gram.tokens_used != "all":
            raise ConfigError("ijepa: gram.tokens_used must be `all` (the context patches are the student's tokens)")
        if cfg.distill.teacher or cfg.init.backbone_blocks is not None:
            raise ConfigError("ijepa: distill.teacher and init.backbone_blocks are SSL-recipe settings")
        if cfg.init.from_run and cfg.init.from_mode != "continue":
            raise ConfigError("ijepa: init.from_mode must be `continue` (a later stage of an I-JEPA run)")

    def data_needs(self, shared: nn.Module | None = None) -> DataNeeds:
        gram = self.cfg.gram
        return DataNeeds(None, gram.needs_crops, gram.crop_scale, gram.no_distortions)

    def start_fresh(self, say: Callable[[str], None]) -> tuple[int, dict | None]:
        """``init.from_run``: a later stage carries on an earlier I-JEPA run; ``init.backbone`` (continued
        pretraining): both encoders start from those weights, the predictor fresh; then the Gram teacher."""
        from opendino.recipes.init import continue_run, fitted_backbone_state, start_gram_teacher

        if self.cfg.init.from_run:
            start, optimizer_state = continue_run(self, say)
            start_gram_teacher(self)
            return start, optimizer_state
        if self.cfg.init.backbone:
            state = fitted_backbone_state(self, self.cfg.init.backbone, say=say)
            for module in (self.student.backbone, self.target):
                module.load_state_dict(state)
            say(f"context and target encoders initialised from {self.cfg.init.backbone}; predictor fresh")
        start_gram_teacher(self)
        return 0, None

    def parallel_plan(self) -> ParallelPlan:
        sharded = [self.target, *([self.gram_teacher] if self.gram_teacher is not None else [])]
        return ParallelPlan(trained=self.student, sharded=sharded, compiled=[self.student, self.target])

    def param_groups(self) -> list[dict]:
        optim = self.cfg.optim
        settings = param_settings(self.student, optim.layerwise_decay, optim.patch_embed_lr_mult)
        init = self.cfg.init
        return param_groups(
            settings,
            frozen_until={"backbone": init.head_warmup_steps},
            ramp_steps={"backbone": init.backbone_ramp_steps},
        )

    def train(self, mode: bool = True) -> IJEPARecipe:
        super().train(mode)
        self.target.eval()
        if self.gram_teacher is not None:
            self.gram_teacher.eval()
        return self

    def before_step(self, step: int) -> dict[str, float]:
        self.step, self.momentum = step, self.schedules["momentum"][step]
        self.micro_batch = 0  # the masks of each micro-batch of a step differ (train.accumulate)
        values = {"momentum": self.momentum}
        if self.gram is not None:
            values.update(self.gram.before_step(step))
        return values

    def draw_masks(self, n_images: int, grid: tuple[int, int], device: torch.device) -> tuple[Tensor, Tensor]:
        """This step's context ``[B, K_ctx]`` and target ``[B, n_targets, K_tgt]`` patch indices, drawn on
        the host from (seed, step, rank, and from the second micro-batch of a step on its index) and copied
        without a synchronisation."""
        parts = [self.cfg.train.seed, self.step, self.rank] + ([self.micro_batch] if self.micro_batch else [])
        self.micro_batch += 1
        seed = np.random.SeedSequence(parts).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(seed))
        context, targets = multiblock_masks(n_images, grid, generator, self.mask_spec)
        return context.to(device, non_blocking=True), targets.to(device, non_blocking=True)

    def forward(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        images = batch["global"]
        stride = self.student.backbone.feature_stride
        grid = (images.shape[-2] // stride, images.shape[-1] // stride)
        context, targets = self.draw_masks(images.shape[0], grid, images.device)
        with torch.no_grad():
            full = self.target(images, is_training=True)["x_norm_patchtokens"]
            wanted = F.layer_norm(full.float(), full.shape[-1:])  # no affine: the reference targets
            n_targets, k = targets.shape[1:]
            wanted = wanted.gather(1, targets.flatten(1).unsqueeze(-1).expand(-1, -1, wanted.shape[-1]))
            wanted = wanted.unflatten(1, (n_targets, k))
        predicted, patches = self.student(images, context, targets)
        predicted = predicted.float()
        if self.cfg.ijepa.loss == "smooth_l1":
            regression = F.smooth_l1_loss(predicted, wanted)
        else:
            regression = F.mse_loss(predicted, wanted)
        terms = {"ijepa": regression}
        loss = regression
        if self.gram is not None:
            ema_patches = full if self.cfg.gram.ema_teacher else None
            terms["gram"] = self.gram.loss(patches, batch, ema_patches, positions=context)
            loss = loss + self.gram.weight * terms["gram"]
        return loss, terms

    def clip_gradients(self, max_norm: float) -> dict[str, Tensor]:
        """Per submodule (context encoder, predictor); I-JEPA itself does not clip (``optim.clip_grad=0``)."""
        return clip_per_submodule(self.student, max_norm)

    def after_update(self, step: int, finite: Tensor) -> None:
        ema_update_(
            list(self.target.parameters()), list(self.student.backbone.parameters()), 1.0 - self.momentum, finite
        )

    def export_module(self) -> nn.Module:
        return self.target

    def monitored(self) -> tuple[nn.Module, nn.Module | None]:
        return self.target, self.gram_teacher
