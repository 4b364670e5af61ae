"""iBOT block masking with the official semantics (docs/design/recipe.md §3.4).

``BlockMaskGenerator(n)`` returns a ``[H, W]`` boolean mask with exactly ``n`` masked cells: random
rectangles (area and log-aspect drawn uniformly, at most ``max_num_patches`` cells per rectangle, 10
attempts each) until no rectangle fits, then the remainder uniformly at random. The generator owns its
random streams (a ``random.Random`` and a numpy ``RandomState``); seeded like the official code's global
generators they give the official masks exactly.

``multiblock_masks`` draws I-JEPA multi-block context / target index sets (docs/design/peers.md §2),
from a ``torch.Generator``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


class BlockMaskGenerator:
    def __init__(
        self,
        input_size: int | tuple[int, int],
        max_num_patches: float | None = None,
        min_num_patches: int = 4,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        seed: int | None = None,
    ) -> None:
        self.height, self.width = (input_size, input_size) if isinstance(input_size, int) else input_size
        self.num_patches = self.height * self.width
        self.max_num_patches = 0.5 * self.num_patches if max_num_patches is None else max_num_patches
        self.min_num_patches = min_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.py_rng = random.Random(seed)
        self.np_rng = np.random.RandomState(seed)

    def seed(self, seed: int) -> None:
        self.py_rng.seed(seed)
        self.np_rng.seed(seed)

    def _add_block(self, mask: np.ndarray, max_mask_patches: float) -> int:
        added = 0
        for _ in range(10):
            target_area = self.py_rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(self.py_rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = self.py_rng.randint(0, self.height - h)
                left = self.py_rng.randint(0, self.width - w)
                window = mask[top : top + h, left : left + w]
                new = h * w - int(window.sum())
                if 0 < new <= max_mask_patches:
                    window[...] = True
                    added = new
                if added > 0:
                    break
        return added

    def __call__(self, num_masking_patches: int = 0) -> np.ndarray:
        if not 0 <= num_masking_patches <= self.num_patches:
            raise ValueError(f"cannot mask {num_masking_patches} of {self.num_patches} patches")
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            added = self._add_block(mask, min(num_masking_patches - count, self.max_num_patches))
            if added == 0:
                break
            count += added
        # The remainder, uniformly among the unmasked cells (the official code always makes this draw).
        flat = mask.reshape(-1)
        chosen = self.np_rng.choice(np.flatnonzero(~flat), num_masking_patches - count, replace=False)
        flat[chosen] = True
        return mask


# -- I-JEPA multi-block masks ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MultiBlockSpec:
    """The I-JEPA multi-block masking recipe (docs/design/peers.md §2); the defaults are the paper's."""

    n_targets: int = 4  # target blocks per image (each one predicted separately)
    target_scale: tuple[float, float] = (0.15, 0.2)  # target block area as a fraction of the grid
    target_aspect: tuple[float, float] = (0.75, 1.5)  # target block height / width
    context_scale: tuple[float, float] = (0.85, 1.0)  # context block area (before removing targets) / grid
    context_aspect: tuple[float, float] = (1.0, 1.0)  # context block height / width
    min_keep: int = 10  # a context must keep strictly more than this many cells after the targets are removed
    max_tries: int = 20  # failed context placements before the last target leaves the constraint set


@dataclass
class MultiBlockSample:
    """Untruncated draw of :func:`sample_multiblock` (one entry per image)."""

    target_shape: tuple[int, int]  # (h, w) of every target block in the batch
    context_shape: tuple[int, int]  # (h, w) of every context block in the batch, before target removal
    contexts: list[Tensor]  # per image: sorted raster indices of the context cells
    targets: list[list[Tensor]]  # per image, per target block: sorted raster indices of its cells
    constraints_kept: list[int]  # per image: how many targets the context still avoids (< n_targets: relaxed)


def _check_range(name: str, rng: tuple[float, float], upper: float | None) -> None:
    lo, hi = rng
    if not (0 < lo <= hi) or (upper is not None and hi > upper):
        bound = f" <= {upper}" if upper is not None else ""
        raise ValueError(f"{name}={rng} must satisfy 0 < low <= high{bound}")


def _validate(batch_size: int, grid: tuple[int, int], spec: MultiBlockSpec) -> tuple[int, int]:
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if len(grid) != 2 or any(int(s) != s for s in grid):
        raise ValueError(f"grid={grid} must be two integers (rows, columns)")
    H, W = int(grid[0]), int(grid[1])
    if H < 2 or W < 2:
        raise ValueError(f"grid={grid}: blocks must be smaller than the grid, so each side needs >= 2 cells")
    if spec.n_targets < 1:
        raise ValueError(f"n_targets={spec.n_targets} must be >= 1")
    if spec.max_tries < 1:
        raise ValueError(f"max_tries={spec.max_tries} must be >= 1")
    if spec.min_keep < 0:
        raise ValueError(f"min_keep={spec.min_keep} must be >= 0")
    if H * W <= spec.min_keep:
        raise ValueError(f"grid {H}x{W} has {H * W} cells, too few to keep more than min_keep={spec.min_keep}")
    _check_range("target_scale", spec.target_scale, 1.0)
    _check_range("context_scale", spec.context_scale, 1.0)
    _check_range("target_aspect", spec.target_aspect, None)
    _check_range("context_aspect", spec.context_aspect, None)
    return H, W


def _block_shape(H: int, W: int, u: float, scale: tuple[float, float], aspect: tuple[float, float]) -> tuple[int, int]:
    """Block (h, w) from one uniform ``u``: scale and aspect both interpolate their range with the same ``u``."""
    s = scale[0] + u * (scale[1] - scale[0])
    ar = aspect[0] + u * (aspect[1] - aspect[0])
    k = int(H * W * s)
    h, w = round(math.sqrt(k * ar)), round(math.sqrt(k / ar))
    while h >= H:
        h -= 1
    while w >= W:
        w -= 1
    return max(h, 1), max(w, 1)


def _place(H: int, W: int, h: int, w: int, generator: torch.Generator) -> Tensor:
    """An ``[H, W]`` boolean mask of one h x w block whose top-left corner is uniform in [0, H-h) x [0, W-w)."""
    top = int(torch.randint(0, H - h, (1,), generator=generator))
    left = int(torch.randint(0, W - w, (1,), generator=generator))
    mask = torch.zeros(H, W, dtype=torch.bool)
    mask[top : top + h, left : left + w] = True
    return mask


def sample_multiblock(
    batch_size: int, grid: tuple[int, int], generator: torch.Generator, spec: MultiBlockSpec
) -> MultiBlockSample:
    """The untruncated multi-block draw behind :func:`multiblock_masks` (see there for the rules)."""
    H, W = _validate(batch_size, grid, spec)
    # Random-draw order: target size, context size, then per image its targets' corners and its context tries.
    u_tgt = float(torch.rand(1, generator=generator))
    u_ctx = float(torch.rand(1, generator=generator))
    th, tw = _block_shape(H, W, u_tgt, spec.target_scale, spec.target_aspect)
    ch, cw = _block_shape(H, W, u_ctx, spec.context_scale, spec.context_aspect)
    if ch * cw <= spec.min_keep:
        raise ValueError(
            f"the {ch}x{cw} context block drawn for grid {H}x{W} cannot keep more than min_keep={spec.min_keep} "
            "cells; raise context_scale or lower min_keep"
        )
    contexts, targets, kept = [], [], []
    for _ in range(batch_size):
        blocks = [_place(H, W, th, tw, generator) for _ in range(spec.n_targets)]
        constraints = list(blocks)
        failures = 0
        while True:
            ctx = _place(H, W, ch, cw, generator)
            for t in constraints:
                ctx &= ~t
            if int(ctx.sum()) > spec.min_keep:
                break
            failures += 1
            if failures >= spec.max_tries and constraints:
                constraints.pop()  # relax: the context may now overlap the last remaining target
                failures = 0
        contexts.append(ctx.flatten().nonzero().squeeze(1))
        targets.append([b.flatten().nonzero().squeeze(1) for b in blocks])
        kept.append(len(constraints))
    return MultiBlockSample((th, tw), (ch, cw), contexts, targets, kept)


def multiblock_masks(
    batch_size: int, grid: tuple[int, int], generator: torch.Generator, spec: MultiBlockSpec
) -> tuple[Tensor, Tensor]:
    """I-JEPA multi-block masks for a batch on a ``grid = (H, W)`` patch grid.

    Returns ``context [B, K_ctx]`` and ``targets [B, n_targets, K_tgt]``: long tensors of raster indices
    (``row * W + col``), each list sorted ascending. The rules:

    * Block sizes are shared by the whole batch: one uniform number ``u`` is drawn for the targets and one
      for the context, and ``u`` sets *both* the scale and the aspect (``low + u * (high - low)`` in each
      range), so large targets are also the tall ones.
    * A block of scale ``s`` and aspect ``ar`` (height / width) has ``k = int(H * W * s)`` cells nominally,
      ``h = round(sqrt(k * ar))`` rows and ``w = round(sqrt(k / ar))`` columns; each side is decreased until it
      is strictly smaller than the grid side.
    * A block's top-left corner is uniform in ``[0, H - h) x [0, W - w)``: the upper bound is exclusive, so a
      block never touches the last row / column it could reach.
    * Each image gets ``n_targets`` target blocks, placed independently (they may overlap each other).
    * Each image gets one context block with every target cell removed. It is accepted when strictly more
      than ``min_keep`` cells remain; otherwise it is re-placed. After ``max_tries`` consecutive failures the
      last target still in the constraint set is dropped from it (the context may then overlap that target)
      and the count restarts; this repeats until a placement is accepted.
    * Finally every image's lists are truncated to the batch minimum (contexts and targets separately),
      keeping the first indices in raster order, so the batch stacks into tensors. (All target blocks of a
      batch have the same size, so only contexts actually shrink.)

    Deterministic given the (CPU) ``generator``; pure torch. Raises ValueError for arguments that cannot
    work, e.g. a grid with at most ``min_keep`` cells or a context block that cannot hold ``min_keep`` cells.
    A target block is never checked against ``min_keep`` (it has no constraint to lose cells to).
    """
    draw = sample_multiblock(batch_size, grid, generator, spec)
    k_ctx = min(len(c) for c in draw.contexts)
    k_tgt = min(len(t) for ts in draw.targets for t in ts)
    context = torch.stack([c[:k_ctx] for c in draw.contexts])
    targets = torch.stack([torch.stack([t[:k_tgt] for t in ts]) for ts in draw.targets])
    return context, targets
