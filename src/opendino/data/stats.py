"""Per-channel statistics of an image source: the normalisation that ``crops.mean`` / ``crops.std`` expect.

``channel_stats(source, max_images, seed)`` reads up to ``max_images`` images of any source (a seeded random
subset, read in index order, when it holds more), decoded as training decodes them: 8 bits per channel, to
``source.channels`` channels. It counts, per channel, how many pixels have each of the 256 levels; every
statistic follows exactly from these counts. The mean and standard deviation are those of pixel / 255 over
all pixels read (not an average of per-image values), as ``crops.mean`` / ``crops.std`` take them.
``format_report`` writes what ``opendino data stats`` prints, with a ready-to-paste override line.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from opendino.data.sources import ChannelMismatchError, ImageSource

LEVELS = 256  # 8-bit decode
# A channel whose levels span at most this share of the 8-bit range (32 levels) is nearly flat: most likely
# high-bit-depth data that the decode rule mapped into a few levels (12-bit values in 16-bit files span
# levels 0-16, reflectances x 10000 about 0-39).
LOW_RANGE = 1 / 8


def sample_indices(n: int, max_images: int, seed: int) -> list[int]:
    """All of ``range(n)`` when ``n <= max_images``, else ``max_images`` of them drawn from ``seed``, sorted
    (files, tar shards, are then read in order)."""
    if n <= max_images:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), max_images))


def level_counts(image: Tensor) -> Tensor:
    """``[C, 256]`` int64: how many pixels of each channel of a uint8 ``[C, H, W]`` image have each level."""
    return torch.stack([torch.bincount(plane.reshape(-1), minlength=LEVELS) for plane in image])


@dataclasses.dataclass
class ChannelStats:
    """What ``channel_stats`` read: per-channel level counts, image counts and sizes (as decoded)."""

    channels: int
    total: int  # images in the source
    counts: np.ndarray  # [channels, 256] int64 pixels per level
    images: int = 0  # images read
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, reason)
    heights: tuple[int, int] | None = None  # (smallest, largest), None before any image
    widths: tuple[int, int] | None = None

    def add(self, image: Tensor) -> None:
        """Counts one decoded ``[channels, H, W]`` uint8 image."""
        self.counts += level_counts(image).numpy()
        self.images += 1
        h, w = int(image.shape[1]), int(image.shape[2])
        self.heights = (h, h) if self.heights is None else (min(self.heights[0], h), max(self.heights[1], h))
        self.widths = (w, w) if self.widths is None else (min(self.widths[0], w), max(self.widths[1], w))

    @property
    def pixels(self) -> int:
        """Pixels read per channel."""
        return int(self.counts[0].sum())

    @property
    def mean(self) -> list[float]:
        """Per channel, the mean of pixel / 255 over all pixels read."""
        values = np.arange(LEVELS, dtype=np.float64) / (LEVELS - 1)
        return [float(row @ values / row.sum()) for row in self.counts.astype(np.float64)]

    @property
    def std(self) -> list[float]:
        """Per channel, the population standard deviation of pixel / 255 over all pixels read (two passes
        over the counts: no cancellation)."""
        values = np.arange(LEVELS, dtype=np.float64) / (LEVELS - 1)
        rows = self.counts.astype(np.float64)
        return [float(np.sqrt(row @ (values - m) ** 2 / row.sum())) for row, m in zip(rows, self.mean, strict=True)]

    @property
    def min(self) -> list[int]:
        """Per channel, the lowest 8-bit level of any pixel read."""
        return [int(np.flatnonzero(row)[0]) for row in self.counts]

    @property
    def max(self) -> list[int]:
        """Per channel, the highest 8-bit level of any pixel read."""
        return [int(np.flatnonzero(row)[-1]) for row in self.counts]

    @property
    def low_range(self) -> bool:
        """Whether some channel spans at most ``LOW_RANGE`` of the 8-bit range (``max - min <= 32``)."""
        return any(hi - lo <= LOW_RANGE * LEVELS for lo, hi in zip(self.min, self.max, strict=True))

    def overrides(self) -> str:
        """The configuration overrides for this data: ``crops.mean=[...] crops.std=[...]`` (4 decimals), and
        ``model.in_chans=N`` when the images are not RGB."""
        line = f"crops.mean={_floats(self.mean)} crops.std={_floats(self.std)}"
        return line if self.channels == 3 else f"{line} model.in_chans={self.channels}"

    def to_dict(self) -> dict[str, Any]:
        """The statistics as JSON-ready values (``--json``)."""
        return {
            "channels": self.channels,
            "images_in_source": self.total,
            "images_read": self.images,
            "images_skipped": len(self.skipped),
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "pixels_per_channel": self.pixels,
            "mean": self.mean,
            "std": self.std,
            "min_level": self.min,
            "max_level": self.max,
            "height_range": list(self.heights or ()),
            "width_range": list(self.widths or ()),
            "low_range": self.low_range,
            "overrides": self.overrides(),
        }


def _floats(values: list[float]) -> str:
    return "[" + ",".join(f"{v:.4f}" for v in values) + "]"  # no spaces: one shell word


def channel_stats(source: ImageSource, max_images: int = 2000, seed: int = 0, progress: bool = True) -> ChannelStats:
    """The statistics of up to ``max_images`` images of ``source`` (a subset seeded by ``seed`` when it holds
    more), decoded to ``source.channels`` channels. Unreadable images and images of another channel count
    are skipped and listed in ``skipped``; ``images`` is 0 when none decodes."""
    stats = ChannelStats(source.channels, len(source), np.zeros((source.channels, LEVELS), dtype=np.int64))
    for index in tqdm(sample_indices(len(source), max_images, seed), desc="stats", unit="img", disable=not progress):
        try:
            image = source.decode(index)
        except ChannelMismatchError as e:  # the message names the file: kept as the path
            path = source.path(index)
            stats.skipped.append((path, str(e).removeprefix(f"{path}: ")))
            continue
        if image is None:
            stats.skipped.append((source.path(index), "unreadable"))
            continue
        stats.add(image)
    return stats


def format_report(stats: ChannelStats) -> str:
    """What ``opendino data stats`` prints: counts, sizes, the per-channel table and the override line
    (``low_range_warning`` is the warning for nearly flat data)."""
    if stats.heights is None or stats.widths is None:
        raise ValueError("no image was read: nothing to report")
    mismatched = sum(reason != "unreadable" for _, reason in stats.skipped)
    lines = [
        f"{stats.images} images read of {stats.total} ({stats.pixels} pixels per channel); "
        f"{len(stats.skipped)} skipped ({len(stats.skipped) - mismatched} unreadable, {mismatched} with another "
        f"channel count than {stats.channels})",
    ]
    if stats.skipped:
        lines.append(f"first skipped: {stats.skipped[0][0]} ({stats.skipped[0][1]})")
    lines += [
        f"sizes (as decoded, H x W): height {stats.heights[0]}-{stats.heights[1]}, "
        f"width {stats.widths[0]}-{stats.widths[1]}",
        "",
        "channel      mean       std   min   max   (mean, std: of pixel / 255; min, max: 8-bit levels)",
    ]
    for c, (m, s, lo, hi) in enumerate(zip(stats.mean, stats.std, stats.min, stats.max, strict=True)):
        lines.append(f"{c:>7}  {m:8.4f}  {s:8.4f}  {lo:4d}  {hi:4d}")
    lines += ["", "overrides:", f"  {stats.overrides()}"]
    return "\n".join(lines)


def low_range_warning(stats: ChannelStats) -> str:
    """Why nearly flat 8-bit values may come from the decode rule, and what to do about it."""
    flat = [c for c, (lo, hi) in enumerate(zip(stats.min, stats.max, strict=True)) if hi - lo <= LOW_RANGE * LEVELS]
    spans = ", ".join(f"{c}: {stats.max[c] - stats.min[c]}" for c in flat)
    constant = [c for c in flat if stats.max[c] == stats.min[c]]
    also = (
        f" Channels {constant} are constant: their std is 0, which normalisation cannot divide by; drop them."
        if constant
        else ""
    )
    return (
        f"warning: channels span only these numbers of the 255 8-bit steps (1/8 of the range or less): {spans}."
        f"{also} "
        "Images are decoded to 8 bits per image by one rule: uint8 kept; float with max <= 1 scaled by 255; other "
        "values kept when the image's max is <= 255, else divided by 65535 and scaled by 255. So 12-bit data "
        "stored as 16-bit (max 4095) ends up in levels 0-16, and most of its precision is lost. Rescale the "
        "files to the full range (e.g. 16-bit: multiply 12-bit values by 16), or store them as float in [0, 1]."
    )
