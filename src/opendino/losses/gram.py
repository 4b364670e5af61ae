"""Gram anchoring loss (docs/design/recipe.md §2.6): keeps the student's patch-similarity structure close to that
of a Gram teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from opendino.losses.precision import float32


@float32
def gram_loss(
    student: Tensor,
    teacher: Tensor,
    normalize: bool = True,
    img_level: bool = True,
    remove_neg: bool = False,
    remove_only_teacher_neg: bool = False,
    tokens: Tensor | None = None,
) -> Tensor:
    """MSE between the Gram matrices of student and teacher patch features ``[B, N, D]``.

    ``img_level``: one ``N x N`` Gram per image; otherwise one over all ``B*N`` tokens of the batch.
    ``remove_neg`` zeroes the negative entries of both Grams, ``remove_only_teacher_neg`` those of the
    teacher (the official rule also zeroes student entries where both are negative, which can no longer
    happen once the teacher is clamped).

    ``tokens`` (bool ``[B, N]``, with ``img_level=False``): only these tokens enter the Grams — the loss of
    the selected rows, computed as a weighted mean over the full Gram so that the count stays on the device
    (no host synchronisation; 0 when none is selected).
    """
    s, t = student.float(), teacher.float().detach()
    if normalize:
        s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    if not img_level:
        s, t = s.flatten(0, -2), t.flatten(0, -2)
    gram_s = s @ s.transpose(-1, -2)
    gram_t = t @ t.transpose(-1, -2)
    if remove_neg:
        gram_s = torch.where(gram_s < 0, torch.zeros_like(gram_s), gram_s)
        gram_t = gram_t.clamp(min=0)
    elif remove_only_teacher_neg:
        gram_t = gram_t.clamp(min=0)
    if tokens is None:
        return F.mse_loss(gram_s, gram_t)
    if img_level:
        raise ValueError("a token selection needs img_level=False (images keep different numbers of tokens)")
    keep = tokens.flatten().to(gram_s.dtype)
    pairs = keep[:, None] * keep[None, :]
    return ((gram_s - gram_t).square() * pairs).sum() / pairs.sum().clamp(min=1)
