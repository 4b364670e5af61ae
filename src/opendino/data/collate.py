"""Collate for the student-teacher recipe: crop-major stacking and iBOT masks (docs/design/recipe.md §3.4).

Of the ``2B`` global crops of a batch, ``int(2B * mask_probability)`` are masked, crop ``i`` of those with
exactly ``int(N * r_i)`` tokens for ``r = linspace(min_ratio, max_ratio, n_masked + 1)[1:]``; the list of
masks is then shuffled over all ``2B`` crops, so an image's two crops are masked independently.

With several ranks, the masks are drawn for the global batch and each rank keeps its images' rows
(``rows``): the masks of a step do not depend on how the batch is split, so a run gives the same losses
on any number of ranks (the official code draws per rank). Each rank draws all ``2 x world x B`` masks,
about 30 us each on a 14x14 grid (80 us at 48x48; one CPU core), in its data workers: 30 ms per
step for 8 ranks of 64 images.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from opendino.data.masking import BlockMaskGenerator


def collate_masks(
    n_crops: int,
    n_tokens: int,
    generator: BlockMaskGenerator,
    mask_ratio: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    rows: Tensor | None = None,
    pad: bool = False,
) -> dict[str, Tensor]:
    """iBOT masks for ``n_crops`` global crops of ``n_tokens`` patches each, with the derived tensors the
    losses need: flat masked indices, per-token weights (1 / #masked in its crop) and the masked count.
    ``rows``: the crops to keep (this rank's share of the global batch); default all.

    ``pad``: the masked rows padded to the most this rank's crops can hold (the sum of the largest counts
    the ratios give, fixed for a batch size), so every step has the same shapes (a compiled or captured
    step). Padding rows point at token 0 and weigh 0; ``mask_valid`` tells them apart."""
    if generator.num_patches != n_tokens:
        raise ValueError(f"mask generator grid has {generator.num_patches} cells, crops have {n_tokens} tokens")
    n_masked = int(n_crops * mask_probability)
    probs = np.linspace(mask_ratio[0], mask_ratio[1], n_masked + 1)
    counts = [int(n_tokens * probs[i + 1]) for i in range(n_masked)] + [0] * (n_crops - n_masked)
    masks = [torch.from_numpy(generator(c).reshape(-1)) for c in counts]
    generator.py_rng.shuffle(masks)
    collated = torch.stack(masks)  # [n_crops, N]
    if rows is not None:
        collated = collated[rows]
    per_crop = collated.sum(-1, keepdim=True).clamp(min=1)
    out = {
        "collated_masks": collated,
        "mask_indices_list": collated.flatten().nonzero().flatten(),
        "masks_weight": (1.0 / per_crop).expand_as(collated)[collated],
        "n_masked_patches": torch.tensor([int(collated.sum())]),
        "upperbound": sum(counts),
    }
    if pad:  # every mask has exactly its count of tokens, so this bound holds whatever the shuffle gave
        bound = sum(sorted(counts, reverse=True)[: len(collated)])
        n = out["mask_indices_list"].numel()
        out["mask_indices_list"] = F.pad(out["mask_indices_list"], (0, bound - n))
        out["masks_weight"] = F.pad(out["masks_weight"], (0, bound - n))
        out["mask_valid"] = torch.arange(bound) < n
    return out


def stack_crop_major(per_image: list[Tensor]) -> Tensor:
    """Per-image crop stacks ``[n, ...]`` -> ``[crop 0 of every image, crop 1 of every image, ...]``."""
    return torch.stack(per_image, dim=1).flatten(0, 1)
