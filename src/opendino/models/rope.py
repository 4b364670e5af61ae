"""Axial 2-D rotary position embedding (RoPE) of the DINOv3 ViT.

Facts implemented (docs/design/recipe.md §1.2): periods ``base ** (4j / head_dim)`` (or a geometric range between a
min and a max period), patch-centre coordinates in (-1, 1), optional train-time shift / jitter / rescale
augmentation, angle layout ``[y-frequencies | x-frequencies]`` tiled twice and rotate-half pairing of
dimension ``i`` with ``i + head_dim / 2``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

ROPE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NORMALIZE_COORDS = ("separate", "min", "max")


class RopePositionEmbedding(nn.Module):
    """Returns ``(sin, cos)`` tables of shape ``[H*W, head_dim]`` for an ``H x W`` patch grid."""

    def __init__(
        self,
        embed_dim: int,
        *,
        num_heads: int,
        base: float | None = 100.0,
        min_period: float | None = None,
        max_period: float | None = None,
        normalize_coords: str = "separate",
        shift_coords: float | None = None,
        jitter_coords: float | None = None,
        rescale_coords: float | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if embed_dim % (4 * num_heads) != 0:
            raise ValueError(f"RoPE needs embed_dim divisible by 4*num_heads, got {embed_dim} and {num_heads}")
        if (base is None) == (min_period is None or max_period is None):
            raise ValueError("RoPE needs either `base` or both `min_period` and `max_period`, not both")
        if normalize_coords not in NORMALIZE_COORDS:
            raise ValueError(f"normalize_coords={normalize_coords!r}; valid: {', '.join(NORMALIZE_COORDS)}")
        self.head_dim = embed_dim // num_heads
        self.base = base
        self.min_period = min_period
        self.max_period = max_period
        self.normalize_coords = normalize_coords
        self.shift_coords = shift_coords
        self.jitter_coords = jitter_coords
        self.rescale_coords = rescale_coords
        self.dtype = dtype
        self.register_buffer("periods", torch.empty(self.head_dim // 4, dtype=dtype, device=device))
        self.reset_parameters()

    @property
    def augments(self) -> bool:
        """True when a call draws random numbers (train mode with any coordinate augmentation)."""
        return self.training and any(
            v is not None for v in (self.shift_coords, self.jitter_coords, self.rescale_coords)
        )

    def reset_parameters(self) -> None:
        n = self.head_dim // 4
        device = self.periods.device
        if self.base is not None:
            exponents = 2 * torch.arange(n, dtype=self.dtype, device=device) / (self.head_dim // 2)
            periods = self.base**exponents
        else:
            ratio = self.max_period / self.min_period
            periods = self.min_period * ratio ** torch.linspace(0, 1, n, dtype=self.dtype, device=device)
        self.periods.data = periods.to(self.dtype)

    def _coords(self, H: int, W: int) -> Tensor:
        kw = {"dtype": self.dtype, "device": self.periods.device}
        if self.normalize_coords == "separate":
            denom_h, denom_w = H, W
        else:
            denom_h = denom_w = max(H, W) if self.normalize_coords == "max" else min(H, W)
        ys = torch.arange(0.5, H, **kw) / denom_h
        xs = torch.arange(0.5, W, **kw) / denom_w
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)  # [HW, 2]
        return 2.0 * coords - 1.0

    def draw_augmentations(self, n: int) -> tuple[Tensor, Tensor]:
        """``n`` independent draws of the coordinate augmentation, in the order of ``n`` successive
        single draws (the official order): ``(shift [n, 2], scale [n, 2])``, applied as
        ``(coords + shift) * scale``. Shift and jitter are per axis, the rescale is shared by both."""
        kw = {"dtype": self.dtype, "device": self.periods.device}
        ranges = []  # (values per draw, log-domain, bound), in the official order
        if self.shift_coords is not None:
            ranges.append((2, False, self.shift_coords))
        if self.jitter_coords is not None:
            ranges.append((2, True, math.log(self.jitter_coords)))
        if self.rescale_coords is not None:
            ranges.append((1, True, math.log(self.rescale_coords)))
        # One generator call for everything: a CPU generator then gives exactly the values of the
        # successive calls (mapped from [0, 1) to each range when there is more than one).
        u = torch.empty(n, sum(width for width, _, _ in ranges), **kw)
        if len(ranges) == 1:
            u.uniform_(-ranges[0][2], ranges[0][2])
        else:
            u.uniform_(0, 1)
        shift, scale = torch.zeros(n, 2, **kw), torch.ones(n, 2, **kw)
        column = 0
        for width, is_log, bound in ranges:
            values = u[:, column : column + width]
            if len(ranges) > 1:
                values = values * (2 * bound) - bound
            column += width
            if is_log:
                scale = scale * values.exp()
            else:
                shift = shift + values
        return shift, scale

    def forward(
        self, H: int, W: int, shift: Tensor | None = None, scale: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(sin, cos)`` of the ``[HW, head_dim]`` rotation angles. In train mode with an augmentation a
        draw is made, unless ``shift`` and ``scale`` (``[n, 2]``, from :meth:`draw_augmentations`) are
        given: then ``n`` augmented sets ``[n, HW, head_dim]`` come at once, in a few kernels."""
        coords = self._coords(H, W)
        if shift is None and self.augments:
            shift, scale = self.draw_augmentations(1)
            coords = (coords + shift) * scale
        elif shift is not None:
            coords = (coords + shift[:, None, :]) * scale[:, None, :]
        angles = 2 * math.pi * coords[..., None] / self.periods  # [..., HW, 2, d/4]
        angles = angles.flatten(-2, -1).tile(2)  # [..., HW, d]
        return torch.sin(angles), torch.cos(angles)


def rotate_half(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rope(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Rotates the last ``sin.shape[-2]`` tokens of ``x [B, heads, N, d]``; prefix tokens stay as they are.
    ``sin``, ``cos``: ``[N_patches, d]``, or ``[B, 1, N_patches, d]`` (each row its own positions)."""
    n_prefix = x.shape[-2] - sin.shape[-2]
    prefix, patches = x[..., :n_prefix, :], x[..., n_prefix:, :]
    dtype = x.dtype
    patches = patches.to(sin.dtype)
    patches = (patches * cos + rotate_half(patches) * sin).to(dtype)
    return torch.cat([prefix, patches], dim=-2)
