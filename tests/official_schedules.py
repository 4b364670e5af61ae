"""The official v1 schedules (DINOv2-style ``optim`` / ``teacher`` config keys, ``dinov3.train.train.build_schedulers``
on such configs), rebuilt from ``opendino.schedules.cosine_schedule`` for the official-fixture harness.

Test-only: OpenDINO configs describe every schedule as a ``ScheduleSpec`` (``shape: v1`` gives this cosine); the
harness uses these to check the v1 arrays of the official code entry by entry, including the truncated cosine
(``schedule_trunc_extra``), which the specs do not offer.
"""

from __future__ import annotations

import dataclasses

from opendino.schedules import Schedule, cosine_schedule


@dataclasses.dataclass
class V1Settings:
    """The v1 (``optim`` / ``teacher``) keys of DINOv2-style configs such as the ImageNet fast setup."""

    epochs: float
    lr: float  # already scaled
    min_lr: float
    warmup_epochs: float
    weight_decay: float
    weight_decay_end: float
    momentum_teacher: float
    final_momentum_teacher: float
    warmup_teacher_temp: float
    teacher_temp: float
    warmup_teacher_temp_epochs: float
    freeze_last_layer_epochs: float
    schedule_trunc_extra: float = 0.0

    @classmethod
    def from_official(cls, optim: dict, teacher: dict) -> V1Settings:
        """From the official ``cfg.optim`` and ``cfg.teacher`` sections (after the lr scaling rule)."""
        fields = [f.name for f in dataclasses.fields(cls)]
        merged = {**optim, **teacher}
        missing = [f for f in fields if f not in merged and f != "schedule_trunc_extra"]
        assert not missing, f"official v1 config lacks {missing}"
        return cls(**{f: merged[f] for f in fields if f in merged})


def build_schedules_v1(s: V1Settings, epoch_length: int) -> dict[str, Schedule]:
    """The five CosineScheduler objects of the official ``build_schedulers`` (v1 configs), by name."""
    total = int(s.epochs * epoch_length)
    warmup = int(s.warmup_epochs * epoch_length)
    lr = cosine_schedule(s.lr, s.min_lr, total, warmup, trunc_extra=s.schedule_trunc_extra)
    last_layer = cosine_schedule(s.lr, s.min_lr, total, warmup, trunc_extra=s.schedule_trunc_extra)
    last_layer.values[: int(s.freeze_last_layer_epochs * epoch_length)] = 0
    temp_iters = int(s.warmup_teacher_temp_epochs * epoch_length)
    return dict(
        lr=lr,
        last_layer_lr=last_layer,
        weight_decay=cosine_schedule(s.weight_decay, s.weight_decay_end, total, trunc_extra=s.schedule_trunc_extra),
        momentum=cosine_schedule(
            s.momentum_teacher, s.final_momentum_teacher, total, trunc_extra=s.schedule_trunc_extra
        ),
        teacher_temp=cosine_schedule(
            s.teacher_temp,
            s.teacher_temp,
            temp_iters,
            temp_iters,
            s.warmup_teacher_temp,
            trunc_extra=s.schedule_trunc_extra,
        ),
    )
