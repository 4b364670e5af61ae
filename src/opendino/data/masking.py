"""iBOT block masking with the official semantics (docs/design/recipe.md §3.4).

``BlockMaskGenerator(n)`` returns a ``[H, W]`` boolean mask with exactly ``n`` masked cells: random
rectangles (area and log-aspect drawn uniformly, at most ``max_num_patches`` cells per rectangle, 10
attempts each) until no rectangle fits, then the remainder uniformly at random. The generator owns its
random streams (a ``random.Random`` and a numpy ``RandomState``); seeded like the official code's global
generators they give the official masks exactly.
"""

from __future__ import annotations

import math
import random

import numpy as np


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
