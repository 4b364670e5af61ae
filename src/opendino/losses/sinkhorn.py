"""Teacher centring: Sinkhorn-Knopp (the DINOv3 recipe) and the softmax centring of DINO / DINOv2.

Sinkhorn-Knopp (docs/design/recipe.md §2.2) turns teacher logits ``[M, K]`` into targets whose rows sum to one and
whose prototypes are used equally over the whole (distributed) batch: ``exp(logits / T)``, then
alternating prototype and sample normalisation, three iterations; prototype sums are all-reduced over
the group, so every rank sees the same marginals.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from opendino.losses.distributed import all_reduce_max, all_reduce_sum, world_size
from opendino.losses.precision import float32


@torch.no_grad()
@float32
def sinkhorn_knopp(
    logits: Tensor,
    teacher_temp: float,
    n_iterations: int = 3,
    n_samples: Tensor | None = None,
    group=None,
    valid: Tensor | None = None,
) -> Tensor:
    """Centred teacher targets ``[M, K]``. ``n_samples``: this rank's number of samples when it differs
    from ``M`` (iBOT passes its masked-token count); it is summed over the group. ``valid`` ``[M]`` bool:
    the real rows of a padded batch; the others take no part and get all-zero targets.

    The alternating normalisations only rescale prototypes (columns here) and samples (rows), so the
    targets are ``exp(logits / T) * b[:, None] * a[None, :]`` for two vectors that the iterations update
    with matrix-vector products: the big ``[M, K]`` matrix (1 GB for iBOT at batch 64 and 65,536
    prototypes) is read twice per iteration and written twice in all, instead of six passes per iteration.
    """
    scores = logits.float()
    if n_iterations == 0:  # no centring: the teacher's own softmax (a frozen distillation teacher)
        probs = torch.softmax(scores / teacher_temp, dim=-1)
        return probs if valid is None else probs * valid[:, None]
    if valid is not None:  # padding rows: below every real score, so they set no prototype's shift
        scores = scores.masked_fill(~valid[:, None], -1e30)
    # Each prototype is shifted by its (global) maximum: the first prototype normalisation cancels any
    # per-prototype constant, so the result is the official one, but exp() can neither overflow (the
    # official code does past logits / T ~ 88) nor leave a prototype with no mass.
    if scores.shape[0]:
        shift = scores.amax(dim=0)
    else:
        shift = scores.new_full((scores.shape[1],), -1e30)
    shift = all_reduce_max(shift, group)  # a rank without samples (no masked token) still takes part
    q = torch.exp((scores - shift) / teacher_temp)  # [M, K]
    if valid is not None:  # where, not a product: a rank of padding alone has exp() overflowing there
        q = torch.where(valid[:, None], q, 0.0)
    n_rows, n_prototypes = q.shape
    if n_samples is None:
        total = n_rows * world_size(group)
    else:
        total = all_reduce_sum(n_samples.detach().clone().float(), group)
    prototype_scale = q.new_ones(n_prototypes) / all_reduce_sum(q.sum(), group)
    sample_scale = q.new_ones(n_rows) if valid is None else valid.to(q.dtype)  # padding: 0, and stays 0
    for _ in range(n_iterations):
        mass = all_reduce_sum(prototype_scale * (sample_scale @ q), group)  # per prototype
        prototype_scale = prototype_scale / (mass * n_prototypes)
        mass = sample_scale * (q @ prototype_scale)  # per sample, local only
        sample_scale = sample_scale / (mass.clamp(min=1e-30) * total)
    q *= (sample_scale * total)[:, None]
    q *= prototype_scale[None, :]
    return q if valid is None else torch.where(valid[:, None], q, 0.0)


class SoftmaxCenter(nn.Module):
    """Softmax centring with an EMA centre (DINO / DINOv2). Not used by the DINOv3 recipe, kept for
    ablations; its ``center`` buffer exists in official checkpoints."""

    def __init__(self, out_dim: int, momentum: float = 0.9, shape: tuple[int, ...] = (1,)) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(*shape, out_dim))

    @torch.no_grad()
    def probs(self, logits: Tensor, teacher_temp: float) -> Tensor:
        return torch.softmax((logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update(self, logits: Tensor, group=None, valid: Tensor | None = None) -> None:
        """``valid``: the real rows of padded ``logits`` (the others are left out of the mean)."""
        rows = logits.float().reshape(-1, logits.shape[-1])
        # the mean over every rank's rows (ranks hold different numbers of masked patches)
        if valid is None:
            count = torch.full((), rows.shape[0], dtype=rows.dtype, device=rows.device)
        else:
            rows, count = rows * valid[:, None], valid.sum().to(rows.dtype)
        count = all_reduce_sum(count, group)
        batch_center = all_reduce_sum(rows.sum(dim=0), group) / count
        self.center.mul_(self.momentum).add_(batch_center.view_as(self.center), alpha=1 - self.momentum)
