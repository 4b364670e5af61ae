"""DINO cross-entropy between student and teacher CLS distributions (docs/design/recipe.md §2.3)."""

from __future__ import annotations

import torch
from torch import Tensor

from opendino.losses.precision import float32


@float32
def dino_loss(
    student_logits: Tensor, teacher_probs: Tensor, student_temp: float = 0.1, ignore_diagonal: bool = False
) -> Tensor:
    """Mean over (student crop, teacher crop, image) of ``-sum_k t_k log softmax(s / temp)_k``.

    ``student_logits [S, B, K]``, ``teacher_probs [T, B, K]``. With ``ignore_diagonal`` the same-crop
    pairs ``s == t`` are left out of the sum and of the count (``B*S*T - B*min(S, T)``).
    """
    log_p = torch.log_softmax(student_logits.float() / student_temp, dim=-1)
    S, B, _ = log_p.shape
    T = teacher_probs.shape[0]
    pair_losses = -torch.einsum("sbk,tbk->st", log_p, teacher_probs.float())  # [S, T], summed over images
    if not ignore_diagonal:
        return pair_losses.sum() / (S * T * B)
    keep = ~torch.eye(S, T, dtype=torch.bool, device=pair_losses.device)
    return (pair_losses * keep).sum() / (B * S * T - B * min(S, T))
