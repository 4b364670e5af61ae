"""The configuration sections of the DINOv3 SSL recipe (and distillation, which is the same recipe with a
frozen teacher): the backbone, the two heads, the loss, the initialisation and distillation. Each
section checks its own values; ``gram`` is the Gram-anchoring component's (recipes/gram.py)."""

from __future__ import annotations

import dataclasses

from torch import nn

from opendino.config import ConfigError, check_choice, check_minima


@dataclasses.dataclass
class ModelConfig:
    arch: str = "vit_large"  # a name of `opendino models`
    kwargs: dict = dataclasses.field(default_factory=dict)  # constructor overrides (custom sizes)
    drop_path_rate: float = 0.3  # stochastic depth of the student
    # input channels (multispectral, microscopy); crops.mean and crops.std then need as many values, and a
    # 3-channel init.backbone is fitted by init.new_channels
    in_chans: int = 3

    def check(self) -> None:
        from opendino.models.registry import MODELS, UnknownModelError, get_spec

        check_minima("model", self, {"in_chans": 1})
        if "in_chans" in self.kwargs:
            raise ConfigError("model.kwargs.in_chans: set model.in_chans instead (one home for the channel count)")

        if self.arch not in MODELS:
            try:
                get_spec(self.arch)
            except UnknownModelError as e:
                raise ConfigError(f"model.arch: {e}") from None

    def build(self) -> nn.Module:
        """The backbone this section describes, freshly initialised, with the student's stochastic depth."""
        from opendino.models import build_model

        kwargs = {"drop_path_rate": self.drop_path_rate, "in_chans": self.in_chans}
        return build_model(self.arch, **{**kwargs, **self.kwargs})


@dataclasses.dataclass
class HeadConfig:
    prototypes: int = 65536  # K, the number of prototypes (the output size)
    hidden_dim: int = 2048  # width of the MLP's hidden layers
    bottleneck_dim: int = 256  # the L2-normalised bottleneck before the prototypes
    nlayers: int = 3  # linear layers of the MLP, the last one projecting to the bottleneck
    last_layer_std: float = 0.02  # the official init; larger helps tiny, short runs (see docs/training.md)
    weight_norm: bool = False  # a weight-normalised prototype layer (DINOv2, Franca; DINOv3: plain)
    # Franca-style nested (Matryoshka) heads: this many levels of widths D/2^(n-1) ... D, each with its own
    # head and prototypes/2^(n-1) ... prototypes; their losses are summed (0: one head)
    nested_levels: int = 0
    nested_mode: str = "projection"  # projection (Franca's code: a learned D -> d_i) | prefix (the paper's slices)
    normalize: bool = True  # L2-normalise the bottleneck (Franca's nested heads: false)
    bottleneck_gelu: bool = False  # a GELU after the bottleneck layer (Franca's nested heads: true)

    def check(self) -> None:
        check_minima("head", self, {"prototypes": 1, "nlayers": 1, "nested_levels": 0})
        check_choice("head.nested_mode", self.nested_mode, ("projection", "prefix"))
        if self.nested_levels and self.prototypes % 2 ** (self.nested_levels - 1):
            raise ConfigError(
                f"head.prototypes={self.prototypes} must be divisible by 2^(nested_levels - 1) = "
                f"{2 ** (self.nested_levels - 1)}"
            )

    def build(self, in_dim: int) -> nn.Module:
        """The head this section describes, on a backbone of width ``in_dim``."""
        from opendino.models.heads import DINOHead, MatryoshkaHead

        kwargs = dict(
            hidden_dim=self.hidden_dim,
            bottleneck_dim=self.bottleneck_dim,
            nlayers=self.nlayers,
            last_layer_std=self.last_layer_std,
            normalize=self.normalize,
            bottleneck_gelu=self.bottleneck_gelu,
            weight_norm=self.weight_norm,
        )
        if self.nested_levels:
            return MatryoshkaHead(in_dim, self.prototypes, self.nested_levels, self.nested_mode, **kwargs)
        return DINOHead(in_dim, self.prototypes, **kwargs)


@dataclasses.dataclass
class LossConfig:
    dino_weight: float = 1.0  # weight of the DINO (CLS) loss
    koleo_weight: float = 0.1  # weight of the KoLeo spreading term on the CLS tokens
    ibot_weight: float = 1.0  # weight of the iBOT (masked patch) loss
    global_ignore_diagonal: bool = True  # a global crop is not its own DINO target
    student_temp: float = 0.1  # softmax temperature of the student's logits
    # The teacher's targets: sinkhorn (Sinkhorn-Knopp, DINOv3; DINOv2 L/g) | softmax (softmax around an EMA
    # centre, DINO / the DINOv2 default)
    centering: str = "sinkhorn"
    center_momentum: float = 0.9  # softmax centring: the centre's EMA momentum
    # 0: no centring, the teacher's own softmax (not official; for a frozen distillation teacher only)
    sinkhorn_iterations: int = 3
    shared_head: bool = False  # iBOT uses the DINO head (the DINOv2 default; ibot_head is then unused)
    mask_ratio: tuple[float, ...] = (0.1, 0.5)  # iBOT: masked share of tokens, spread over the masked crops
    mask_probability: float = 0.5  # share of global crops that are masked
    # iBOT's masked rows padded to the most a batch of this size can mask (padding rows weigh 0; the loss is
    # unchanged): fixed shapes every step, for train.compile without recompiles and for captured steps
    pad_masked_rows: bool = False
    # KoLeo neighbours: 0 = within each rank's crops (official pretraining); N = within contiguous groups
    # of N samples of the global batch, gathered across ranks (high-resolution stage: 16); -1 = the whole
    # global batch (the same loss at any world size).
    koleo_group_size: int = 0

    def check(self) -> None:
        check_minima("loss", self, {"sinkhorn_iterations": 0})
        check_choice("loss.centering", self.centering, ("sinkhorn", "softmax"))


@dataclasses.dataclass
class InitConfig:
    # continue pretraining from released / earlier weights, a file or a run folder (its EMA teacher), with fresh heads
    backbone: str | None = None
    # Not official: a shallower ViT takes only these blocks of `backbone` (default: the distillation
    # teacher's), in this order; layer selection as in DistilBERT (Sanh et al. 2019). Consecutive blocks
    # worked better than every other block at demo scale (docs/distillation.md).
    backbone_blocks: list[int] | None = None
    head_warmup_steps: int = 0  # backbone frozen (lr 0) for the first steps
    # ... then its lr ramped linearly from 0 to the schedule's over this many steps (layer-wise decay kept)
    backbone_ramp_steps: int = 0
    # a C-channel init.backbone (released: 3) in a model of model.in_chans = N channels: mean (the new
    # channels' filters are the mean of the file's, the whole filter rescaled by C/N) | zero (new filters
    # zero: the file's features exactly, whatever the new channels hold); models/channels.py
    new_channels: str = "mean"
    # Start a stage from an earlier run folder (its newest checkpoint):
    #   continue: models, heads, optimizer and step counter carry on (Gram anchoring after pretraining);
    #   teacher: student and EMA teacher both start from its EMA teacher with heads, fresh optimizer and
    #            schedule (high-resolution adaptation).
    from_run: str | None = None
    from_mode: str = "continue"  # continue | teacher (above)

    def check(self) -> None:
        from opendino.models.channels import NEW_CHANNEL_RULES

        check_minima("init", self, {"head_warmup_steps": 0, "backbone_ramp_steps": 0})
        check_choice("init.new_channels", self.new_channels, NEW_CHANNEL_RULES)
        check_choice("init.from_mode", self.from_mode, ("continue", "teacher"))


@dataclasses.dataclass
class DistillConfig:
    """Distillation (docs/design/recipe.md §4.6): a frozen trained teacher replaces the EMA teacher as the
    source of targets; the student sees unmasked global crops, the iBOT term uses the sampled positions; the
    EMA of the student is kept and exported."""

    teacher: str | None = None  # a run folder (its newest checkpoint: backbone and heads); set = distill
    # Several students sharing one teacher forward pass per batch: one mapping per student with a `name`
    # and overrides of STUDENT_SECTIONS; each gets the sub-folder <run.dir>/<name>.
    students: list[dict] = dataclasses.field(default_factory=list)
    # Not official: the student's global crops masked at the iBOT positions too (masked-image modelling
    # against the teacher's targets), as in SSL pretraining.
    mask_student: bool = False


# What each student of a multi-student distillation may set for itself; all else is shared.
STUDENT_SECTIONS = ("model", "dino_head", "ibot_head", "optim", "schedules", "init")
