"""JPEG decoding on the training device (``data.decode_on_device``): the data workers read a file's bytes and
its header and draw the crop boxes; the images of a batch are decoded together on the device
(``torchvision.io.decode_jpeg`` with a device: nvJPEG on CUDA, libjpeg-turbo on the CPU), reduced to
``data.max_image_side`` there and cut into crops by ``MultiCrop.geometric_collated``. The CPU workers then
no longer bound the data path by their decode time.

What the device decoder does not take is decoded in the worker as before: anything but an 8-bit JPEG in
RGB or grey (CMYK, PNG, TIFF, arrays, rendered scenes), JPEGs with an EXIF rotation, and JPEGs over
``MAX_SIDE``. A JPEG whose header reads but whose data the device cannot decode is decoded on the CPU of the
training process; one that cannot be decoded at all is replaced by the batch's previous image and listed
among the batch's skipped images.
"""

from __future__ import annotations

import io
import warnings

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from opendino.data.sources import MAX_SIDE, decode_image

JPEG_MAGIC = b"\xff\xd8\xff"
_ORIENTATION = 0x0112  # EXIF tag


def jpeg_header(raw: bytes | None) -> tuple[int, int] | None:
    """``(height, width)`` of a JPEG the device decoder takes (8-bit RGB or grey, no EXIF rotation, sides
    up to ``MAX_SIDE``), read from its header; None for anything else (decode it in the worker)."""
    if raw is None or not raw.startswith(JPEG_MAGIC):
        return None
    try:
        with warnings.catch_warnings(), Image.open(io.BytesIO(raw)) as img:  # the header only
            warnings.simplefilter("ignore")
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return None
            if img.getexif().get(_ORIENTATION, 1) != 1 or max(img.size) > MAX_SIDE:
                return None
            width, height = img.size
    except (OSError, ValueError, SyntaxError):
        return None
    return height, width


def fitted_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """The size an image is reduced to so that its longer side is at most ``max_side`` (aspect kept)."""
    if max(height, width) <= max_side:
        return height, width
    scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def fit_side(img: Tensor, max_side: int) -> Tensor:
    """A huge image reduced to ``max_side`` (antialiased bicubic), so that one of them cannot blow up the
    padded batch of whole images."""
    size = fitted_size(*img.shape[-2:], max_side)
    if size == tuple(img.shape[-2:]):
        return img
    return TF.resize(img, list(size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)


def decode_batch(
    jpegs: list[Tensor | None], decoded: list[Tensor | None], names: list[str], max_side: int, device: torch.device
) -> tuple[list[Tensor], list[str]]:
    """The batch's images on ``device`` in sample order: ``jpegs[i]`` (the file's bytes, uint8) decoded on the
    device, else ``decoded[i]`` (decoded in the worker). Returns them and the names of undecodable ones."""
    slots = [i for i, data in enumerate(jpegs) if data is not None]
    images: list[Tensor | None] = [None if d is None else d.to(device, non_blocking=True) for d in decoded]
    if slots:
        data = [jpegs[i] for i in slots]
        try:
            out = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one file the device decoder refuses fails the batched call: one at a time
            out = [_decode_one(d, device) for d in data]
        for i, img in zip(slots, out, strict=True):
            images[i] = None if img is None else fit_side(img, max_side)
    skipped = [names[i] for i, img in enumerate(images) if img is None]
    if len(skipped) == len(images):
        raise RuntimeError(f"no image of the batch could be decoded: {skipped[:3]}")
    # An undecodable file (its header read) takes the previous image's place, as a worker replaces one.
    for i in range(len(images)):
        if images[i] is None:
            images[i] = next(img for img in images[i - 1 :: -1] + images[i:] if img is not None)
    return images, skipped


def _decode_one(data: Tensor, device: torch.device) -> Tensor | None:
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        image = decode_image(bytes(data.numpy()))  # the CPU's decoders; None when none can read it
        return None if image is None else image.to(device)
