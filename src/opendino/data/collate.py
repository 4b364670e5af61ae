"""Collate for the student-teacher recipe: crop-major stacking and iBOT masks (recipe.md §3.4).

Of the ``2B`` global crops of a batch, ``int(2B * mask_probability)`` are masked, crop ``i`` of those with
exactly ``int(N * r_i)`` tokens for ``r = linspace(min_ratio, max_ratio, n_masked + 1)[1:]``; the list of
masks is then shuffled over all ``2B`` crops, so an image's two crops are masked independently.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from opendino.data.masking import BlockMaskGenerator


def collate_masks(
    n_crops: int,
    n_tokens: int,
    generator: BlockMaskGenerator,
    mask_ratio: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
) -> dict[str, Tensor]:
    """iBOT masks for ``n_crops`` global crops of ``n_tokens`` patches each, with the derived tensors the
    losses need: flat masked indices, per-token weights (1 / #masked in its crop) and the masked count."""
    if generator.num_patches != n_tokens:
        raise ValueError(f"mask generator grid has {generator.num_patches} cells, crops have {n_tokens} tokens")
    n_masked = int(n_crops * mask_probability)
    probs = np.linspace(mask_ratio[0], mask_ratio[1], n_masked + 1)
    counts = [int(n_tokens * probs[i + 1]) for i in range(n_masked)] + [0] * (n_crops - n_masked)
    masks = [torch.from_numpy(generator(c).reshape(-1)) for c in counts]
    generator.py_rng.shuffle(masks)
    collated = torch.stack(masks)  # [n_crops, N]
    per_crop = collated.sum(-1, keepdim=True).clamp(min=1)
    return {
        "collated_masks": collated,
        "mask_indices_list": collated.flatten().nonzero().flatten(),
        "masks_weight": (1.0 / per_crop).expand_as(collated)[collated],
        "n_masked_patches": torch.tensor([int(collated.sum())]),
        "upperbound": sum(counts),
    }


def stack_crop_major(per_image: list[Tensor]) -> Tensor:
    """Per-image crop stacks ``[n, ...]`` -> ``[crop 0 of every image, crop 1 of every image, ...]``."""
    return torch.stack(per_image, dim=1).flatten(0, 1)
