"""Copy-detection descriptors of an image, computed where it is decoded: a digest of its pixels (exact
copies) and a thumbnail descriptor (near copies).

The thumbnail is the image in grey, reduced to 16 x 16 (antialiased), minus its mean, at unit length: the
cosine of two of them is high for a re-encoded, slightly shifted or rescaled copy and, unlike the cosine
of self-supervised embeddings (which put distinct images of one concept close together: that is what they
are trained for), lower for a different image of the same kind. It plays the part of DINOv2's
copy-detection embeddings (SSCD), which are not a dependency here."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

THUMBNAIL_SIDE = 16


def thumbnail_descriptor(img: Tensor) -> np.ndarray:
    """``[THUMBNAIL_SIDE ** 2]`` float16, zero mean, unit length (zero for a flat image)."""
    grey = img.float().mean(0, keepdim=True) / 255.0
    small = TF.resize(grey, [THUMBNAIL_SIDE, THUMBNAIL_SIDE], antialias=True).flatten()
    small = small - small.mean()
    return (small / small.norm().clamp_min(1e-6)).to(torch.float16).numpy()


def copy_descriptors(img: Tensor) -> tuple[str, np.ndarray]:
    """The pixel digest (shape and bytes of the decoded image) and the thumbnail descriptor."""
    digest = hashlib.sha1(str(tuple(img.shape)).encode() + img.numpy().tobytes()).hexdigest()
    return digest, thumbnail_descriptor(img)
