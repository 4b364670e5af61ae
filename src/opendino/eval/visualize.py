"""Pictures of dense features: PCA of patch features as RGB and cosine-similarity maps from one patch.

The PCA picture follows the DINO papers: the first three principal components of an image's patch
features, each stretched to [0, 1], as red, green and blue. With ``foreground`` the first component
separates object from background first (its sign chosen so that the image border is background), and
the colours come from a PCA of the foreground patches only, with the background black.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
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


def panel(image: Tensor, patch: Tensor, point: tuple[int, int] | None = None, foreground: bool = False) -> Image.Image:
    """Input | PCA | similarity to the patch at ``point`` (row, col; default: the centre), side by side at
    the input's size (nearest upsampling, so each patch stays a visible square)."""
    from matplotlib import colormaps

    h, w, _ = patch.shape
    row, col = point if point is not None else (h // 2, w // 2)
    if not (0 <= row < h and 0 <= col < w):
        raise ValueError(f"patch ({row}, {col}) is outside the {h} x {w} patch grid")
    size = (image.shape[-1], image.shape[-2])
    source = Image.fromarray(image.permute(1, 2, 0).numpy())
    pca = Image.fromarray(pca_rgb(patch, foreground)).resize(size, Image.NEAREST)
    sim = similarity_map(patch, row, col)
    colours = colormaps["inferno"](((sim + 1) / 2).numpy())[..., :3]
    sim_image = Image.fromarray((colours * 255).astype(np.uint8)).resize(size, Image.NEAREST)
    draw = ImageDraw.Draw(sim_image)
    sy, sx = size[1] / h, size[0] / w
    draw.rectangle([col * sx, row * sy, (col + 1) * sx - 1, (row + 1) * sy - 1], outline=(0, 255, 0))
    out = Image.new("RGB", (3 * size[0] + 8, size[1]), (255, 255, 255))
    for k, im in enumerate((source, pca, sim_image)):
        out.paste(im, (k * (size[0] + 4), 0))
    return out


@torch.inference_mode()
def picture(
    model: torch.nn.Module,
    image: Tensor,
    transform,
    resolution: int,
    point: tuple[int, int] | None = None,
    foreground: bool = False,
    view: Sequence[int] | None = None,
) -> Image.Image:
    """``panel`` for a decoded uint8 image ``[C, H, W]``: the model sees ``transform(image)`` (square,
    ``resolution`` pixels), the input is shown at the same size, as the channels ``view`` (``rgb_view``)."""
    device = next(model.parameters()).device
    tokens = model.eval().forward_features(transform(image)[None].to(device))["x_norm_patchtokens"][0]
    grid = resolution // model.feature_stride
    shown = F.interpolate(rgb_view(image, view)[None].float(), size=(resolution, resolution), mode="bilinear")[0]
    patch = tokens.float().cpu().reshape(grid, grid, -1)
    return panel(shown.clamp(0, 255).to(torch.uint8), patch, point, foreground)


def rgb_view(image: Tensor, channels: Sequence[int] | None = None) -> Tensor:
    """The 3 channels of ``image`` ``[C, H, W]`` shown as red, green and blue: ``channels`` (3 indices),
    by default the first three, the only one as grey, or of two the first as magenta and the second as
    green."""
    if channels is None:
        channels = {1: (0, 0, 0), 2: (0, 1, 0)}.get(image.shape[0], (0, 1, 2))
    if len(channels) != 3 or any(not 0 <= c < image.shape[0] for c in channels):
        raise ValueError(f"view channels {list(channels)}: give 3 indices of the image's {image.shape[0]} channels")
    return image[list(channels)]
