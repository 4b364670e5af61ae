"""The weighted total of the SSL loss terms (docs/design/recipe.md §2.7)."""

from __future__ import annotations

import dataclasses

from torch import Tensor


@dataclasses.dataclass
class LossWeights:
    dino: float = 1.0
    koleo: float = 0.1
    ibot: float = 1.0
    global_ignore_diagonal: bool = True


def total_loss(
    weights: LossWeights,
    n_global: int,
    n_local: int,
    dino_local: Tensor,
    dino_global: Tensor,
    koleo: Tensor,
    ibot: Tensor,
    dino_local_weight: float = 1.0,
    gram: Tensor | None = None,
    gram_weight: float = 0.0,
) -> Tensor:
    """``koleo`` is the mean over global crops; the DINO terms are weighted by their share of crop pairs
    (with 2 global and 8 local crops: 8/9 local, 1/9 global)."""
    global_terms = n_global * (n_global - 1) if weights.global_ignore_diagonal else n_global * n_global
    local_terms = n_global * n_local
    global_scale = global_terms / (global_terms + local_terms)
    local_scale = local_terms / (global_terms + local_terms)
    total = (
        weights.dino * local_scale * dino_local_weight * dino_local
        + weights.dino * global_scale * dino_global
        + weights.koleo * n_global * koleo
        + weights.ibot * ibot
    )
    if gram is not None:
        total = total + gram_weight * gram
    return total
