"""The pixel baseline of ``opendino eval --baseline pixels``: the resized raw pixels through the same probes.

:class:`PixelBaseline` has no weights; it looks like a backbone to the feature extractor
(``forward_features`` returns ``x_norm_clstoken`` and ``x_norm_patchtokens``; it has ``feature_stride``,
``family`` and ``model_kwargs``), so k-NN, linear, logistic regression, segmentation, depth and
correspondence read it exactly as they read a network:

- its global feature (the "CLS token") is the normalised image average-pooled to a ``grid x grid`` grid and
  flattened, ``C * grid * grid`` dims (768 for RGB at the default 16 x 16);
- its patch tokens are the raw normalised pixels of each ``patch_size x patch_size`` patch, flattened
  (``C * p * p`` dims, channel-major like the global feature), on the same grid as a model of that stride.

Every number a learned feature scores should clear these: they are what the probes get from the image
itself. The module's configuration is a buffer of its ``state_dict``, so the feature cache (keyed by a
digest of the state dict) never mixes it up with a network or with a pixel baseline of another grid or
stride."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from opendino.models.registry import input_channels


class PixelBaseline(nn.Module):
    """Raw normalised pixels as features: pooled to ``grid x grid`` globally, per patch densely."""

    family = "pixels"

    def __init__(self, patch_size: int, grid: int = 16, in_chans: int = 3) -> None:
        super().__init__()
        if patch_size < 1 or grid < 1 or in_chans < 1:
            raise ValueError(f"patch_size={patch_size}, grid={grid}, in_chans={in_chans}: all must be positive")
        self.patch_size = self.feature_stride = patch_size
        self.grid, self.in_chans = grid, in_chans
        self.embed_dim = in_chans * patch_size * patch_size  # the patch tokens' width
        self.global_dim = in_chans * grid * grid
        self.model_kwargs = {"patch_size": patch_size, "grid": grid, "in_chans": in_chans}
        # Not a weight: the configuration, in the state dict so that the feature cache keys it (1-D: the
        # cache's digest views every tensor as bytes).
        self.register_buffer("pixel_baseline", torch.tensor([patch_size, grid, in_chans]), persistent=True)

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """``x``: normalised images ``[B, C, H, W]``, ``H`` and ``W`` multiples of ``patch_size``; returns
        ``x_norm_clstoken`` ``[B, C * grid * grid]`` and ``x_norm_patchtokens`` ``[B, h * w, C * p * p]``
        (row-major patches), and an empty ``x_storage_tokens`` like the ViTs."""
        b, c, height, width = x.shape
        p = self.patch_size
        if c != self.in_chans:
            raise ValueError(f"pixel baseline of {self.in_chans} channels got images of {c}")
        if height % p or width % p:
            raise ValueError(f"image {height} x {width} is not a multiple of the patch size {p}")
        x = x.float()
        pooled = F.adaptive_avg_pool2d(x, self.grid).flatten(1)
        h, w = height // p, width // p
        patches = x.reshape(b, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c * p * p)
        return {
            "x_norm_clstoken": pooled,
            "x_storage_tokens": x.new_zeros(b, 0, c * p * p),
            "x_norm_patchtokens": patches,
        }

    def forward(self, x: Tensor) -> Tensor:
        """The global feature, like a backbone without a head."""
        return self.forward_features(x)["x_norm_clstoken"]

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, grid={self.grid}, in_chans={self.in_chans}"


def pixel_baseline_like(model: nn.Module, grid: int = 16) -> PixelBaseline:
    """The pixel baseline of an evaluated model: its stride and number of input channels."""
    in_chans = input_channels(model)
    return PixelBaseline(model.feature_stride, grid=grid, in_chans=in_chans)
