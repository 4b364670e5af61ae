"""The losses compute in float32 whatever autocast is active (docs/design/recipe.md §2: the official losses cast to
float32 and run outside autocast): under bf16 autocast on a GPU, a matrix product inside a loss (the DINO
cross-entropy's einsum, KoLeo's neighbour search, the Gram matrices) would otherwise run in bf16."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

F = TypeVar("F", bound=Callable)


def float32(fn: F) -> F:
    """Runs ``fn`` with autocast off on the device of its first tensor argument; ``fn`` casts its inputs."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next((a.device.type for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), "cpu")
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
