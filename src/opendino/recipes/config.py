"""The configuration sections of the DINOv3 SSL recipe (and distillation, which is the same recipe with a
frozen teacher): the backbone, the two heads, the loss, the initialisation and distillation. Each
section checks its own values; ``gram`` is the Gram-anchoring component's (recipes/gram.py)."""

from __future__ import annotations

import dataclasses

from opendino.config import ConfigError, check_choice, check_minima


@dataclasses.dataclass
class ModelConfig:
    arch: str = "vit_large"  # a name of `opendino models`
    kwargs: dict = dataclasses.field(default_factory=dict)  # constructor overrides (custom sizes)
    drop_path_rate: float = 0.3  # stochastic depth of the student

    def check(self) -> None:
        from opendino.models.registry import MODELS, UnknownModelError, get_spec

        if self.arch not in MODELS:
            try:
                get_spec(self.arch)
            except UnknownModelError as e:
                raise ConfigError(f"model.arch: {e}") from None


@dataclasses.dataclass
class HeadConfig:
    prototypes: int = 65536  # K, the number of prototypes (the output size)
    hidden_dim: int = 2048  # width of the MLP's hidden layers
    bottleneck_dim: int = 256  # the L2-normalised bottleneck before the prototypes
    nlayers: int = 3  # linear layers of the MLP, the last one projecting to the bottleneck
    last_layer_std: float = 0.02  # the official init; larger helps tiny, short runs (see docs/training.md)


@dataclasses.dataclass
class LossConfig:
    dino_weight: float = 1.0  # weight of the DINO (CLS) loss
    koleo_weight: float = 0.1  # weight of the KoLeo spreading term on the CLS tokens
    ibot_weight: float = 1.0  # weight of the iBOT (masked patch) loss
    global_ignore_diagonal: bool = True  # a global crop is not its own DINO target
    student_temp: float = 0.1  # softmax temperature of the student's logits
    # 0: no centring, the teacher's own softmax (not official; for a frozen distillation teacher only)
    sinkhorn_iterations: int = 3
    mask_ratio: tuple[float, ...] = (0.1, 0.5)  # iBOT: masked share of tokens, spread over the masked crops
    mask_probability: float = 0.5  # share of global crops that are masked
    # KoLeo neighbours: 0 = within each rank's crops (official pretraining); N = within contiguous groups
    # of N samples of the global batch, gathered across ranks (high-resolution stage: 16); -1 = the whole
    # global batch (the same loss at any world size).
    koleo_group_size: int = 0

    def check(self) -> None:
        check_minima("loss", self, {"sinkhorn_iterations": 0})


@dataclasses.dataclass
class InitConfig:
    # continue pretraining from released / earlier weights, a file or a run folder (its EMA teacher), with fresh heads
    backbone: str | None = None
    # Not official: a shallower ViT takes only these blocks of `backbone` (default: the distillation
    # teacher's), in this order; layer selection as in DistilBERT (Sanh et al. 2019). Consecutive blocks
    # worked better than every other block at demo scale (docs/distillation.md).
    backbone_blocks: list[int] | None = None
    head_warmup_steps: int = 0  # backbone frozen (lr 0) for the first steps
    # Start a stage from an earlier run folder (its newest checkpoint):
    #   continue: models, heads, optimizer and step counter carry on (Gram anchoring after pretraining);
    #   teacher: student and EMA teacher both start from its EMA teacher with heads, fresh optimizer and
    #            schedule (high-resolution adaptation).
    from_run: str | None = None
    from_mode: str = "continue"  # continue | teacher (above)

    def check(self) -> None:
        check_minima("init", self, {"head_warmup_steps": 0})
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
