"""A mix of image sources read from one manifest: weighted sources and optional homogeneous steps.

A manifest is a YAML file (``.yaml`` / ``.yml``)::

    # opendino data mix
    sources:
      - {name: clustered, path: clustered.txt, weight: 0.6}
      - {name: retrieved, path: retrieved.txt, weight: 0.2}
      - {name: in1k, path: /data/imagenet/train, weight: 0.2}
    homogeneous: {source: in1k, fraction: 0.1}

``path`` is anything ``open_source`` reads except another manifest (a folder, a ``.txt`` / ``.csv`` /
``.tsv`` list, ``.tar`` shards, a glob of them); a relative path is relative to the manifest's folder.
``weight`` is a positive relative number (the weights are normalised to sum 1; 1 when left out).
``homogeneous`` (optional) names the source that a ``fraction`` of the steps draws every image from.

``open_mix(path)`` opens the sources into one :class:`MixedSource`: their records concatenated in manifest
order, with a :class:`Mixture` (``source.mixture``) that ``loader.StepBatchSampler`` follows, so that the
batch of step ``s`` still depends only on ``(seed, s, rank, world)``. ``write_manifest`` writes one (the
curation command's output), so the format has this one home.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from torch import Tensor

from opendino.config import ConfigError
from opendino.data.sources import ChannelMismatchError, ImageSource, NoImagesError, open_source

MANIFEST_EXTENSIONS = (".yaml", ".yml")
HEADER = "# opendino data mix (docs/data.md, Mixing sources)\n"
ENTRY_KEYS = ("name", "path", "weight")
HOMOGENEOUS_KEYS = ("source", "fraction")
FORMAT = (
    "sources: a list of {name: NAME, path: PATH, weight: W > 0}; optional homogeneous: {source: NAME, "
    "fraction: F in [0, 1]}"
)

Entry = tuple[str, str, float]  # (name, path, weight)
Homogeneous = tuple[str, float]  # (source name, fraction of steps)


def is_manifest(path: str | Path) -> bool:
    return Path(path).suffix.lower() in MANIFEST_EXTENSIONS


@dataclasses.dataclass(frozen=True)
class Mixture:
    """How a :class:`MixedSource` is sampled: source ``j`` holds the indices ``offsets[j] .. offsets[j] +
    sizes[j] - 1`` and is drawn with probability ``weights[j]`` (normalised here to sum 1); a ``fraction``
    of the steps draws every image from source ``homogeneous`` (an index, or None)."""

    names: tuple[str, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    weights: tuple[float, ...]
    homogeneous: int | None = None
    fraction: float = 0.0

    def __post_init__(self) -> None:
        k = len(self.names)
        if not k or not (len(self.offsets) == len(self.sizes) == len(self.weights) == k):
            raise ValueError(f"Mixture: names, offsets, sizes and weights need one entry per source (got {self})")
        if any(n <= 0 for n in self.sizes):
            raise ValueError(f"Mixture: every source needs images (sizes {self.sizes})")
        if any(not (w > 0 and math.isfinite(w)) for w in self.weights):
            raise ValueError(f"Mixture: weights must be finite and > 0 (got {self.weights})")
        if self.homogeneous is not None and not 0 <= self.homogeneous < k:
            raise ValueError(f"Mixture: homogeneous={self.homogeneous} is not a source index (0 .. {k - 1})")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"Mixture: fraction={self.fraction} must be in [0, 1]")
        if self.fraction > 0 and self.homogeneous is None:
            raise ValueError("Mixture: a fraction of homogeneous steps needs a homogeneous source")
        total = float(sum(self.weights))
        object.__setattr__(self, "weights", tuple(float(w) / total for w in self.weights))
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "offsets", tuple(int(o) for o in self.offsets))
        object.__setattr__(self, "sizes", tuple(int(n) for n in self.sizes))

    @classmethod
    def of(
        cls,
        names: Sequence[str],
        sizes: Sequence[int],
        weights: Sequence[float],
        homogeneous: Homogeneous | None = None,
    ) -> Mixture:
        """The mixture of sources of ``sizes`` laid end to end, with ``homogeneous`` as ``(name, fraction)``."""
        offsets = [0]
        for n in sizes[:-1]:
            offsets.append(offsets[-1] + n)
        index = None if homogeneous is None else list(names).index(homogeneous[0])
        fraction = 0.0 if homogeneous is None else float(homogeneous[1])
        return cls(tuple(names), tuple(offsets), tuple(sizes), tuple(weights), index, fraction)

    @property
    def total(self) -> int:
        return self.offsets[-1] + self.sizes[-1]

    def source_of(self, index: int) -> int:
        """The source that holds ``index`` (of the concatenated records)."""
        if not 0 <= index < self.total:
            raise IndexError(f"index {index} out of range for a mix of {self.total} images")
        return bisect.bisect_right(self.offsets, index) - 1


def _problem(where: str, what: str) -> ConfigError:
    return ConfigError(f"{where}: {what} ({FORMAT})")


def _check(
    raw_sources: Any, raw_homogeneous: Any, where: str
) -> tuple[list[tuple[str, Any, float]], Homogeneous | None]:
    """The manifest rules (shared by reading and writing): entries, then the homogeneous source."""
    if not isinstance(raw_sources, (list, tuple)) or not raw_sources:
        raise _problem(where, "no sources")
    entries, names = [], set()
    for i, entry in enumerate(raw_sources):
        at = f"{where}: sources[{i}] {entry!r}"
        if not isinstance(entry, dict):
            raise _problem(at, "an entry is a mapping with name, path and weight")
        unknown = sorted(set(entry) - set(ENTRY_KEYS), key=str)
        if unknown:
            raise _problem(at, f"unknown key(s) {', '.join(map(str, unknown))}; valid: {', '.join(ENTRY_KEYS)}")
        name, path, weight = entry.get("name"), entry.get("path"), entry.get("weight", 1.0)
        if not isinstance(name, str) or not name.strip():
            raise _problem(at, "missing name (a non-empty text)")
        if name in names:
            raise _problem(at, f"duplicate name {name!r} (names must be unique)")
        if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
            raise _problem(at, "missing path (a folder, a .txt/.csv/.tsv list, .tar shards or a glob of them)")
        if is_manifest(path):
            raise _problem(at, f"path {path}: a manifest cannot name another manifest (nested mixes)")
        number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
        if not number or not (weight > 0 and math.isfinite(weight)):
            raise _problem(at, f"weight={weight!r}: must be a number > 0 (relative weights, normalised to sum 1)")
        names.add(name)
        entries.append((name, path, float(weight)))
    if raw_homogeneous is None:
        return entries, None
    at = f"{where}: homogeneous {raw_homogeneous!r}"
    if isinstance(raw_homogeneous, (list, tuple)) and len(raw_homogeneous) == 2:  # (name, fraction) in Python
        raw_homogeneous = dict(zip(HOMOGENEOUS_KEYS, raw_homogeneous, strict=True))
    if not isinstance(raw_homogeneous, dict):
        raise _problem(at, "a mapping {source: NAME, fraction: F}")
    unknown = sorted(set(raw_homogeneous) - set(HOMOGENEOUS_KEYS), key=str)
    if unknown:
        raise _problem(at, f"unknown key(s) {', '.join(map(str, unknown))}; valid: {', '.join(HOMOGENEOUS_KEYS)}")
    source, fraction = raw_homogeneous.get("source"), raw_homogeneous.get("fraction")
    if source not in names:
        valid = ", ".join(name for name, _, _ in entries)
        raise _problem(at, f"unknown source {source!r}; valid: {valid}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise _problem(at, f"fraction={fraction!r}: must be a number in [0, 1] (the share of homogeneous steps)")
    return entries, (source, float(fraction))


def read_manifest(path: str | Path) -> tuple[list[Entry], Homogeneous | None]:
    """The ``(name, path, weight)`` entries of a manifest (paths resolved against its folder, weights as
    written) and its homogeneous ``(source name, fraction)`` or None. Raises ``ConfigError`` naming the
    file, the entry and what is valid."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(tree, dict):
        raise _problem(str(path), "a manifest is a mapping with a sources list")
    unknown = sorted(set(tree) - {"sources", "homogeneous"}, key=str)
    if unknown:
        raise _problem(str(path), f"unknown key(s) {', '.join(map(str, unknown))}; valid: sources, homogeneous")
    entries, homogeneous = _check(tree.get("sources"), tree.get("homogeneous"), str(path))
    resolved = []
    for name, entry_path, weight in entries:
        p = Path(os.path.expanduser(str(entry_path)))
        resolved.append((name, str(p if p.is_absolute() else path.parent / p), weight))
    return resolved, homogeneous


def write_manifest(
    path: str | Path,
    sources: Sequence[tuple[str, str | Path, float]],
    homogeneous: Homogeneous | None = None,
) -> Path:
    """Writes a manifest of ``(name, path, weight)`` sources and an optional homogeneous ``(source name,
    fraction)``, checked by the rules of ``read_manifest``. A relative path is written as it is: it is read
    relative to the manifest's folder; an absolute one inside that folder is written relative to it, so the
    folder can move as a whole."""
    path = Path(path)
    raw = [
        dict(zip(ENTRY_KEYS, entry, strict=True)) if isinstance(entry, (list, tuple)) else entry for entry in sources
    ]
    entries, homogeneous = _check(raw, homogeneous, str(path))
    folder = Path(os.path.abspath(path.parent))
    rows = []
    for name, entry_path, weight in entries:
        p = Path(entry_path)
        if p.is_absolute() and Path(os.path.abspath(p)).is_relative_to(folder):
            p = Path(os.path.abspath(p)).relative_to(folder)
        weight = int(weight) if float(weight).is_integer() else weight
        rows.append({"name": name, "path": str(p), "weight": weight})
    tree: dict[str, Any] = {"sources": rows}
    if homogeneous is not None:
        tree["homogeneous"] = {"source": homogeneous[0], "fraction": homogeneous[1]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + yaml.safe_dump(tree, sort_keys=False, default_flow_style=None), encoding="utf-8")
    return path


class MixedSource(ImageSource):
    """Opened sources laid end to end: index ``i`` of source ``j`` is ``mixture.offsets[j] + i``, and
    ``decode`` (so ``load``) / ``label`` / ``path`` dispatch to it.

    Labels are each source's own (-1 where it has none): they index ``classes`` when every source has the
    same class list (then ``classes`` is that list), else ``classes`` is empty and a label indexes the
    classes of its own source (``sources[source_of(i)]``). Self-supervised training reads no labels."""

    def __init__(
        self,
        parts: Sequence[tuple[str, ImageSource, float]],
        homogeneous: Homogeneous | None = None,
        name: str = "mix",
    ) -> None:
        raw = [{"name": n, "path": "<opened>", "weight": w} for n, _, w in parts]
        entries, homogeneous = _check(raw, homogeneous, name)
        self.sources = [s for _, s, _ in parts]
        for (entry_name, _, _), source in zip(entries, self.sources, strict=True):
            if isinstance(source, MixedSource):
                raise ConfigError(f"{name}: source {entry_name!r} is itself a mix ({source.name}): mixes do not nest")
            if not len(source):
                raise ConfigError(f"{name}: source {entry_name!r} ({source.name}) holds no images")
        self.mixture = Mixture.of(
            [e[0] for e in entries], [len(s) for s in self.sources], [e[2] for e in entries], homogeneous
        )
        super().__init__([r for s in self.sources for r in s.records], name)
        first = list(self.sources[0].classes)
        self.classes = first if all(list(s.classes) == first for s in self.sources) else []
        self._captions: list[str | None] | None = None

    def source_of(self, index: int) -> tuple[int, int]:
        """``(source, index in that source)`` of record ``index``."""
        j = self.mixture.source_of(index)
        return j, index - self.mixture.offsets[j]

    def path(self, index: int) -> str:
        j, i = self.source_of(index)
        return self.sources[j].path(i)

    def label(self, index: int) -> int:
        j, i = self.source_of(index)
        return self.sources[j].label(i)

    def decode(self, index: int) -> Tensor | None:
        j, i = self.source_of(index)
        return self.sources[j].decode(i)

    def read_bytes(self, index: int) -> bytes | None:
        j, i = self.source_of(index)
        return self.sources[j].read_bytes(i)

    def set_channels(self, n: int) -> None:
        """Every source decodes to ``n`` channels (the mix's images all feed one model)."""
        super().set_channels(n)
        for source in self.sources:
            source.set_channels(n)

    @property
    def captions(self) -> list[str | None] | None:  # type: ignore[override]
        """None when no source carries captions (``as_captioned`` then reads sidecars for every record), else
        the sources' captions concatenated, sidecars read (once) for the sources that carry none."""
        if not any(s.captions is not None for s in self.sources):
            return None
        if self._captions is None:
            from opendino.data.captions import _sidecar_captions

            self._captions = [c for s in self.sources for c in (s.captions or _sidecar_captions(s))]
        return self._captions

    def check_readable(self, probe: int = 64) -> None:
        """Fails early, naming the mix and the source, if any source has no decodable image in its first
        ``probe`` (``ChannelMismatchError`` when they decode, but with another channel count)."""
        for entry, source in zip(self.mixture.names, self.sources, strict=True):
            try:
                source.check_readable(probe)
            except (NoImagesError, ChannelMismatchError) as e:
                raise type(e)(f"{self.name}: source {entry!r}: {e}") from e


def open_mix(path: str | Path) -> MixedSource:
    """The :class:`MixedSource` of a manifest, every source opened by ``open_source`` (kind from its path)."""
    entries, homogeneous = read_manifest(path)
    parts = []
    for name, entry_path, weight in entries:
        try:
            source = open_source(entry_path)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{path}: source {name!r}: {e}") from e
        except ValueError as e:
            raise ConfigError(f"{path}: source {name!r}: {e}") from e
        parts.append((name, source, weight))
    return MixedSource(parts, homogeneous, name=str(path))
