"""The whole training step replayed from a CUDA graph (``train.capture``).

A small model's step is bound by the host: ViT-S/16 at batch 64 launches 1,000-1,600 kernels per step, and
launching them takes longer than running them. Captured once into a CUDA graph, the step (forward,
backward, clipping, AdamW, the EMA update) is one launch. What a graph needs, and where it comes from:

- the same shapes every step: one graph per batch signature (the shapes and dtypes of the batch's
  tensors: a crop-size set is a signature), at most ``MAX_GRAPHS``; iBOT's masked rows padded to a fixed
  bound (``loss.pad_masked_rows``) so that the masked count does not make a new signature every step;
- no host value that changes between steps: the recipe's per-step scalars live in device tensors
  (``Recipe.scalars_on``), so do the optimizer's lr and weight decay (``make_capturable``), and the
  non-finite flag never leaves the device (train/step.py);
- static inputs: each batch is copied into the tensors the graph was captured with;
- warm-up: a signature's first ``WARMUP`` steps run eager on a side stream (they create the optimizer
  state and let cuBLAS and the allocator settle), the next one is captured and replayed.

The captured step is ``train_step`` itself, so it computes what the eager step computes; random draws
(stochastic depth, RoPE augmentation) come from the CUDA generator, which graphs advance at each replay.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch import Tensor

from ..recipes.base import Recipe
from .config import TrainConfig
from .step import StepResult, train_step

WARMUP = 3
MAX_GRAPHS = 4


def capture_unavailable(recipe: Recipe, cfg: TrainConfig, device: torch.device, world_size: int) -> str | None:
    """Why this run's step cannot be captured (None when it can): the fallback is the eager step."""
    if device.type != "cuda":
        return "CUDA graphs need a GPU"
    if world_size > 1:
        return "capturing the step of several processes (collectives in the graph) is not supported yet"
    if cfg.train.accumulate > 1:
        return "train.accumulate > 1: micro-batches are not captured"
    if cfg.parallel.activation_checkpointing != "none":
        # the recomputation saves and restores the CUDA generator's state, which a capture may refuse
        return "parallel.activation_checkpointing: recomputed blocks are not captured"
    if not type(recipe).CAPTURABLE:
        return f"the recipe {type(recipe).__name__} does not declare its per-step scalars (Recipe.CAPTURABLE)"
    return None


def _tensors(batch: dict) -> list[tuple[tuple, Tensor]]:
    """The batch's tensors by position, also inside tuples and lists (a shared pass's teacher logits)."""
    found = []
    for key, value in sorted(batch.items()):
        if isinstance(value, Tensor):
            found.append(((key,), value))
        elif isinstance(value, (tuple, list)):
            found += [((key, i), v) for i, v in enumerate(value) if isinstance(v, Tensor)]
    return found


def _signature(batch: dict) -> tuple:
    return tuple((where, tuple(v.shape), v.dtype) for where, v in _tensors(batch))


def _static_copy(batch: dict) -> dict:
    """The batch with every tensor cloned: the inputs the graph is captured with and reads at each replay."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, Tensor):
            out[key] = value.clone()
        elif isinstance(value, (tuple, list)):
            out[key] = type(value)(v.clone() if isinstance(v, Tensor) else v for v in value)
        else:
            out[key] = value
    return out


class CapturedStep:
    """Called like ``train_step`` (one batch); replays the graph of the batch's signature."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict, StepResult]] = {}
        self.warmed: Counter = Counter()
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool: the graphs never run at once
        self.gave_up = False

    def __call__(
        self, recipe: Recipe, optimizer: torch.optim.Optimizer, batch: dict | list[dict], *, step: int = 0, **kw
    ) -> StepResult:
        part = batch if isinstance(batch, dict) else batch[0]
        signature = _signature(part)
        if signature in self.graphs:
            graph, static, outputs = self.graphs[signature]
            for (_, target), (_, value) in zip(_tensors(static), _tensors(part), strict=True):
                target.copy_(value, non_blocking=True)
            graph.replay()
            return _copy(outputs)  # the graph's outputs are overwritten by its next replay
        if len(self.graphs) >= MAX_GRAPHS:
            if not self.gave_up:
                self.say(
                    f"train.capture: a {len(self.graphs) + 1}th batch shape; steps of new shapes run eager "
                    "(masked counts that change every step? set loss.pad_masked_rows=true)"
                )
                self.gave_up = True
            return train_step(recipe, optimizer, batch, step=step, **kw)
        if self.warmed[signature] < WARMUP:
            self.warmed[signature] += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                result = train_step(recipe, optimizer, batch, step=step, **kw)
            torch.cuda.current_stream().wait_stream(side)
            return result
        if self.graphs:
            self.say(f"train.capture: capturing a graph for a new batch shape ({len(self.graphs) + 1} now)")
        static = _static_copy(part)
        graph = torch.cuda.CUDAGraph()
        optimizer.zero_grad(set_to_none=True)  # the gradients are allocated in the graph's pool
        # thread_local: the data loader's pin-memory thread keeps calling CUDA while the step is captured
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            outputs = train_step(recipe, optimizer, static, step=step, autocast_cache=False, **kw)
        self.graphs[signature] = (graph, static, outputs)
        graph.replay()  # capturing records the step without running it: run it now
        return _copy(outputs)


def _copy(result: StepResult) -> StepResult:
    return StepResult(
        result.loss.clone(),
        {k: v.clone() if isinstance(v, Tensor) else v for k, v in result.terms.items()},
        {k: v.clone() for k, v in result.grad_norms.items()},
        result.finite.clone(),
    )
