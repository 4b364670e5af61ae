"""One optimisation step of the recipe, free of host synchronisation.

Forward, backward, per-submodule clipping, AdamW and the EMA teacher update. A non-finite loss must
not reach the weights, but reading it on the host would stall the GPU every step; instead the fused
AdamW kernel receives the flag as ``found_inf`` (the mechanism ``torch.amp.GradScaler`` uses) and
skips the update on the device, and the EMA weight is multiplied by the same flag. The trainer reads
the flags later, at its logging points.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from opendino.losses.distributed import all_reduce_max
from opendino.recipes.ssl import SSLRecipe


@dataclass
class StepResult:
    loss: Tensor
    terms: dict[str, Tensor]
    grad_norms: dict[str, Tensor]
    finite: Tensor  # bool scalar on the device; False means the step changed nothing


def train_step(
    recipe: SSLRecipe,
    optimizer: torch.optim.Optimizer,
    batch: dict,
    *,
    teacher_temp: float,
    momentum: float,
    clip_grad: float,
    dino_local_weight: float = 1.0,
    gram_weight: float = 0.0,
    teacher_logits: tuple[Tensor, Tensor] | None = None,
    autocast: bool = False,
) -> StepResult:
    """``teacher_logits``: a frozen distillation teacher's (CLS, masked-patch) logits of this batch."""
    device = batch["global"].device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        loss, terms = recipe(batch, teacher_temp, dino_local_weight, gram_weight, teacher_logits)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norms = recipe.clip_gradients(clip_grad)
    # A non-finite loss on any rank poisons the averaged gradients of all: every rank skips the step.
    found_inf = all_reduce_max((~torch.isfinite(loss)).float())
    finite = found_inf == 0
    optimizer.found_inf = found_inf  # read by the fused AdamW kernel
    optimizer.step()
    recipe.update_teacher(momentum, enabled=finite)
    return StepResult(loss.detach(), {k: v.detach() for k, v in terms.items()}, norms, finite)
