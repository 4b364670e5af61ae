"""Gram anchoring as a component (docs/design/recipe.md §2.6, §4.3): any recipe with patch features
switches it on with ``gram.enabled``.

It owns a frozen Gram teacher (a backbone, or with ``gram.ema_teacher`` the recipe's EMA teacher
itself), the teacher's refresh rule, its loss weight and the loss: the MSE between the Gram matrices
(patch-to-patch similarities) of the student's and the teacher's patch features of the global crops.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from opendino.config import ConfigError
from opendino.losses import gram_loss
from opendino.schedules import Schedule

TOKENS_USED = ("all", "masked", "unmasked")
PEAK_TEACHER = "dense_peak"  # gram.checkpoint: the dense monitor's best backbone (runs.DENSE_PEAK)
INIT_TEACHER = "init"  # gram.checkpoint: the starting backbone itself (init.backbone), fixed


@dataclasses.dataclass
class GramConfig:
    """Gram anchoring (docs/design/recipe.md §2.6, §4.3): a frozen Gram teacher, its crops and the refresh rule."""

    enabled: bool = False  # add the Gram anchoring loss (a stage of its own, docs/design/recipe.md §2.6)
    loss_weight: float = 1.0  # used when the preset has no `schedules.gram_loss_weight`
    # The Gram teacher: a backbone file or run folder, or `dense_peak`: the EMA teacher at the best dense
    # monitor score of the run this stage continues (init.from_run, run with monitor.keep_peak), or `init`:
    # the starting model (init.backbone), so that an adapted model keeps its dense structure; default: the
    # EMA teacher
    checkpoint: str | None = None
    # Not used by the official configs: no Gram teacher network, the EMA teacher's own patch features of
    # the (unmasked) global crops are the targets; no Gram crops are made.
    ema_teacher: bool = False
    refresh_from: int | None = None  # copy the EMA teacher into the Gram teacher at this step ...
    refresh_every: int = 0  # ... and every k steps after it ...
    max_refreshes: int = 1  # ... this many times in all
    crop_scale: float = 2.0  # Gram-teacher crops at this multiple of the global crop size
    no_distortions: bool = True  # its crops without photometric distortion
    img_level: bool = False  # one Gram over all tokens of the batch (official default); true: one per image
    normalized: bool = True  # L2-normalise patch features before the Gram matrices
    remove_neg: bool = False  # zero the negative entries of both Gram matrices
    remove_only_teacher_neg: bool = False  # zero the negative entries of the teacher's Gram only
    # The patch tokens that enter the Grams: all | masked | unmasked (by the iBOT masks of the global crops;
    # the last two need img_level=false: images keep different numbers of tokens)
    tokens_used: str = "all"
    resize_method: str = "bicubic"  # the teacher's patch grid resized to the student's (F.interpolate mode)
    resize_antialias: bool = False  # antialiasing of that resize (official: off)

    def check(self) -> None:
        if self.tokens_used not in TOKENS_USED:
            raise ConfigError(f"gram.tokens_used={self.tokens_used!r}; valid: {', '.join(TOKENS_USED)}")
        if self.tokens_used != "all" and self.img_level:
            raise ConfigError(f"gram.tokens_used={self.tokens_used} needs gram.img_level=false")
        if self.resize_method not in ("bicubic", "bilinear", "nearest", "area"):
            raise ConfigError(f"gram.resize_method={self.resize_method!r}; valid: bicubic, bilinear, nearest, area")
        if self.ema_teacher and (self.checkpoint or self.refresh_from is not None):
            raise ConfigError(
                "gram.ema_teacher=true has no Gram teacher to load or refresh (gram.checkpoint, refresh_*)"
            )
        if self.refresh_every < 0 or self.max_refreshes < 0:
            raise ConfigError("gram.refresh_every and gram.max_refreshes must be 0 or more")

    def refreshes_at(self, step: int) -> bool:
        if self.refresh_from is None or step < self.refresh_from:
            return False
        k, rest = divmod(step - self.refresh_from, self.refresh_every or 1)
        return rest == 0 and k < self.max_refreshes and (self.refresh_every > 0 or k == 0)

    @property
    def needs_crops(self) -> bool:
        return self.enabled and not self.ema_teacher


class GramAnchor:
    """The Gram teacher with its refresh rule and loss weight. ``source``: the backbone it copies (the
    recipe's EMA teacher backbone). The recipe registers :attr:`teacher` as its own submodule (state-dict
    keys ``gram_teacher.*``), so that checkpoints, parallelism and ``train()`` see it."""

    def __init__(self, cfg: GramConfig, source: nn.Module, weights: Schedule | None) -> None:
        cfg.check()
        self.cfg, self.source, self.weights, self.weight = cfg, source, weights, cfg.loss_weight
        self.teacher = None if cfg.ema_teacher else copy.deepcopy(source).requires_grad_(False).eval()

    @torch.no_grad()
    def refresh(self) -> None:
        """The Gram teacher becomes a copy of the current EMA teacher (the official ``rep_update``)."""
        for gram, ema in zip(self.teacher.parameters(), self.source.parameters(), strict=True):
            gram.copy_(ema)

    def before_step(self, step: int) -> dict[str, float]:
        self.weight = self.weights[step] if self.weights is not None else self.cfg.loss_weight
        if self.cfg.refreshes_at(step):
            self.refresh()
        return {"gram_weight": self.weight}

    @torch.no_grad()
    def targets(self, crops: Tensor, grid: int) -> Tensor:
        """The Gram teacher's patch features of its (larger) crops, resized to the student's
        ``grid x grid`` patches: ``[2B, grid * grid, D]``."""
        tokens = self.teacher(crops, is_training=True)["x_norm_patchtokens"]
        side = int(round(tokens.shape[1] ** 0.5))
        if side != grid:
            maps = tokens.transpose(1, 2).unflatten(2, (side, side)).float()
            resize = {"align_corners": False} if self.cfg.resize_method in ("bicubic", "bilinear") else {}
            antialias = self.cfg.resize_antialias and self.cfg.resize_method in ("bicubic", "bilinear")
            maps = F.interpolate(maps, size=(grid, grid), mode=self.cfg.resize_method, antialias=antialias, **resize)
            tokens = maps.flatten(2).transpose(1, 2)
        return tokens

    def loss(
        self, student: Tensor, batch: dict, ema_patches: Tensor | None = None, positions: Tensor | None = None
    ) -> Tensor:
        """The Gram loss of the student's patch features of the global crops ``[2B, N, D]``;
        ``ema_patches``: the EMA teacher's of the same crops (with ``gram.ema_teacher``). ``positions``:
        when the student saw only some patches of each crop (I-JEPA's context), their ``[2B, K]`` grid
        indices; the teacher's features are taken there (student ``[2B, K, D]``)."""
        g = self.cfg
        if positions is None:
            grid = int(round(student.shape[1] ** 0.5))
            teacher = ema_patches if g.ema_teacher else self.targets(batch["gram"], grid)
        else:
            grid = batch["global"].shape[-1] // self.source.feature_stride  # the patch embedding floors
            full = ema_patches if g.ema_teacher else self.targets(batch["gram"], grid)
            teacher = full.gather(1, positions.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
        tokens = None
        if g.tokens_used != "all":
            tokens = batch["collated_masks"] if g.tokens_used == "masked" else ~batch["collated_masks"]
        return gram_loss(
            student,
            teacher,
            normalize=g.normalized,
            img_level=g.img_level,
            remove_neg=g.remove_neg,
            remove_only_teacher_neg=g.remove_only_teacher_neg,
            tokens=tokens,
        )
