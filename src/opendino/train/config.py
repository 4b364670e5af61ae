"""The typed configuration of a training run, loaded from YAML presets with ``a.b=c`` overrides.

A preset may name another with ``base: <path relative to it>``; it is merged first. The defaults below are
the official recipe's (recipe.md §4.1, DINOv3 heads and schedules of §4.2); presets change what differs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from opendino.config import ConfigError, apply_overrides, build, load_yaml, merge, to_dict
from opendino.train.schedules import SCALING_RULES, ScheduleSpec


@dataclasses.dataclass
class RunConfig:
    dir: str = "runs/default"  # the run folder: config, metrics, TensorBoard, checkpoints, exported model


@dataclasses.dataclass
class DataConfig:
    source: str | None = None  # folder | list | tar | synthetic; None: detected from `path` (none: synthetic)
    path: str | None = None  # an image folder, a file list (txt/csv) or a folder of tar shards
    synthetic_n: int = 100_000  # scenes in the synthetic training set
    synthetic_size: int = 128  # their rendering size in pixels
    num_workers: int = 0  # data-loading processes (decode, crops, masks); 0 = in the training process
    photometric_on_device: bool = False  # collate uint8 crops, distort them batched on the device
    # Workers only decode and draw crop boxes; the crops are cut batched on the device (needs
    # photometric_on_device).
    crops_on_device: bool = False
    max_image_side: int = 1024  # with crops_on_device: larger images are reduced to it first (>= the largest crop)


@dataclasses.dataclass
class ModelConfig:
    arch: str = "vit_large"  # a name of `opendino models`
    kwargs: dict = dataclasses.field(default_factory=dict)  # constructor overrides (custom sizes)
    drop_path_rate: float = 0.3  # stochastic depth of the student


@dataclasses.dataclass
class HeadConfig:
    prototypes: int = 65536  # K, the number of prototypes (the output size)
    hidden_dim: int = 2048  # width of the MLP's hidden layers
    bottleneck_dim: int = 256  # the L2-normalised bottleneck before the prototypes
    nlayers: int = 3  # linear layers of the MLP, the last one projecting to the bottleneck
    last_layer_std: float = 0.02  # the official init; larger helps tiny, short runs (see docs/training.md)


@dataclasses.dataclass
class CropsConfig:
    global_size: int = 224  # pixels
    local_size: int = 96  # pixels
    n_local: int = 8  # local crops per image (2 global crops always)
    global_scale: tuple[float, ...] = (0.32, 1.0)  # RandomResizedCrop area range
    local_scale: tuple[float, ...] = (0.05, 0.32)  # RandomResizedCrop area range
    horizontal_flips: bool = True  # random horizontal flips of every crop (p = 0.5)
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)  # normalisation (satellite models use their own)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)  # normalisation, with mean
    # High-resolution adaptation (recipe.md §4.4): rows of [global, local, Gram teacher, probability]; one
    # row is drawn per step (the same on every rank). Empty: the single set above.
    resolution_sets: list[list[float]] = dataclasses.field(default_factory=list)
    # Distillation into a coarser student (stride-32 ConvNeXt from a patch-16 teacher: 2.0): the teacher
    # sees the global crops downscaled by this factor, so its token grid (and the iBOT mask grid) is the
    # student's output grid.
    teacher_to_student_resolution_scale: float = 1.0


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


@dataclasses.dataclass
class OptimConfig:
    epochs: float = 100  # schedule length in epochs of `train.epoch_length` steps
    scaling_rule: str = "sqrt_wrt_1024"  # lr x 4 sqrt(global batch / 1024); or linear_wrt_256 (x batch/256), none
    clip_grad: float = 3.0  # max gradient norm per submodule (backbone, DINO head, iBOT head); 0: no clipping
    layerwise_decay: float = 0.9  # lr x decay^(depth - layer)
    patch_embed_lr_mult: float = 0.2  # extra lr multiplier of the patch embedding
    adamw_beta1: float = 0.9  # AdamW first-moment decay
    adamw_beta2: float = 0.999  # AdamW second-moment decay (0.99 for the 7B)


def _default_schedules() -> dict[str, ScheduleSpec]:
    return {
        # the official default (no `schedules:` in a config) is the v1 shape (recipe.md §3.6)
        "lr": ScheduleSpec(0.0, 1e-3, 1e-6, warmup_epochs=10, freeze_last_layer_epochs=1, shape="v1"),
        "weight_decay": ScheduleSpec(0.04, 0.04, 0.4, shape="v1"),
        "teacher_temp": ScheduleSpec(0.04, 0.07, 0.07, warmup_epochs=30, shape="v1"),
        "momentum": ScheduleSpec(0.992, 0.992, 1.0, shape="v1"),
    }


@dataclasses.dataclass
class TrainLoopConfig:
    batch_size: int = 64  # images per rank
    epoch_length: int = 1250  # steps per "epoch" of the schedules (not a pass over the data)
    steps: int | None = None  # run length; default: optim.epochs * epoch_length
    seed: int = 0  # weights, data order, crops and masks all follow from it
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile every block, head and (in one process) the loss region
    max_bad_steps: int = 3  # consecutive non-finite losses before the run stops


@dataclasses.dataclass
class ParallelConfig:
    """How a run spreads over the ranks torchrun starts (``opendino.train.parallel``)."""

    data_parallel: str = "ddp"  # ddp | fsdp (FSDP2: sharded parameters, gradients and optimizer state)
    activation_checkpointing: str = "none"  # none | selective | full
    param_dtype: str = "bf16"  # FSDP compute parameters: bf16 | fp32 (gradients are reduced in fp32)


@dataclasses.dataclass
class CheckpointConfig:
    every: int = 500  # steps
    keep: int = 3  # newest checkpoints kept


@dataclasses.dataclass
class LogConfig:
    every: int = 10  # steps
    tensorboard: bool = True  # also write the metrics as TensorBoard scalars in tb/
    progress: bool = True  # a progress bar with ETA (on a terminal, rank 0)


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


@dataclasses.dataclass
class GramConfig:
    """Gram anchoring (recipe.md §2.6, §4.3): a frozen Gram teacher, its crops and the refresh rule."""

    enabled: bool = False  # add the Gram anchoring loss (a stage of its own, recipe.md §2.6)
    loss_weight: float = 1.0  # used when the preset has no `schedules.gram_loss_weight`
    checkpoint: str | None = None  # the Gram teacher: a backbone file or run folder; default: the EMA teacher
    refresh_from: int | None = None  # copy the EMA teacher into the Gram teacher at this step ...
    refresh_every: int = 0  # ... and every k steps after it ...
    max_refreshes: int = 1  # ... this many times in all
    crop_scale: float = 2.0  # Gram-teacher crops at this multiple of the global crop size
    no_distortions: bool = True  # its crops without photometric distortion
    img_level: bool = False  # one Gram over all tokens of the batch (official default); true: one per image
    normalized: bool = True  # L2-normalise patch features before the Gram matrices
    remove_neg: bool = False  # zero the negative entries of both Gram matrices
    remove_only_teacher_neg: bool = False  # zero the negative entries of the teacher's Gram only

    def refreshes_at(self, step: int) -> bool:
        if self.refresh_from is None or step < self.refresh_from:
            return False
        k, rest = divmod(step - self.refresh_from, self.refresh_every or 1)
        return rest == 0 and k < self.max_refreshes and (self.refresh_every > 0 or k == 0)


@dataclasses.dataclass
class DistillConfig:
    """Distillation (recipe.md §4.6): a frozen trained teacher replaces the EMA teacher as the source of
    targets; the student sees unmasked global crops, the iBOT term uses the sampled positions; the EMA of
    the student is kept and exported."""

    teacher: str | None = None  # a run folder (its newest checkpoint: backbone and heads); set = distill
    # Several students sharing one teacher forward pass per batch: one mapping per student with a `name`
    # and overrides of STUDENT_SECTIONS; each gets the sub-folder <run.dir>/<name>.
    students: list[dict] = dataclasses.field(default_factory=list)
    # Not official: the student's global crops masked at the iBOT positions too (masked-image modelling
    # against the teacher's targets), as in SSL pretraining.
    mask_student: bool = False


STUDENT_SECTIONS = ("model", "dino_head", "ibot_head", "optim", "schedules", "init")


@dataclasses.dataclass
class MonitorConfig:
    """The dense-quality monitor (``opendino.train.monitor``) on held-out synthetic scenes."""

    every: int = 0  # steps; 0 = off; a multiple of log.every (its values join that step's record)
    n_fit: int = 256  # synthetic scenes the monitor's probes are fitted on
    n_eval: int = 128  # held-out scenes they are scored on
    size: int | None = None  # default: the global crop size


@dataclasses.dataclass
class TrainConfig:
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    dino_head: HeadConfig = dataclasses.field(default_factory=HeadConfig)
    ibot_head: HeadConfig = dataclasses.field(default_factory=HeadConfig)
    crops: CropsConfig = dataclasses.field(default_factory=CropsConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    schedules: dict[str, ScheduleSpec] = dataclasses.field(default_factory=_default_schedules)
    train: TrainLoopConfig = dataclasses.field(default_factory=TrainLoopConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    init: InitConfig = dataclasses.field(default_factory=InitConfig)
    gram: GramConfig = dataclasses.field(default_factory=GramConfig)
    monitor: MonitorConfig = dataclasses.field(default_factory=MonitorConfig)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)

    @property
    def total_steps(self) -> int:
        return self.train.steps if self.train.steps is not None else int(self.optim.epochs * self.train.epoch_length)

    @property
    def crop_size_sets(self) -> list[list[float]]:
        """``[global, local, Gram teacher, probability]`` per crop-size set: ``crops.resolution_sets``, else the
        crop sizes as one set."""
        c = self.crops
        return c.resolution_sets or [[c.global_size, c.local_size, c.global_size * self.gram.crop_scale, 1.0]]


# Mappings that are one value, not a section: a model's constructor arguments belong to its `arch`, so an
# update (a preset over its base, a student, an override) replaces them whole.
DICT_VALUES = frozenset({"model.kwargs"})


def _read_preset(path: Path) -> dict:
    data = load_yaml(path)
    base = data.pop("base", None)
    return merge(_read_preset((path.parent / base).resolve()), data, DICT_VALUES) if base else data


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Defaults <- preset (and its bases) <- overrides, type-checked."""
    tree = to_dict(TrainConfig())
    if path is not None:
        preset = _read_preset(Path(path))
        unknown_sections = set(preset) - set(tree)
        if unknown_sections:
            build(TrainConfig, {k: {} for k in unknown_sections})  # raises with the closest names
        # `schedules` replaces the defaults as a whole: a preset's schedule set is complete.
        schedules = preset.pop("schedules", None)
        tree = merge(tree, preset, DICT_VALUES)
        if schedules is not None:
            tree["schedules"] = schedules
    tree = apply_overrides(tree, [o for o in overrides if not o.startswith("schedules.")], values=DICT_VALUES)
    tree = apply_overrides(tree, [o for o in overrides if o.startswith("schedules.")], allow_new=True)
    cfg = build(TrainConfig, tree)
    check_values(cfg)
    return cfg


PARALLEL_CHOICES = {
    "data_parallel": ("ddp", "fsdp"),
    "activation_checkpointing": ("none", "selective", "full"),
    "param_dtype": ("bf16", "fp32"),
}
# (key, smallest valid value): counts and periods that a run cannot use below it
MINIMA = (
    ("train.steps", 1),
    ("train.batch_size", 1),
    ("train.epoch_length", 1),
    ("train.max_bad_steps", 1),
    ("checkpoint.every", 1),
    ("checkpoint.keep", 1),
    ("log.every", 1),
    ("monitor.every", 0),
    ("data.num_workers", 0),
    ("data.synthetic_n", 1),
    ("data.max_image_side", 1),
    ("loss.sinkhorn_iterations", 0),
    ("optim.clip_grad", 0),
    ("init.head_warmup_steps", 0),
)


def check_values(cfg: TrainConfig) -> None:
    """Values of the right type that no run can use are configuration errors (exit code 2), before any
    file is written."""
    for key, minimum in MINIMA:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None and value < minimum:
            raise ConfigError(f"{key}={value}: must be {minimum} or more")
    from opendino.data.sources import SOURCES
    from opendino.models.registry import MODELS, UnknownModelError, get_spec

    if cfg.model.arch not in MODELS:
        try:
            get_spec(cfg.model.arch)
        except UnknownModelError as e:
            raise ConfigError(f"model.arch: {e}") from None

    data = cfg.data
    if data.source is not None and data.source not in SOURCES:
        raise ConfigError(f"data.source={data.source!r}; valid: {', '.join(SOURCES)} (or null: from data.path)")
    if data.source == "synthetic" and data.path is not None:
        raise ConfigError(
            f"data.path={data.path} with data.source=synthetic: give one "
            "(data.source=null takes the kind from the path)"
        )
    if data.source not in (None, "synthetic") and data.path is None:
        raise ConfigError(f"data.source={data.source} needs data.path")
    if data.crops_on_device and not data.photometric_on_device:
        raise ConfigError(
            "data.crops_on_device needs data.photometric_on_device=true (crops are distorted where they are cut)"
        )
    if cfg.init.from_mode not in ("continue", "teacher"):
        raise ConfigError(f"init.from_mode={cfg.init.from_mode!r}; valid: continue, teacher")
    if cfg.optim.scaling_rule not in SCALING_RULES:
        raise ConfigError(f"optim.scaling_rule={cfg.optim.scaling_rule!r}; valid: {', '.join(SCALING_RULES)}")
    for key, valid in PARALLEL_CHOICES.items():
        value = getattr(cfg.parallel, key)
        if value not in valid:
            raise ConfigError(f"parallel.{key}={value!r}; valid: {', '.join(valid)}")
    if cfg.monitor.every % cfg.log.every:
        raise ConfigError(f"monitor.every={cfg.monitor.every} must be a multiple of log.every={cfg.log.every}")
    for row in cfg.crops.resolution_sets:
        if len(row) != 4 or any(not isinstance(v, (int, float)) or v < 0 for v in row):
            raise ConfigError(
                f"crops.resolution_sets row {row}: need [global, local, Gram teacher, probability], none negative"
            )
    if cfg.crops.resolution_sets and not sum(row[3] for row in cfg.crops.resolution_sets) > 0:
        raise ConfigError("crops.resolution_sets: the probabilities (4th column) sum to 0")
    if data.crops_on_device:  # images are reduced to max_image_side before their crops are cut
        largest = max(max(row[0], row[2] if cfg.gram.enabled else 0) for row in cfg.crop_size_sets)
        if data.max_image_side < largest:
            raise ConfigError(
                f"data.max_image_side={data.max_image_side} is below the largest crop ({largest:g} px): its crops "
                f"would be upsampled; set data.max_image_side={round(largest)} or more"
            )


def student_configs(cfg: TrainConfig) -> dict[str, TrainConfig]:
    """The configuration of each student of a multi-student distillation: the run's, with the student's
    overrides (only of STUDENT_SECTIONS: data, crops, masks, steps and logging are shared by all)."""
    base = to_dict(cfg)
    base["distill"]["students"] = []
    configs: dict[str, TrainConfig] = {}
    for i, entry in enumerate(cfg.distill.students):
        entry = dict(entry)
        name = entry.pop("name", None)
        if not name or not isinstance(name, str) or "/" in name:
            raise ConfigError(f"distill.students[{i}]: needs a `name` (a folder name), got {name!r}")
        if name in configs:
            raise ConfigError(f"distill.students[{i}]: the name {name!r} is used twice")
        shared = sorted(set(entry) - set(STUDENT_SECTIONS))
        if shared:
            raise ConfigError(
                f"distill.students[{i}] ({name}) sets {shared}: shared by all students; a student may set "
                f"{', '.join(STUDENT_SECTIONS)}"
            )
        tree = merge(base, entry, DICT_VALUES)
        tree["run"]["dir"] = str(Path(cfg.run.dir) / name)
        configs[name] = build(TrainConfig, tree)
    return configs


REFERENCE_INTRO = """Every key of `opendino train` (and `opendino submit`), its type, its default (the official
recipe's, recipe.md §4.1) and what it means. Presets in `configs/` change what differs; any key can be
overridden on the command line as `section.key=value` (values are YAML: `crops.global_scale=[0.4,1.0]`).
`opendino config PRESET [overrides]` prints the resolved configuration of a run.

`schedules` maps names to schedules in epochs — `lr` (with `freeze_last_layer_epochs`), `weight_decay`,
`teacher_temp`, `momentum` and optionally `dino_local_loss_weight` and `gram_loss_weight` — each
`{start, peak, end, warmup_epochs, cosine_epochs, freeze_last_layer_epochs, shape}` (`shape: v2` the
DINOv3 warm-up / cosine / constant, `v1` the DINOv2-style cosine); a preset's `schedules` replaces the
defaults as a whole.

This file is generated: `opendino config --reference > docs/configuration.md` (a test checks it is current)."""


def reference_markdown() -> str:
    from opendino.config import reference

    return reference(TrainConfig, "Configuration reference", REFERENCE_INTRO)


__all__ = ["ConfigError", "TrainConfig", "load_train_config", "reference_markdown", "student_configs"]
