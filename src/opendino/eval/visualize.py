"""Pictures of dense features: PCA of patch features as RGB and cosine-similarity maps from one patch.

The PCA picture follows the DINO papers: the first three principal components of an image's patch
features, each stretched to [0, 1], as red, green and blue. With ``foreground`` the first component
separates object from background first (its sign chosen so that the image border is background), and
the colours come from a PCA of the foreground patches only, with the background black.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor


def _components(x: Tensor, k: int) -> Tensor:
    """Projections of the rows of ``x`` on its first ``k`` principal components."""
    centred = x - x.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return centred @ v[:k].t()


def _stretch(x: Tensor) -> Tensor:
    lo, hi = x.quantile(0.01, dim=0), x.quantile(0.99, dim=0)
    return ((x - lo) / (hi - lo).clamp(min=1e-6)).clamp(0, 1)


def pca_rgb(patch: Tensor, foreground: bool = False) -> np.ndarray:
    """``[h, w, D]`` patch features -> ``[h, w, 3]`` uint8."""
    h, w, d = patch.shape
    x = patch.float().reshape(h * w, d)
    rgb = torch.zeros(h * w, 3)
    keep = torch.ones(h * w, dtype=torch.bool)
    if foreground:
        first = _components(x, 1)[:, 0].reshape(h, w)
        border = torch.cat([first[0], first[-1], first[:, 0], first[:, -1]])
        if border.mean() > 0:
            first = -first
        keep = (first > 0).reshape(-1)
        if keep.sum() < 3:
            keep[:] = True
    rgb[keep] = _stretch(_components(x[keep], 3))
    return (rgb.reshape(h, w, 3).numpy() * 255).astype(np.uint8)


def similarity_map(patch: Tensor, row: int, col: int) -> Tensor:
    """Cosine similarity ``[h, w]`` of every patch with patch ``(row, col)``."""
    x = F.normalize(patch.float(), dim=-1)
    return x @ x[row, col]


@dataclass
class Row:
    """One row of a picture sheet: the input as shown (uint8 ``[3, H, W]``), the patch features ``[h, w, D]``
    of one model and the query patch (row, col; None: the centre)."""

    label: str
    image: Tensor
    patch: Tensor
    point: tuple[int, int] | None = None


def sheet(rows: Sequence[Row], title: str | None = None, foreground: bool = False) -> Figure:
    """Rows of input | PCA | similarity to the query patch, with column titles, the model name of each row,
    the query patch outlined in green on all three and one colour bar for the similarities."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fig, axes = plt.subplots(len(rows), 3, figsize=(9.4, 2.9 * len(rows) + 0.5), squeeze=False, layout="constrained")
    shown, query = None, None
    for r, row in enumerate(rows):
        h, w, _ = row.patch.shape
        qr, qc = row.point if row.point is not None else (h // 2, w // 2)
        if not (0 <= qr < h and 0 <= qc < w):
            raise ValueError(f"patch ({qr}, {qc}) is outside the {h} x {w} patch grid")
        height, width = row.image.shape[-2:]
        extent = (0, width, height, 0)  # features drawn over the input's pixels, one square per patch
        sim = similarity_map(row.patch, qr, qc).numpy()
        axes[r, 0].imshow(row.image.permute(1, 2, 0).numpy())
        axes[r, 1].imshow(pca_rgb(row.patch, foreground), interpolation="nearest", extent=extent)
        shown = axes[r, 2].imshow(sim, cmap="inferno", vmin=-1, vmax=1, interpolation="nearest", extent=extent)
        sy, sx = height / h, width / w
        for ax in axes[r]:
            ax.add_patch(Rectangle((qc * sx, qr * sy), sx, sy, fill=False, edgecolor="lime", linewidth=1.5))
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(row.label, fontsize=11)
        if r == 0:  # column titles once; the query again wherever it changes
            pca_title = "PCA of the foreground patches" if foreground else "PCA of the patch features"
            axes[r, 0].set_title("input", fontsize=9)
            axes[r, 1].set_title(f"{pca_title}\n(3 components as RGB)", fontsize=9)
        if (qr, qc) != query:
            axes[r, 2].set_title(f"cosine similarity to the\ngreen patch (row {qr}, col {qc})", fontsize=9)
        query = (qr, qc)
    fig.colorbar(shown, ax=axes[:, 2], shrink=min(1.0, 0.9 / len(rows) ** 0.5), label="cosine similarity")
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def save_figure(fig: Figure, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.inference_mode()
def patch_grid(model: torch.nn.Module, image: Tensor, transform, resolution: int) -> Tensor:
    """The normalised last-layer patch features ``[h, w, D]`` of a decoded uint8 image ``[C, H, W]``: the model
    sees ``transform(image)`` (square, ``resolution`` pixels)."""
    device = next(model.parameters()).device
    tokens = model.eval().forward_features(transform(image)[None].to(device))["x_norm_patchtokens"][0]
    grid = resolution // model.feature_stride
    return tokens.float().cpu().reshape(grid, grid, -1)


def shown_input(image: Tensor, resolution: int, view: Sequence[int] | None = None) -> Tensor:
    """The input as the model sees it (square, ``resolution`` pixels), as the RGB channels ``view``."""
    shown = F.interpolate(rgb_view(image, view)[None].float(), size=(resolution, resolution), mode="bilinear")[0]
    return shown.clamp(0, 255).to(torch.uint8)


def rgb_view(image: Tensor, channels: Sequence[int] | None = None) -> Tensor:
    """The 3 channels of ``image`` ``[C, H, W]`` shown as red, green and blue: ``channels`` (3 indices),
    by default the first three, the only one as grey, or of two the first as magenta and the second as
    green."""
    if channels is None:
        channels = {1: (0, 0, 0), 2: (0, 1, 0)}.get(image.shape[0], (0, 1, 2))
    if len(channels) != 3 or any(not 0 <= c < image.shape[0] for c in channels):
        raise ValueError(f"view channels {list(channels)}: give 3 indices of the image's {image.shape[0]} channels")
    return image[list(channels)]
