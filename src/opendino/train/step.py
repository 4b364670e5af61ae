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

# Relative imports: the package's name would be the only mention of a recipe in this file.
from ..losses.distributed import all_reduce_max
from ..recipes.base import Recipe


@dataclass
class StepResult:
    loss: Tensor
    terms: dict[str, Tensor]
    grad_norms: dict[str, Tensor]
    finite: Tensor  # bool scalar on the device; False means the step changed nothing


def train_step(
    recipe: Recipe, optimizer: torch.optim.Optimizer, batch: dict, *, step: int = 0, clip_grad: float = 0.0
) -> StepResult:
    """``step``: the index handed to ``recipe.after_update``; ``clip_grad``: the max gradient norm per
    clipping unit of the recipe (0: measure only)."""
    device = batch["labels"].device  # every recipe's batch has labels (on the device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss, terms = recipe(batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norms = recipe.clip_gradients(clip_grad)
    # A non-finite loss on any rank poisons the averaged gradients of all: every rank skips the step.
    found_inf = all_reduce_max((~torch.isfinite(loss)).float())
    finite = found_inf == 0
    optimizer.found_inf = found_inf  # read by the fused AdamW kernel
    optimizer.step()
    recipe.after_update(step, finite)
    return StepResult(loss.detach(), {k: v.detach() for k, v in terms.items()}, norms, finite)
