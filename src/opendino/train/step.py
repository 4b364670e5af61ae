"""One optimisation step of a recipe, free of host synchronisation.

The recipe's forward (under bf16 autocast on a GPU), backward, the recipe's gradient clipping, AdamW and
the recipe's ``after_update`` (an EMA update). A non-finite loss must not reach the weights, but reading
it on the host would stall the GPU every step; instead the fused AdamW kernel receives the flag as
``found_inf`` (the mechanism ``torch.amp.GradScaler`` uses) and skips the update on the device, and the
recipe gets the same flag. The trainer reads the flags later, at its logging points.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributed.fsdp import FSDPModule

# Relative imports: the package's name would be the only mention of a recipe in this file.
from ..losses.distributed import all_reduce_max
from ..recipes.base import Recipe
from .optim import decoupled_decay_


@dataclass
class StepResult:
    loss: Tensor
    terms: dict[str, Tensor]
    grad_norms: dict[str, Tensor]
    finite: Tensor  # bool scalar on the device; False means the step changed nothing


def train_step(
    recipe: Recipe,
    optimizer: torch.optim.Optimizer,
    batch: dict | list[dict],
    *,
    step: int = 0,
    clip_grad: float = 0.0,
    autocast_cache: bool = True,
) -> StepResult:
    """``batch``: one batch, or the micro-batches of a step (``train.accumulate``): their gradients add up
    (each loss divided by their number) before one clipping and one optimizer step; DDP synchronises them
    once, after the last (FSDP after each, keeping them sharded). Batch-level terms (normalisations over the
    batch, running centres, contrastive negatives) are each micro-batch's own. ``step``: the index handed to
    ``recipe.after_update``; ``clip_grad``: the max gradient norm per clipping unit of the recipe (0:
    measure only); ``autocast_cache=False`` while a CUDA graph captures the step (its cast weights would
    otherwise outlive the capture)."""
    micro = [batch] if isinstance(batch, dict) else list(batch)
    device = micro[0]["labels"].device  # every recipe's batch has labels (on the device)
    trained = recipe.parallel_plan().trained
    # DDP (replicate) all-reduces once, after the last micro-batch. FSDP2 reduce-scatters every micro-batch:
    # without it each rank would hold the full unsharded fp32 gradients, which sharding exists to avoid.
    # A single process has nothing to synchronise.
    sync_once = len(micro) > 1 and not isinstance(trained, FSDPModule)
    set_sync = getattr(trained, "set_requires_gradient_sync", None) if sync_once else None
    optimizer.zero_grad(set_to_none=True)
    losses, part_terms = [], []
    for i, part in enumerate(micro):
        if set_sync is not None:
            set_sync(i == len(micro) - 1)
        with torch.autocast(
            device.type, dtype=torch.bfloat16, enabled=device.type == "cuda", cache_enabled=autocast_cache
        ):
            loss, these_terms = recipe(part)
        # one batch: the loss itself (accumulate=1 is bit for bit the step without accumulation)
        (loss if len(micro) == 1 else loss / len(micro)).backward()
        losses.append(loss.detach())
        part_terms.append({k: v.detach() for k, v in these_terms.items()})
    loss, terms = losses[0], part_terms[0]
    if len(micro) > 1:  # the step's values: the means over its micro-batches
        loss = torch.stack(losses).mean()
        terms = {k: torch.stack([t[k] for t in part_terms]).mean() for k in terms}
    norms = recipe.clip_gradients(clip_grad)
    # A non-finite loss on any rank poisons the averaged gradients of all: every rank skips the step.
    found_inf = all_reduce_max((~torch.isfinite(loss)).float())
    finite = found_inf == 0
    optimizer.found_inf = found_inf  # read by the fused AdamW kernel
    decoupled_decay_(optimizer, finite)  # a captured step's weight decay (train/optim.py)
    optimizer.step()
    recipe.after_update(step, finite)
    return StepResult(loss, terms, norms, finite)
