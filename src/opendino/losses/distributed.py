"""Collectives that degrade to no-ops in a single process (the losses work with or without a group)."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


def is_distributed(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_distributed(group) else 1


def all_reduce_sum(tensor: Tensor, group=None) -> Tensor:
    """In-place sum over the group (no autograd); returns the tensor."""
    if is_distributed(group):
        dist.all_reduce(tensor, group=group)
    return tensor


def all_reduce_max(tensor: Tensor, group=None) -> Tensor:
    """In-place maximum over the group (no autograd); returns the tensor."""
    if is_distributed(group):
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor


def all_gather_with_grad(tensor: Tensor, group=None) -> Tensor:
    """Concatenation over ranks along dim 0, differentiable (the backward sums the gradients of every
    rank's copy into the owner's: a reduce-scatter)."""
    if not is_distributed(group):
        return tensor
    from torch.distributed._functional_collectives import all_gather_tensor_autograd, wait_tensor

    return wait_tensor(all_gather_tensor_autograd(tensor, 0, group or dist.group.WORLD))


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size (0 and 1 in a single process)."""
    if not (is_distributed()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    """Every rank waits for the others (a no-op in a single process)."""
    if is_distributed():
        dist.barrier()
