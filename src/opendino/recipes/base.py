"""The recipe contract: everything the training loop may ask of a training recipe.

A recipe owns its networks (the trained one and any EMA or frozen companions), its losses and its own
scalar schedules; the loop owns the data order, the optimizer and its learning-rate and weight-decay
schedules, clipping thresholds, logging, checkpoints, resume and parallelism. The loop calls, per step:
``before_step(step)``, ``forward(batch)`` (under autocast), backward, ``clip_gradients``, the optimizer
step, ``after_update(step, finite)``. A recipe is chosen by ``train.recipe`` (a name of ``RECIPES`` or an
importable ``module:Class``). docs/design/contract.md explains each method; docs/design/recipes.md shows
how to add one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from opendino.data.pipeline import DataNeeds, MaskSpec

__all__ = ["DataNeeds", "MaskSpec", "ParallelPlan", "Recipe", "clip_per_submodule", "ema_update_"]


@dataclasses.dataclass
class ParallelPlan:
    """How ``train.parallel`` may wrap a recipe's modules; it wraps them in place, names unchanged.

    ``trained``: the module the optimizer trains (DDP replicates it, FSDP shards it first). ``sharded``: the
    companions FSDP shards after it, in this order (an EMA copy, so that its update stays local to each
    shard; a frozen teacher). ``compiled``:
    modules whose backbone blocks are compiled; ``dynamic``: modules compiled with dynamic shapes (heads
    that see a varying number of rows); ``compiled_methods``: methods of the recipe compiled in a single
    process (loss regions holding collectives under data parallelism are left eager)."""

    trained: nn.Module | None
    sharded: list[nn.Module] = dataclasses.field(default_factory=list)
    compiled: list[nn.Module] = dataclasses.field(default_factory=list)
    dynamic: list[nn.Module] = dataclasses.field(default_factory=list)
    compiled_methods: list[str] = dataclasses.field(default_factory=list)


class Recipe(nn.Module):
    """Base class of training recipes; subclasses implement every method that raises here.

    A recipe may own a configuration section: a field of ``TrainConfig`` whose dataclass (with its
    ``check()``) lives beside the recipe (``text`` in recipes/text.py, ``gram`` in recipes/gram.py)."""

    # Names of the run's `schedules` the recipe reads (besides the loop's lr and weight_decay).
    REQUIRED_SCHEDULES: tuple[str, ...] = ()
    OPTIONAL_SCHEDULES: tuple[str, ...] = ()
    # A recipe whose whole step may be captured as one CUDA graph (``train.capture``): from one step to the
    # next, its forward and ``after_update`` read no changing host value but the attributes named in
    # STEP_SCALARS, which ``before_step`` sets through ``set_scalar`` (device tensors once captured).
    CAPTURABLE: bool = False
    STEP_SCALARS: tuple[str, ...] = ()

    def set_scalar(self, name: str, value: float) -> None:
        """A per-step value: a Python float, or written into its device tensor after ``scalars_on``."""
        current = getattr(self, name, None)
        if isinstance(current, Tensor):
            current.fill_(value)
        else:
            setattr(self, name, value)

    def scalars_on(self, device: torch.device) -> None:
        """The STEP_SCALARS become device tensors, filled in place from now on: a captured graph reads
        them at every replay instead of the values of the step it was captured at."""
        for name in self.STEP_SCALARS:
            setattr(self, name, torch.tensor(float(getattr(self, name)), device=device))

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Rules of the recipe that join configuration sections; raise ``opendino.config.ConfigError``."""

    @classmethod
    def from_config(cls, cfg: Any) -> Recipe:
        """A recipe of the run's resolved configuration (``opendino.train.config.TrainConfig``); called
        after the loop seeded the weights' random stream."""
        return cls(cfg)

    @classmethod
    def shared_pass(cls, cfg: Any, recipes: list[Recipe]) -> nn.Module | None:
        """A frozen module whose ``forward(batch) -> dict`` adds entries to every batch once, for all the
        recipes of a run (a distillation teacher shared by several students); None when there is none.
        It has a ``parallel_plan()`` like a recipe."""
        return None

    def data_needs(self, shared: nn.Module | None = None) -> DataNeeds:
        return DataNeeds()

    def start_fresh(self, say: Callable[[str], None]) -> tuple[int, dict | None]:
        """Initial weights of a run that does not resume (released weights, an earlier stage); returns
        the first step and the optimizer state to carry on (or None). ``say`` prints on the main rank."""
        return 0, None

    def parallel_plan(self) -> ParallelPlan:
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        """Optimizer groups of the trained module: ``params``, ``names`` and the multipliers the loop
        applies to its schedules: ``lr_multiplier``, ``wd_multiplier``, ``is_last_layer`` (follows the
        last-layer lr schedule), ``frozen_until`` (lr 0 before that step) and optionally ``ramp_steps`` (the
        lr then ramps linearly back over that many steps)."""
        raise NotImplementedError

    def before_step(self, step: int) -> dict[str, float]:
        """Sets the recipe's own schedules for ``step`` (temperatures, momentum, loss weights) and runs
        its scheduled events (teacher refreshes); returns the values to log."""
        return {}

    def forward(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss and its terms, as device tensors (never read on the host)."""
        raise NotImplementedError

    def clip_gradients(self, max_norm: float) -> dict[str, Tensor]:
        """Clips the gradients (``max_norm`` 0: measure only); returns the norms to log by name."""
        raise NotImplementedError

    def after_update(self, step: int, finite: Tensor) -> None:
        """After the optimizer step (EMA updates); ``finite`` is False on a skipped step (a device bool)."""

    def export_module(self) -> nn.Module:
        """The model ``opendino eval`` and ``extract`` load (written as ``teacher.safetensors``)."""
        raise NotImplementedError

    def export_prefix(self) -> str:
        """Where :meth:`export_module` sits in the recipe's state dict, so that a run folder's newest
        checkpoint can give the model it would export (a Gram teacher, an initialisation)."""
        names = {id(m): n for n, m in self.named_modules()}
        return f"{names[id(self.export_module())]}."

    def extra_exports(self) -> dict[str, tuple[nn.Module, Callable]]:
        """Files written beside the export at the end of a run: name -> (module, ``writer(module, path,
        full_state)``); the loop gathers each module's full state on every rank and the main rank writes."""
        return {}

    def monitored(self) -> tuple[nn.Module, nn.Module | None]:
        """The backbone the dense monitor measures, and a reference backbone to compare it with."""
        return self.export_module(), None

    def evaluate(self, step: int) -> dict[str, float]:
        """The recipe's own held-out metrics, every ``monitor.every`` steps (on every rank: a sharded model
        needs all of them), logged with the step's record."""
        return {}


def clip_per_submodule(model: nn.Module, max_norm: float) -> dict[str, Tensor]:
    """Clips the gradients of each child of ``model`` on its own (the official per-submodule rule);
    ``max_norm`` 0 measures only. Under FSDP the norms are replicated DTensors; their local value is the
    full norm."""
    norms = {
        name: torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm or float("inf"), foreach=True)
        for name, module in model.named_children()
    }
    return {name: n.to_local() if hasattr(n, "to_local") else n for name, n in norms.items()}


@torch.no_grad()
def lerp_by_tensor_(targets: list[Tensor], sources: list[Tensor], weight: Tensor) -> None:
    """``t += weight * (s - t)`` for every pair, with ``weight`` a 0-dim tensor that is never read on the host."""
    step = torch._foreach_sub(sources, targets)
    torch._foreach_mul_(step, weight)
    torch._foreach_add_(targets, step)


@torch.no_grad()
def ema_update_(
    targets: list[Tensor], sources: list[Tensor], weight: float | Tensor, enabled: Tensor | None = None
) -> None:
    """``targets`` become the exponential moving average ``t + w (s - t)``, ``w = 1 - momentum`` (callers
    compute it on the host, in double: near the end of an EMA schedule ``1 - momentum`` is ~1e-5, which the
    complement of a float32 momentum gets 0.14 % wrong at momentum 0.99999), in one fused multi-tensor pass.

    ``enabled`` (a bool scalar on the device, the step's finite flag) turns the update off without a host
    synchronisation: ``_foreach_lerp_`` has no tensor-weight overload (a CUDA scalar would be read with
    ``.item()``, stalling the host every step), so there the update is ``t += w * (s - t)`` with the
    multi-tensor ops' tensor overloads, as it is for a ``weight`` tensor (a captured step's). On the CPU
    reading the flag costs nothing and one ``lerp`` pass is faster.
    """
    if isinstance(weight, Tensor) or (enabled is not None and enabled.device.type != "cpu"):
        if not isinstance(weight, Tensor):
            weight = torch.tensor(weight, device=enabled.device)
        if enabled is not None:
            weight = weight * enabled.to(weight.dtype)
        lerp_by_tensor_(targets, sources, weight.to(targets[0].dtype))
    elif enabled is None or bool(enabled):
        torch._foreach_lerp_(targets, sources, weight)
