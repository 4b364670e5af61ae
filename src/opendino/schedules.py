"""Per-iteration schedules of the official recipe (docs/design/recipe.md §3.6, §3.7).

v1 (``cosine_schedule``, DINOv2-style configs): optional frozen start, a linear warm-up that includes
its end point, then a cosine to ``final`` that never quite reaches it (with ``trunc_extra > 0``: the
first part of a longer cosine, rescaled to end exactly at ``final``); past the end, ``final``.
v2 (``linear_warmup_cosine_decay``, all DINOv3 configs): a warm-up that excludes its end point, a cosine
from ``peak`` to ``end`` over ``cosine_iterations`` (or the rest) that reaches ``end``, then constant.
An "epoch" is ``epoch_length`` iterations (the official ``OFFICIAL_EPOCH_LENGTH``), unrelated to the data.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

SCALING_RULES = ("sqrt_wrt_1024", "linear_wrt_256", "none")


def scale_lr(lr: float, rule: str, batch_size_per_rank: int, world_size: int) -> float:
    """The learning-rate scaling rule on the global batch."""
    global_batch = batch_size_per_rank * world_size
    if rule == "sqrt_wrt_1024":
        return lr * 4 * math.sqrt(global_batch / 1024)
    if rule == "linear_wrt_256":
        return lr * global_batch / 256
    if rule == "none":
        return lr
    raise ValueError(f"scaling_rule={rule!r}; valid: {', '.join(SCALING_RULES)}")


class Schedule:
    """A per-iteration array that holds its final value past its end."""

    def __init__(self, values: np.ndarray, final_value: float | None = None) -> None:
        self.values = np.asarray(values, dtype=np.float64)
        self.final_value = float(self.values[-1] if final_value is None else final_value)

    def __getitem__(self, it: int) -> float:
        return float(self.values[it]) if it < len(self.values) else self.final_value

    def __len__(self) -> int:
        return len(self.values)


def cosine_schedule(
    base_value: float,
    final_value: float,
    total_iters: int,
    warmup_iters: int = 0,
    start_warmup_value: float = 0.0,
    freeze_iters: int = 0,
    trunc_extra: float = 0.0,
) -> Schedule:
    """The v1 schedule."""
    freeze = np.zeros(freeze_iters)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    n = total_iters - warmup_iters - freeze_iters
    if n <= 0:
        cosine = np.zeros(0)
    elif trunc_extra == 0.0:
        cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * np.arange(n) / n))
    else:
        raw = 0.5 * (1 + np.cos(np.linspace(0, np.pi, int((1 + trunc_extra) * n))))[:n]
        raw = (raw - raw.min()) / (raw.max() - raw.min())
        cosine = final_value + (base_value - final_value) * raw
    return Schedule(np.concatenate([freeze, warmup, cosine]), final_value)


def linear_warmup_cosine_decay(
    start: float,
    peak: float,
    end: float,
    warmup_iterations: int,
    total_iterations: int,
    cosine_iterations: int | None = None,
) -> np.ndarray:
    """The v2 schedule (``peak = 0 < end`` gives a cosine ramp-up)."""
    warmup = np.linspace(start, peak, warmup_iterations, endpoint=False)
    # A run shorter than its warm-up simply ends inside it.
    n_cosine = max(total_iterations - warmup_iterations, 0) if cosine_iterations is None else cosine_iterations
    cosine = (peak - end) * (np.cos(np.linspace(0, np.pi, n_cosine)) + 1) / 2 + end
    constant = np.full(max(total_iterations - warmup_iterations - n_cosine, 0), end)
    return np.concatenate([warmup, cosine, constant])[:total_iterations]


@dataclasses.dataclass
class ScheduleSpec:
    """One schedule in epochs: ``shape: v2`` as in the DINOv3 stage presets, ``shape: v1`` for the
    DINOv2-style cosine of the ImageNet fast setup (warm-up ``start -> peak``, then cosine to ``end``)."""

    start: float
    peak: float
    end: float
    warmup_epochs: float = 0
    cosine_epochs: float | None = None
    freeze_last_layer_epochs: float = 0
    shape: str = "v2"

    def __post_init__(self) -> None:
        if self.shape not in ("v1", "v2"):
            raise ValueError(f"schedule shape {self.shape!r}; valid: v1, v2")
        if self.shape == "v1" and self.cosine_epochs is not None:
            raise ValueError("cosine_epochs is a v2 setting; a v1 cosine always runs to the end")

    def array(self, total_epochs: float, epoch_length: int, scale: float = 1.0) -> np.ndarray:
        """``scale`` (the lr scaling rule) multiplies ``peak`` and, in v2 only, ``end``; never ``start``."""
        if self.shape == "v1":
            total = int(total_epochs * epoch_length)
            return cosine_schedule(
                self.peak * scale, self.end, total, int(self.warmup_epochs * epoch_length), self.start
            ).values[:total]
        return linear_warmup_cosine_decay(
            self.start,
            self.peak * scale,
            self.end * scale,
            int(self.warmup_epochs * epoch_length),
            int(total_epochs * epoch_length),
            None if self.cosine_epochs is None else int(self.cosine_epochs * epoch_length),
        )


LOOP_SCHEDULES = ("lr", "weight_decay")  # the optimizer's; a recipe reads the others it names


def build_schedules(
    specs: dict[str, ScheduleSpec], epochs: float, epoch_length: int, lr_scale: float
) -> dict[str, Schedule]:
    """One schedule per entry of a preset's ``schedules`` section (``lr`` times the lr scaling rule), and
    with ``lr``, ``last_layer_lr``: ``lr`` held at 0 for its ``freeze_last_layer_epochs``."""
    arrays = {k: spec.array(epochs, epoch_length, lr_scale if k == "lr" else 1.0) for k, spec in specs.items()}
    # Past its end a v1 schedule returns its final value (the official CosineScheduler); v2 its last entry.
    final = {k: spec.end if spec.shape == "v1" else None for k, spec in specs.items()}
    schedules = {k: Schedule(arrays[k], final[k]) for k in specs}
    if "lr" in specs:
        last_layer = arrays["lr"].copy()
        last_layer[: int(specs["lr"].freeze_last_layer_epochs * epoch_length)] = 0
        schedules["last_layer_lr"] = Schedule(last_layer, final["lr"])
    return schedules


def schedule_specs(section: dict) -> dict[str, ScheduleSpec]:
    """``ScheduleSpec`` objects from the ``schedules`` section of a preset (a mapping of mappings)."""
    fields = {f.name for f in dataclasses.fields(ScheduleSpec)}
    specs = {}
    for name, values in section.items():
        unknown = set(values) - fields
        if unknown:
            raise ValueError(f"schedules.{name}: unknown keys {sorted(unknown)}; valid: {sorted(fields)}")
        specs[name] = ScheduleSpec(**values)
    return specs
