"""The typed configuration of a training run, loaded from YAML presets with ``a.b=c`` overrides.

A preset may name another with ``base: <path relative to it>``; it is merged first. The defaults are the
official recipe's (docs/design/recipe.md §4.1, DINOv3 heads and schedules of §4.2); presets change what
differs. Each section is defined, and checks its own values, in the part that owns it (data/config.py,
recipes/config.py, recipes/gram.py, the loop's sections here); :meth:`TrainConfig.check` runs them all and
the rules that join sections, before anything is written.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from opendino.config import ConfigError, apply_overrides, build, check_choice, check_minima, load_yaml, merge, to_dict
from opendino.data.config import CropsConfig, DataConfig
from opendino.recipes import recipe_class
from opendino.recipes.config import (
    STUDENT_SECTIONS,
    DistillConfig,
    HeadConfig,
    InitConfig,
    LossConfig,
    ModelConfig,
)
from opendino.recipes.gram import INIT_TEACHER, PEAK_TEACHER, GramConfig
from opendino.recipes.ijepa import IJEPAConfig
from opendino.recipes.text import TextConfig
from opendino.schedules import LOOP_SCHEDULES, SCALING_RULES, ScheduleSpec


@dataclasses.dataclass
class RunConfig:
    dir: str = "runs/default"  # the run folder: config, metrics, TensorBoard, checkpoints, exported model


@dataclasses.dataclass
class OptimConfig:
    epochs: float = 100  # schedule length in epochs of `train.epoch_length` steps
    scaling_rule: str = "sqrt_wrt_1024"  # lr x 4 sqrt(global batch / 1024); or linear_wrt_256 (x batch/256), none
    clip_grad: float = 3.0  # max gradient norm per submodule (backbone, DINO head, iBOT head); 0: no clipping
    layerwise_decay: float = 0.9  # lr x decay^(depth - layer)
    patch_embed_lr_mult: float = 0.2  # extra lr multiplier of the patch embedding
    adamw_beta1: float = 0.9  # AdamW first-moment decay
    adamw_beta2: float = 0.999  # AdamW second-moment decay (0.99 for the 7B)

    def check(self) -> None:
        check_minima("optim", self, {"clip_grad": 0})
        check_choice("optim.scaling_rule", self.scaling_rule, SCALING_RULES)


def _default_schedules() -> dict[str, ScheduleSpec]:
    return {
        # the official default (no `schedules:` in a config) is the v1 shape (docs/design/recipe.md §3.6)
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
    # micro-batches of batch_size per optimizer step (gradient accumulation: a k-times batch on one device;
    # the batch-level terms, Sinkhorn-Knopp centring and KoLeo, are each micro-batch's own)
    accumulate: int = 1
    seed: int = 0  # weights, data order, crops and masks all follow from it
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile every block, head and (in one process) the loss region
    # Replay the whole step (forward, backward, clipping, AdamW, EMA) from one CUDA graph per batch shape
    # (train/capture.py): one GPU process, a recipe that declares its per-step scalars; else eager, said.
    # Pair with loss.pad_masked_rows=true
    capture: bool = False
    max_bad_steps: int = 3  # consecutive non-finite losses before the run stops
    # The training recipe (recipes/base.py): a name of opendino.recipes.RECIPES, or `module:Class`
    recipe: str = "ssl"

    def check(self) -> None:
        minima = {"steps": 1, "batch_size": 1, "epoch_length": 1, "max_bad_steps": 1, "accumulate": 1}
        check_minima("train", self, minima)
        recipe_class(self.recipe)
        if self.capture and self.compile:
            raise ConfigError("train.capture and train.compile: choose one (the captured step replays eager kernels)")


@dataclasses.dataclass
class ParallelConfig:
    """How a run spreads over the ranks torchrun starts (``opendino.train.parallel``)."""

    data_parallel: str = "ddp"  # ddp | fsdp (FSDP2: sharded parameters, gradients and optimizer state)
    activation_checkpointing: str = "none"  # none | selective | full
    param_dtype: str = "bf16"  # FSDP compute parameters: bf16 | fp32 (gradients are reduced in fp32)

    def check(self) -> None:
        check_choice("parallel.data_parallel", self.data_parallel, ("ddp", "fsdp"))
        check_choice("parallel.activation_checkpointing", self.activation_checkpointing, ("none", "selective", "full"))
        check_choice("parallel.param_dtype", self.param_dtype, ("bf16", "fp32"))


@dataclasses.dataclass
class CheckpointConfig:
    every: int = 500  # steps
    keep: int = 3  # newest checkpoints kept

    def check(self) -> None:
        check_minima("checkpoint", self, {"every": 1, "keep": 1})


@dataclasses.dataclass
class LogConfig:
    every: int = 10  # steps
    tensorboard: bool = True  # also write the metrics as TensorBoard scalars in tb/
    progress: bool = True  # a progress bar with ETA (on a terminal, rank 0)

    def check(self) -> None:
        check_minima("log", self, {"every": 1})


@dataclasses.dataclass
class MonitorConfig:
    """The dense-quality monitor (``opendino.train.monitor``) on held-out synthetic scenes."""

    every: int = 0  # steps; 0 = off; a multiple of log.every (its values join that step's record)
    n_fit: int = 256  # synthetic scenes the monitor's probes are fitted on
    n_eval: int = 128  # held-out scenes they are scored on
    size: int | None = None  # default: the global crop size
    dense: bool = True  # the dense probes above; off: only the recipe's own held-out metrics (text: zero-shot)
    # keep the monitored backbone of the best segmentation score as dense_peak.safetensors (a Gram teacher:
    # gram.checkpoint=dense_peak)
    keep_peak: bool = False

    def check(self) -> None:
        check_minima("monitor", self, {"every": 0})
        if self.keep_peak and not (self.every and self.dense):
            raise ConfigError(
                "monitor.keep_peak=true needs the dense monitor: monitor.every > 0 and monitor.dense=true"
            )


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
    text: TextConfig = dataclasses.field(default_factory=TextConfig)  # the text recipe's (train.recipe=text)
    ijepa: IJEPAConfig = dataclasses.field(default_factory=IJEPAConfig)  # the I-JEPA recipe's (train.recipe=ijepa)

    @property
    def total_steps(self) -> int:
        return self.train.steps if self.train.steps is not None else int(self.optim.epochs * self.train.epoch_length)

    def past_schedules_warning(self) -> str | None:
        """What to tell a user whose ``train.steps`` runs past the end of the schedules."""
        schedule_end = round(self.optim.epochs * self.train.epoch_length)
        if self.total_steps <= schedule_end:
            return None
        return (
            f"warning: train.steps={self.total_steps} runs past the end of the schedules (optim.epochs="
            f"{self.optim.epochs:g} x train.epoch_length={self.train.epoch_length} = {schedule_end} steps): later "
            "steps keep their end values (lr at its end, momentum at its end: the teacher may stop moving); "
            "lengthen a run with optim.epochs"
        )

    def frozen_backbone_warning(self) -> str | None:
        """What to tell a user whose run ends before its backbone starts training (``init.head_warmup_steps``)."""
        if self.init.head_warmup_steps < self.total_steps:
            return None
        return (
            f"note: init.head_warmup_steps={self.init.head_warmup_steps} >= train.steps={self.total_steps}: the "
            "backbone stays frozen for the whole run (only the heads train)"
        )

    def check(self) -> None:
        """Every section's own check, then the rules that join sections (exit code 2, nothing written)."""
        for f in dataclasses.fields(self):
            check = getattr(getattr(self, f.name), "check", None)
            if check is not None:
                check()
        if self.gram.checkpoint == PEAK_TEACHER and not self.init.from_run:
            raise ConfigError(
                f"gram.checkpoint={PEAK_TEACHER} reads the peak of the run this stage continues: set init.from_run"
            )
        if self.gram.checkpoint == INIT_TEACHER and not self.init.backbone:
            raise ConfigError(f"gram.checkpoint={INIT_TEACHER} anchors to the starting model: set init.backbone")
        channels = self.model.in_chans
        if len(self.crops.mean) != channels or len(self.crops.std) != channels:
            raise ConfigError(
                f"crops.mean has {len(self.crops.mean)} and crops.std {len(self.crops.std)} values but model.in_chans="
                f"{channels}: give one per channel (`opendino data stats PATH --channels {channels}` measures them)"
            )
        if channels != 3 and self.monitor.every and self.monitor.dense:
            raise ConfigError(
                f"the dense monitor scores RGB synthetic scenes; model.in_chans={channels}: set monitor.dense=false"
            )
        if self.monitor.every % self.log.every:
            raise ConfigError(f"monitor.every={self.monitor.every} must be a multiple of log.every={self.log.every}")
        recipe = recipe_class(self.train.recipe)
        known = {*LOOP_SCHEDULES, *recipe.REQUIRED_SCHEDULES, *recipe.OPTIONAL_SCHEDULES}
        if unknown := sorted(set(self.schedules) - known):
            raise ConfigError(f"unknown schedules {unknown}; valid: {sorted(known)}")
        if missing := sorted({*LOOP_SCHEDULES, *recipe.REQUIRED_SCHEDULES} - set(self.schedules)):
            raise ConfigError(f"schedules: {missing} missing (a preset's schedules replace the defaults whole)")
        recipe.check_config(self)
        if self.data.crops_on_device:  # images are reduced to max_image_side before their crops are cut
            rows = self.crops.size_sets(self.gram.crop_scale)
            largest = max(max(row[0], row[2] if self.gram.needs_crops else 0) for row in rows)
            if self.data.max_image_side < largest:
                raise ConfigError(
                    f"data.max_image_side={self.data.max_image_side} is below the largest crop ({largest:g} px): "
                    f"its crops would be upsampled; set data.max_image_side={round(largest)} or more"
                )


# Mappings that are one value, not a section: a model's constructor arguments belong to its `arch`, so an
# update (a preset over its base, a student, an override) replaces them whole.
DICT_VALUES = frozenset({"model.kwargs"})
# ... and a preset's `schedules` are a complete set.
WHOLE_VALUES = DICT_VALUES | {"schedules"}


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
    cfg.check()
    return cfg


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
        configs[name].check()
    return configs


REFERENCE_INTRO = """Every key of `opendino train` (and `opendino submit`), its type, its default (the official
recipe's, docs/design/recipe.md §4.1) and what it means. Presets in `configs/` change what differs; any key can be
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
