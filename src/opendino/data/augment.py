"""Multi-crop augmentation of the DINOv3 recipe on tensors (docs/design/recipe.md §3.5).

Two stages so that the expensive part can run where there is compute:

1. ``MultiCrop.geometric`` (per image, uint8, in data-loader workers): random resized crops (bicubic),
   optional horizontal flips, Gram-teacher crops from the same undistorted base crop.
2. ``photometric`` (batched, float, on any device): colour jitter (p 0.8; brightness 0.4, contrast 0.4,
   saturation 0.2, hue 0.1, in a random order per crop), grayscale (p 0.2), Gaussian blur (kernel 9,
   sigma U(0.1, 2)), solarize (threshold 128) and normalisation, each with per-crop random parameters.

The blur probabilities are those the released models were trained with (dinov3 issue #286): global crop 1
never, global crop 2 with 0.9 (then solarize with 0.2), local crops 0.5.

Images with other than three channels (multispectral, microscopy) keep the operations that mean the same
for any channel: brightness, contrast (towards the mean over all channels), blur and solarize, each
applied to every channel alike. Saturation, hue and grayscale are colour operations of RGB and are
skipped; their random draws still happen, so every crop draws the same numbers whatever its channels.

``MultiCrop.__call__`` runs both stages on one image, for per-sample use in workers; the training loop
can instead collate the uint8 crops and call ``MultiCrop.photometric`` on the whole batch on the GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from opendino.data.normalization import IMAGENET_MEAN, IMAGENET_STD


@dataclasses.dataclass(frozen=True)
class PhotometricPolicy:
    """Probabilities of one crop type."""

    jitter: float = 0.8
    grayscale: float = 0.2
    blur: float = 0.0
    solarize: float = 0.0


# Effective probabilities of the official pipeline (docs/design/recipe.md §3.5, §9.1).
GLOBAL_1 = PhotometricPolicy(blur=0.0)
GLOBAL_2 = PhotometricPolicy(blur=0.9, solarize=0.2)
LOCAL = PhotometricPolicy(blur=0.5)
JITTER = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
BLUR_KERNEL, BLUR_SIGMA = 9, (0.1, 2.0)


@dataclasses.dataclass
class CropConfig:
    global_size: int = 224
    local_size: int = 96
    n_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    horizontal_flips: bool = True
    gram_size: int | None = None  # Gram-teacher crops (e.g. 2x the global size), from the same base crop
    gram_no_distortions: bool = True
    mean: tuple[float, ...] = IMAGENET_MEAN  # one value per channel
    std: tuple[float, ...] = IMAGENET_STD


CropBox = tuple[int, int, int, int, bool]  # top, left, height, width, flipped


def _crop_box(height: int, width: int, scale: Sequence[float], flips: bool, rng: random.Random) -> CropBox:
    top, left, h, w = _rrc_params(height, width, scale, rng)
    return top, left, h, w, flips and rng.random() < 0.5


def _apply_box(img: Tensor, box: Sequence[int], size: int) -> Tensor:
    top, left, h, w, flipped = (int(v) for v in box)
    out = TF.resized_crop(
        img, top, left, h, w, [size, size], interpolation=v2.InterpolationMode.BICUBIC, antialias=True
    )
    return TF.horizontal_flip(out) if flipped else out


def _rrc_params(height: int, width: int, scale: Sequence[float], rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop rule (10 tries, then a central crop), written out because its
    ``get_params`` draws from torch's global generator and per-sample streams must be reproducible."""
    area = height * width
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ratio = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < 3 / 4:
        w, h = width, round(width / (3 / 4))
    elif in_ratio > 4 / 3:
        h, w = height, round(height * (4 / 3))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class MultiCrop:
    def __init__(self, config: CropConfig | None = None) -> None:
        self.config = config or CropConfig()

    def crop_boxes(self, height: int, width: int, generator: torch.Generator | None = None) -> Tensor:
        """The crops of one ``height x width`` image, int64 ``[2 + n_local, 5]`` rows ``(top, left, height,
        width, flipped)``: the two global (base) crops, then the local ones."""
        c = self.config
        # Crop parameters are cheap scalars: one Python stream per image, seeded from the torch generator.
        rng = random.Random(int(torch.randint(2**62, (1,), generator=generator)))
        boxes = [_crop_box(height, width, c.global_scale, c.horizontal_flips, rng) for _ in range(2)]
        boxes += [_crop_box(height, width, c.local_scale, c.horizontal_flips, rng) for _ in range(c.n_local)]
        return torch.tensor(boxes, dtype=torch.int64)

    def geometric(self, img: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """uint8 ``[C, H, W]`` -> uint8 ``global [2, C, S, S]``, ``local [n, C, s, s]`` (+ ``gram``)."""
        c = self.config
        boxes = self.crop_boxes(*img.shape[-2:], generator)
        bases = torch.stack([_apply_box(img, box, self.base_size) for box in boxes[:2]])
        out = self._from_bases(bases)
        local = [_apply_box(img, box, c.local_size) for box in boxes[2:]]
        out["local"] = torch.stack(local) if local else img.new_empty(0, img.shape[0], c.local_size, c.local_size)
        return out

    @property
    def base_size(self) -> int:
        """The size the global crops are cut at: the Gram-teacher size when there is one (the global crops
        are then resized from those, so that both show the same pixels)."""
        return max(self.config.global_size, self.config.gram_size or 0)

    def _from_bases(self, bases: Tensor) -> dict[str, Tensor]:
        c = self.config
        shape = bases.shape[:-3]
        out = {"global": _resize(bases.flatten(0, -4), c.global_size).unflatten(0, shape)}
        if c.gram_size:
            out["gram"] = bases if c.gram_size == self.base_size else _resize(bases, c.gram_size)
        return out

    def geometric_collated(self, batch: dict) -> dict:
        """The crops of ``geometric`` for a whole batch on its device: ``images`` (uint8 ``[B, 3, H, W]``,
        zero-padded) and their ``boxes`` (``[B, 2 + n_local, 5]``) become the crop-major uint8 ``global``,
        ``local`` (and ``gram``) of the collated worker path: the same crops, nearly all pixels within one
        grey level (float weights here, the CPU's fixed-point uint8 kernel there), though upsampling noise-like
        content differs by up to ~20 levels on a fraction of a percent of pixels."""
        c = self.config
        batch = dict(batch)
        images, boxes = batch.pop("images").float(), batch.pop("boxes")
        bases = _to_uint8(resized_crops(images, boxes[:, :2], self.base_size))  # [B, 2, 3, S, S]
        local = _to_uint8(resized_crops(images, boxes[:, 2:], c.local_size))
        out = {**self._from_bases(bases), "local": local}
        return {**batch, **{k: v.transpose(0, 1).flatten(0, 1) for k, v in out.items()}}

    def photometric(self, crops: dict[str, Tensor], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Distorts and normalises uint8 crops (any leading batch shape, any device); Gram-teacher crops are
        only normalised when ``gram_no_distortions``."""
        c = self.config
        out = {}
        g = crops["global"]  # [..., 2, 3, S, S]
        first = photometric(g[..., 0, :, :, :], GLOBAL_1, c.mean, c.std, generator)
        second = photometric(g[..., 1, :, :, :], GLOBAL_2, c.mean, c.std, generator)
        out["global"] = torch.stack([first, second], dim=-4)
        local = crops["local"]
        out["local"] = photometric(local.flatten(0, -4), LOCAL, c.mean, c.std, generator).view(local.shape)
        if "gram" in crops:
            gram = crops["gram"]
            if c.gram_no_distortions:
                out["gram"] = normalize(gram, c.mean, c.std)
            else:  # resize the distorted global crops instead
                size = [c.gram_size, c.gram_size]
                flat = out["global"].flatten(0, -4)
                out["gram"] = F.interpolate(flat, size=size, mode="bicubic", align_corners=False).view(
                    *out["global"].shape[:-2], *size
                )
        return out

    def photometric_collated(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> dict:
        """``photometric`` on a collated crop-major batch (``global`` ``[2B, 3, S, S]``: crop 1 of every
        image, then crop 2), e.g. uint8 crops moved to the GPU by the training loop."""
        crops = {k: batch[k] for k in ("global", "local", "gram") if k in batch}
        crops["global"] = crops["global"].unflatten(0, (2, -1)).transpose(0, 1)  # [B, 2, 3, S, S]
        if "gram" in crops:
            crops["gram"] = crops["gram"].unflatten(0, (2, -1)).transpose(0, 1)
        out = self.photometric(crops, generator)
        for key in ("global", "gram"):
            if key in out:
                out[key] = out[key].transpose(0, 1).flatten(0, 1)
        return {**batch, **out}

    def __call__(self, img: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        return self.photometric(self.geometric(img, generator), generator)


def _resize(img: Tensor, size: int) -> Tensor:
    if img.shape[-1] == size:
        return img
    return TF.resize(img, [size, size], interpolation=v2.InterpolationMode.BICUBIC, antialias=True)


def _to_uint8(x: Tensor) -> Tensor:
    return x.clamp_(0, 255).round_().to(torch.uint8)


def _bicubic_aa(x: Tensor) -> Tensor:
    """The cubic convolution kernel with a = -0.5, which PIL and PyTorch's antialiased bicubic use."""
    x = x.abs()
    a = -0.5
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def _resize_weights(
    start: Tensor, length: Tensor, out_size: int, in_size: int, flipped: Tensor | None = None
) -> Tensor:
    """``[..., out_size, in_size]``: row ``i`` holds the weights of input positions ``0 .. in_size - 1`` in
    output position ``i`` of an antialiased bicubic resize of ``[start, start + length)`` to ``out_size``
    (the rule of PIL and ``F.interpolate(antialias=True)``: the kernel widened by the downscale factor,
    cut at the crop's edges, each row normalised); rows reversed where ``flipped``."""
    start, length = start.float()[..., None, None], length.float()[..., None, None]
    scale = length / out_size
    centre = (torch.arange(out_size, device=start.device)[:, None] + 0.5) * scale + start
    position = torch.arange(in_size, device=start.device) + 0.5
    weights = _bicubic_aa((position - centre) / scale.clamp(min=1))
    weights = weights * ((position > start) & (position < start + length))
    weights = weights / weights.sum(-1, keepdim=True)
    if flipped is None:
        return weights
    return torch.where(flipped.bool()[..., None, None], weights.flip(-2), weights)


def resized_crops(images: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Float ``[B, k, 3, size, size]``: ``k`` resized (and flipped) crops per image of float ``images``
    ``[B, 3, H, W]``, given as ``boxes`` ``[B, k, 5]`` rows ``(top, left, height, width, flipped)``. A resize
    is separable, so each crop is two matrix products (``Wy @ image @ Wx^T``) and the whole batch two
    batched ones: one kernel each on a GPU instead of ``k x B`` interpolations."""
    b, channels, height, width = images.shape
    k = boxes.shape[1]
    wy = _resize_weights(boxes[..., 0], boxes[..., 2], size, height)  # [B, k, S, H]
    wx = _resize_weights(boxes[..., 1], boxes[..., 3], size, width, boxes[..., 4])  # [B, k, S, W]
    columns = images.transpose(1, 2).reshape(b, height, channels * width)  # [B, H, (C, W)]
    rows = torch.bmm(wy.reshape(b, k * size, height), columns)  # [B, (k, S), (C, W)]
    out = torch.bmm(rows.view(b * k, size * channels, width), wx.view(b * k, size, width).transpose(1, 2))
    return out.view(b, k, size, channels, size).transpose(2, 3)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(x / 255 - mean) / std`` per channel, for any number of channels (one value of each per channel)."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images
    if not len(mean) == len(std) == x.shape[-3]:
        raise ValueError(
            f"normalisation: {len(mean)} mean and {len(std)} std values for images of {x.shape[-3]} channels: "
            "give one per channel (crops.mean / crops.std; `opendino data stats PATH` measures them)"
        )
    m = torch.tensor(mean, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, device=x.device).view(-1, 1, 1)
    return (x - m) / s


# -- batched photometric operations with per-sample parameters --------------------------------------------
def _is_rgb(x: Tensor) -> bool:
    return x.shape[1] == 3


def _gray(x: Tensor) -> Tensor:
    """Luminance of RGB crops; the mean over the channels of others (the reference of contrast)."""
    if not _is_rgb(x):
        return x.mean(1, keepdim=True)
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blend(a: Tensor, b: Tensor, ratio: Tensor) -> Tensor:
    return (ratio.view(-1, 1, 1, 1) * a + (1 - ratio.view(-1, 1, 1, 1)) * b).clamp(0, 1)


def _rgb_to_hsv(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp(min=1e-12), torch.zeros_like(maxc))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], 1)


def _hsv_to_rgb(x: Tensor) -> Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = torch.stack(
        [torch.stack(c, 1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))], 0
    )  # [6, B, 3, H, W]
    return table.gather(0, i[None, :, None].expand(1, -1, 3, -1, -1)).squeeze(0)


def _adjust(x: Tensor, op: int, factor: Tensor) -> Tensor:
    if op == 0:  # brightness
        return (x * factor.view(-1, 1, 1, 1)).clamp(0, 1)
    if op == 1:  # contrast: blend with the mean grey level of the image
        return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), factor)
    if not _is_rgb(x):  # saturation and hue are colour operations of RGB only
        return x
    if op == 2:  # saturation: blend with the greyscale image
        return _blend(x, _gray(x), factor)
    hsv = _rgb_to_hsv(x)
    hsv[:, 0] = (hsv[:, 0] + factor.view(-1, 1, 1)) % 1.0
    return _hsv_to_rgb(hsv)


def _gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    radius = BLUR_KERNEL // 2
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None].to(x.dtype) ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)  # [B, k]
    B, C, H, W = x.shape
    flat = x.reshape(1, B * C, H, W)
    k = kernel.repeat_interleave(C, 0)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, k.view(B * C, 1, 1, -1), groups=B * C)
    flat = F.conv2d(flat, k.view(B * C, 1, -1, 1), groups=B * C)
    return flat.view(B, C, H, W)


def sample_photometric_params(
    n: int, policy: PhotometricPolicy, generator: torch.Generator | None = None, device=None
) -> dict[str, Tensor]:
    """Per-crop random parameters; drawn on ``device`` so batched GPU use needs no host round trip."""
    kw = {"generator": generator, "device": device}
    u = lambda *shape: torch.rand(*shape, **kw)  # noqa: E731
    b, c, s, h = JITTER["brightness"], JITTER["contrast"], JITTER["saturation"], JITTER["hue"]
    return {
        "jitter": u(n) < policy.jitter,
        "order": torch.argsort(u(n, 4), dim=1),  # a random order of the four jitter operations per crop
        "factors": torch.stack(
            [1 - b + 2 * b * u(n), 1 - c + 2 * c * u(n), 1 - s + 2 * s * u(n), -h + 2 * h * u(n)], dim=1
        ),
        "grayscale": u(n) < policy.grayscale,
        "blur": u(n) < policy.blur,
        "sigma": BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u(n),
        "solarize": u(n) < policy.solarize,
    }


def photometric(
    images: Tensor,
    policy: PhotometricPolicy,
    mean: Sequence[float],
    std: Sequence[float],
    generator: torch.Generator | None = None,
    params: dict[str, Tensor] | None = None,
) -> Tensor:
    """uint8 or [0, 1] float ``[..., C, H, W]`` -> distorted and normalised float crops, same shape."""
    shape = images.shape
    x = images.reshape(-1, *shape[-3:])
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    p = params or sample_photometric_params(x.shape[0], policy, generator, x.device)
    distort = _distort_indexed if x.device.type == "cpu" else _distort_masked_compiled()
    return normalize(distort(x, p, policy.solarize > 0), mean, std).view(shape)


def _distort_indexed(x: Tensor, p: dict[str, Tensor], solarize: bool) -> Tensor:
    """Each operation runs only on the crops that get it: least work, but the indices are read on the
    host, which is free on the CPU (the per-sample worker path) and a stall on an accelerator."""
    for slot in range(4):
        for op in range(4):
            idx = (p["jitter"] & (p["order"][:, slot] == op)).nonzero().squeeze(1)
            if idx.numel():
                x = x.index_copy(0, idx, _adjust(x[idx], op, p["factors"][idx, op]))
    if _is_rgb(x):
        x = torch.where(p["grayscale"].view(-1, 1, 1, 1), _gray(x).expand_as(x), x)
    idx = p["blur"].nonzero().squeeze(1)
    if idx.numel():
        x = x.index_copy(0, idx, _gaussian_blur(x[idx], p["sigma"][idx]))
    if solarize:
        x = torch.where(p["solarize"].view(-1, 1, 1, 1) & (x >= 128 / 255), 1 - x, x)
    return x


def _distort_masked(x: Tensor, p: dict[str, Tensor], solarize: bool) -> Tensor:
    """The same result as ``_distort_indexed`` without host synchronisation: every operation runs on every
    crop and a per-crop mask selects. Meant to be compiled, which fuses it into a few kernels."""
    per_crop = lambda m: m.view(-1, 1, 1, 1)  # noqa: E731
    for slot in range(4):
        op = p["order"][:, slot]
        factor = p["factors"].gather(1, op[:, None]).squeeze(1)
        for k in range(4):
            x = torch.where(per_crop(p["jitter"] & (op == k)), _adjust(x, k, factor), x)
    if _is_rgb(x):
        x = torch.where(per_crop(p["grayscale"]), _gray(x).expand_as(x), x)
    x = torch.where(per_crop(p["blur"]), _gaussian_blur(x, p["sigma"]), x)
    if solarize:
        x = torch.where(per_crop(p["solarize"]) & (x >= 128 / 255), 1 - x, x)
    return x


@functools.cache
def _distort_masked_compiled():
    return torch.compile(_distort_masked, dynamic=False)
