"""iBOT masked-patch loss (docs/design/recipe.md §2.4)."""

from __future__ import annotations

import torch
from torch import Tensor


def masked_token_weights(masks: Tensor) -> Tensor:
    """``1 / (#masked tokens of its crop)`` for every masked token of ``masks [n_crops, N]``."""
    per_crop = masks.sum(-1, keepdim=True).clamp(min=1)
    return (1.0 / per_crop).expand_as(masks)[masks]


def ibot_loss_masked(
    student_logits: Tensor,
    teacher_probs: Tensor,
    masks: Tensor,
    masks_weight: Tensor | None = None,
    student_temp: float = 0.1,
) -> Tensor:
    """Loss over the masked tokens only (``[M, K]`` rows in the order of ``masks.flatten().nonzero()``).

    Each crop contributes the mean over its masked tokens, and the sum is divided by the number of
    crops ``masks.shape[0]``, masked or not (the official weighting).
    """
    weights = masked_token_weights(masks) if masks_weight is None else masks_weight
    per_token = torch.sum(teacher_probs.float() * torch.log_softmax(student_logits.float() / student_temp, -1), -1)
    return -(per_token * weights).sum() / masks.shape[0]


def ibot_loss_dense(student_logits: Tensor, teacher_probs: Tensor, masks: Tensor, student_temp: float = 0.1) -> Tensor:
    """The same loss from full ``[n_crops, N, K]`` token grids (per-crop mean over masked tokens)."""
    per_token = torch.sum(teacher_probs.float() * torch.log_softmax(student_logits.float() / student_temp, -1), -1)
    per_crop = (per_token * masks).sum(-1) / masks.sum(-1).clamp(min=1)
    return -per_crop.mean()
