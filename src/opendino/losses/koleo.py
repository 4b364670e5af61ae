"""KoLeo regulariser: spreads the (pre-head) CLS features by penalising close nearest neighbours
(Sablayrolles et al., 2019; docs/design/recipe.md §2.5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from opendino.losses.distributed import all_gather_with_grad, is_distributed
from opendino.losses.precision import float32

EPS = 1e-8


@float32
def koleo_loss(x: Tensor) -> Tensor:
    """``-mean_i log ||x_i - x_nn(i)||`` over a batch ``[B, D]``, on L2-normalised features."""
    x = F.normalize(x.float(), p=2, dim=-1, eps=EPS)
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(-1)
        neighbour = dots.argmax(dim=1)
    distances = F.pairwise_distance(x, x[neighbour], p=2, eps=EPS)
    return -torch.log(distances + EPS).mean()


@float32
def koleo_loss_distributed(x: Tensor, group_size: int | None = None, topk: int = 1, group=None) -> Tensor:
    """KoLeo over contiguous groups of ``group_size`` samples of the global batch (gathered, with
    gradients), each rank averaging over its own samples and their ``topk`` neighbours in their group."""
    x = F.normalize(x.float(), p=2, dim=-1, eps=EPS)
    local = x.shape[0]
    everything = all_gather_with_grad(x, group)
    rank = torch.distributed.get_rank(group) if is_distributed(group) else 0
    group_size = group_size or everything.shape[0]
    if group_size % local or everything.shape[0] % group_size:
        raise ValueError(
            f"KoLeo group size {group_size} must be a multiple of the local batch {local} and "
            f"divide the global batch {everything.shape[0]}"
        )
    start = rank * local
    first = start // group_size * group_size
    members = everything[first : first + group_size]
    with torch.no_grad():
        dots = x @ members.t()
        own = torch.arange(local, device=x.device) + start - first
        dots[torch.arange(local, device=x.device), own] = -2  # exclude self
        neighbours = dots.topk(topk, dim=1).indices  # [local, k]
    diffs = x[:, None, :] - members[neighbours] + EPS
    distances = diffs.norm(dim=-1).float()
    return -torch.log(distances + EPS).mean()
