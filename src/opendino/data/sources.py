"""Image sources behind one interface: a folder, a file list, tar shards, or the synthetic world.

Every source is an indexable collection of ``(path, label)`` records with ``load(i) -> uint8 [C, H, W]
tensor or None`` (``C = source.channels``: 3, RGB, unless ``set_channels`` asks for another count).
``open_source(path)`` picks the kind from the path (a folder, a ``.txt`` / ``.csv`` / ``.tsv``
list, ``.tar`` shards given as a file, a glob or a folder of shards, a ``.yaml`` mix manifest of several of
them: opendino.data.mix) or ``open_source(source="synthetic")``.
Unreadable images never stop a job: ``load`` returns None (so does an image of another channel count), and
callers skip, count and report them; ``check_readable`` fails at start when none of the first images reads.

Tar shards use the webdataset layout (``<key>.<ext>`` members, an optional ``<key>.cls`` label and ``<key>.txt``
caption); they are indexed once and read by random access, so every source shares one seeded, resumable sampler.
A record path ``<shard>.tar:<member>`` (a tar shard's record, as a list of them names it) that is not itself a
file reads that member of the shard (each shard's members indexed once per process, on first use).
Captions (a CSV/TSV column, tar text members) are kept on the source; opendino.data.captions pairs them.
"""

from __future__ import annotations

import csv
import glob
import io
import logging
import numbers
import os
import posixpath
import stat
import tarfile
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".npy", ".npz")
LIST_EXTENSIONS = (".txt", ".csv", ".tsv")
CAPTION_COLUMNS = ("caption", "text", "title")  # a CSV/TSV header naming one makes a captioned list
# Dense labels stored beside images (see docs/data.md) are not images of the data set.
LABEL_SUFFIXES = (".seg", ".inst", ".depth", ".view2", ".flow")
MAX_SIDE = 4096  # larger images are reduced on decode (JPEG draft mode) and then resized

# Formats are told by their first bytes, not by a file name: tar members arrive as bytes.
NUMPY_MAGICS = (b"\x93NUMPY", b"PK\x03\x04")  # .npy, and .npz (a zip archive of .npy files)
TIFF_MAGICS = (b"II*\x00", b"MM\x00*")
SAMPLES_PER_PIXEL = 277  # the TIFF tag of the channel count
_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I", "F")
# What decoders raise on bad data (a zip that is not an .npz raises BadZipFile, which is none of the others).
_DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    RuntimeError,
    EOFError,
    KeyError,
    IndexError,
    zipfile.BadZipFile,
    Image.DecompressionBombError,
)


class NoImagesError(RuntimeError):
    pass


class ChannelMismatchError(ValueError):
    """An image decodes, but with another number of channels than requested."""


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and Path(path.stem).suffix not in LABEL_SUFFIXES


def decode_image(data: str | Path | bytes, max_side: int = MAX_SIDE, channels: int = 3) -> Tensor | None:
    """``[channels, H, W]`` uint8, or None if ``data`` (a path or the file's bytes) cannot be decoded.
    Raises ``ChannelMismatchError`` when it decodes with another channel count. Contiguous, except an RGB
    JPEG decoded whole, which keeps libjpeg-turbo's channels-last memory layout (as it always has).

    Formats, told by their first bytes: everything PIL reads, with EXIF orientation applied; ``.npy`` and
    ``.npz`` arrays (never unpickled; in an ``.npz`` the array named ``image``, else the first); TIFFs with
    any number of samples through tifffile, where PIL cannot give them all (or fails).

    - ``channels=3``: 8-bit RGB exactly as always; greyscale, palette, CMYK, alpha and 16-bit images are
      converted, and a one-channel array or TIFF is repeated into RGB.
    - other ``channels``: the file's own channels (a greyscale or 16-bit PNG has one, a palette image is
      expanded to RGB or RGBA); a count other than ``channels`` raises ``ChannelMismatchError``.
    - Array layout: 2-D is one channel; 3-D is channels-last ``(H, W, C)`` when the last axis is the
      shortest (ties included), else channels-first ``(C, H, W)``; leading axes of length 1 are dropped.
    - Values: ``to_uint8``, one rule per image (the 16-bit rule of PIL images; bool is 0 / 255).
    - Images with a side above ``max_side`` are reduced to fit it (antialiased bicubic, aspect kept)."""
    try:
        raw = data if isinstance(data, bytes) else Path(data).read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = _decode(raw, max_side, channels)
    except _DECODE_ERRORS:
        return None
    if isinstance(image, Tensor):  # the fast JPEG path: already [3, H, W] at full size
        return image
    # An array is never repeated into RGB like a grey picture: a 2-D array beside images is more often a
    # mask or a feature matrix than a grey image.
    image = _reduce(_fit_channels(image, channels, data, repeat_grey=not raw.startswith(NUMPY_MAGICS)), max_side)
    # One copy into [C, H, W]: it also owns its memory (PIL's arrays are read-only views).
    return torch.from_numpy(np.array(image.transpose(2, 0, 1), order="C"))


def decode_or_skip(data: str | Path | bytes, channels: int = 3, say=None) -> Tensor | None:
    """``decode_image``, with an image of another channel count None like an unreadable one (``say``, if
    given, is told why): for tools that skip what they cannot use, as the sources' ``load`` does."""
    try:
        return decode_image(data, channels=channels)
    except ChannelMismatchError as e:
        if say is not None:
            say(str(e))
        return None


def to_uint8(values: np.ndarray) -> np.ndarray:
    """8-bit values of an image of any dtype, by one rule for the whole image (all its channels, not each
    channel apart, so that channels keep their relative brightness): bool is 0 / 255; uint8 is kept;
    otherwise the image is scaled by 1 when it is float with max <= 1, kept when its max is <= 255, else
    divided by 65535 (16-bit), and then clipped to [0, 255] (negative values become 0). Non-finite values
    (NaN as "no data", infinities) are 0 and do not count in the maximum."""
    if values.dtype == np.bool_:
        return values.astype(np.uint8) * 255
    if values.dtype == np.uint8:
        return values
    if not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)):
        raise ValueError(f"an image of dtype {values.dtype} has no pixel values")
    arr = values.astype(np.float64)
    finite = np.isfinite(arr)
    arr = np.where(finite, arr, 0.0)
    peak = arr.max()
    if np.issubdtype(values.dtype, np.floating) and peak <= 1.0:
        top = 1.0
    else:
        top = 255.0 if peak <= 255 else 65535.0
    return np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _decode(raw: bytes, max_side: int, channels: int) -> Tensor | np.ndarray:
    """The image of ``raw`` as a ``[3, H, W]`` tensor (fast JPEG path) or an ``(H, W, C)`` uint8 array with
    the file's channels (RGB when ``channels=3`` and PIL reads it), before fitting and reduction."""
    if raw.startswith(NUMPY_MAGICS):
        return _array_to_hwc(_read_numpy(raw))
    if not raw.startswith(TIFF_MAGICS):
        return _decode_pil(raw, max_side, channels)
    try:
        image = _decode_pil(raw, max_side, channels)
    except _DECODE_ERRORS:
        image = None
    if image is not None and _fits(image.shape[2], channels):
        return image
    try:
        return _array_to_hwc(_read_tiff(raw))
    except _DECODE_ERRORS:
        if image is None:  # neither reader can: undecodable
            raise
        return image  # e.g. a compression tifffile cannot read without imagecodecs: PIL's channels


def _decode_pil(raw: bytes, max_side: int, channels: int) -> Tensor | np.ndarray | None:
    """PIL's decode: ``channels=3`` gives RGB, other counts the file's own channels; None for a TIFF whose
    samples PIL cannot all give (it reads the first of 5, or one page of many)."""
    with Image.open(io.BytesIO(raw)) as img:  # reads the header only
        if img.format == "JPEG" and channels == 3 and max(img.size) <= max_side:
            # libjpeg-turbo through torchvision: the same pixels as PIL in half the time. Kept as it comes
            # (channels-last in memory): a contiguous copy would add a third to the decode time, and the
            # uint8 crop kernels are faster on this layout.
            return decode_jpeg(
                torch.frombuffer(bytearray(raw), dtype=torch.uint8),
                mode=ImageReadMode.RGB,
                apply_exif_orientation=True,
            )
        if img.format == "TIFF" and (
            img.tag_v2.get(SAMPLES_PER_PIXEL, 1) != len(img.getbands())
            # a stack of pages or a band PIL would drop as alpha: tifffile counts them all, so that a
            # 4-band raster is refused by an RGB model instead of read as grey or as RGB
            or getattr(img, "n_frames", 1) > 1
            or "A" in img.getbands()
        ):
            return None
        if img.format == "JPEG":
            img.draft("RGB" if channels == 3 else None, (max_side, max_side))
        img = ImageOps.exif_transpose(img)
        img.load()
        if channels == 3:
            return np.asarray(_to_rgb(img))
        return _native_array(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _HIGH_BIT_DEPTH_MODES:
        # PIL's convert("RGB") clips high-bit-depth values; scale them to 8 bits instead.
        img = Image.fromarray(to_uint8(np.asarray(img)))
    return img.convert("RGB")


def _native_array(img: Image.Image) -> np.ndarray:
    """``(H, W, C)`` uint8 of a PIL image with its own channels: one for greyscale, 1-bit and high bit depth,
    the bands of the mode otherwise; a palette is expanded to its colours (with alpha if it has one)."""
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    return _array_to_hwc(np.asarray(img))


def _read_numpy(raw: bytes) -> np.ndarray:
    """The array of ``.npy`` bytes, or of ``.npz`` bytes the one named ``image`` (else the first). Object
    arrays are refused (``allow_pickle=False``): loading a file must never run code from it."""
    loaded = np.load(io.BytesIO(raw), allow_pickle=False)
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded as archive:
        return archive["image" if "image" in archive.files else archive.files[0]]


def _read_tiff(raw: bytes) -> np.ndarray:
    """The first image series of a TIFF (pages stacked on a first axis), samples in the file's layout."""
    import tifffile  # only TIFFs that PIL cannot read need it

    # tifffile logs what is wrong with a bad file at every read; the caller reports the file instead.
    log = logging.getLogger("tifffile")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        return tifffile.imread(io.BytesIO(raw))
    finally:
        log.setLevel(level)


def _array_to_hwc(array: np.ndarray) -> np.ndarray:
    """``(H, W, C)`` uint8 of an image array, by the layout rule of ``decode_image`` and ``to_uint8``."""
    while array.ndim > 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim == 3 and array.shape[2] > min(array.shape[:2]):
        array = array.transpose(1, 2, 0)
    elif array.ndim != 3:
        raise ValueError(f"an image array has 2 or 3 axes, not the shape {array.shape}")
    if not array.size:
        raise ValueError(f"an empty image array {array.shape}")
    return to_uint8(array)


def _fits(found: int, channels: int) -> bool:
    return found == channels or (found == 1 and channels == 3)


def _fit_channels(image: np.ndarray, channels: int, data: str | Path | bytes, repeat_grey: bool = True) -> np.ndarray:
    """``image`` with ``channels`` channels: one channel is repeated into RGB for ``channels=3`` (with
    ``repeat_grey``); any other difference is an error, since which channels to drop or invent is the
    user's choice to make."""
    found = image.shape[2]
    if found == channels:
        return image
    if repeat_grey and _fits(found, channels):
        return np.repeat(image, channels, axis=2)
    where = "" if isinstance(data, bytes) else f"{data}: "
    raise ChannelMismatchError(
        f"{where}the image has {found} channels, {channels} requested (images are decoded to the model's "
        "channel count, which model.in_chans sets: set it to the files' count, or convert the files)"
    )


def _reduce(image: np.ndarray, max_side: int) -> np.ndarray:
    """``image`` reduced to fit ``max_side`` (antialiased bicubic, aspect kept), each channel apart: PIL
    resizes the bands of an RGB image independently, so this gives its pixels for any channel count."""
    if max(image.shape[:2]) <= max_side:
        return image
    planes = []
    for c in range(image.shape[2]):
        plane = Image.fromarray(np.ascontiguousarray(image[:, :, c]))
        plane.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
        planes.append(np.asarray(plane))
    return np.stack(planes, axis=2)


def _shard_members(shard: str, stamp: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """``member name -> (data offset, size)`` of the files in ``shard`` (names normalised), indexed on first
    use and cached per process; ``stamp`` (mtime, size) re-indexes a shard rewritten since. A shard that
    cannot be read has no members (its records are then unreadable images, replaced and reported)."""
    key = (shard, stamp)
    members = _SHARD_MEMBERS.get(key)
    if members is None:
        try:
            with tarfile.open(shard) as tar:
                members = {posixpath.normpath(m.name): (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}
        except (OSError, tarfile.TarError):
            members = {}
        _SHARD_MEMBERS[key] = members
    return members


_SHARD_MEMBERS: dict[tuple[str, tuple[int, int]], dict[str, tuple[int, int]]] = {}


def read_tar_member(path: str) -> bytes | None:
    """The bytes of ``<shard>.tar:<member>`` (the first ``.tar:`` whose left side is an existing file), or
    None if ``path`` names no member of an existing shard."""
    lower, start = path.lower(), 0
    while (at := lower.find(".tar:", start)) >= 0:
        start = at + 1
        shard, member = path[: at + 4], path[at + 5 :]
        try:
            st = os.stat(shard)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or not member:
            continue
        entry = _shard_members(shard, (st.st_mtime_ns, st.st_size)).get(posixpath.normpath(member))
        if entry is None:
            continue
        try:
            with open(shard, "rb") as f:
                f.seek(entry[0])
                return f.read(entry[1])
        except OSError:
            return None
    return None


def load_path(path: str, max_side: int = MAX_SIDE, channels: int = 3) -> Tensor | None:
    """``decode_image`` of a file, or of a tar member named ``<shard>.tar:<member>`` when ``path`` is not a
    file (a ``ChannelMismatchError`` then names ``path``)."""
    if ".tar:" in path.lower() and not os.path.isfile(path):
        data = read_tar_member(path)
        if data is not None:
            return _decode_named(data, path, max_side, channels)
    return decode_image(path, max_side, channels)


def _decode_named(data: bytes, path: str, max_side: int = MAX_SIDE, channels: int = 3) -> Tensor | None:
    """``decode_image`` of bytes read from ``path``, whose name a ``ChannelMismatchError`` then carries."""
    try:
        return decode_image(data, max_side, channels)
    except ChannelMismatchError as e:
        raise ChannelMismatchError(f"{path}: {e}") from None


class ImageSource(torch.utils.data.Dataset):
    """Indexable records ``(path, label)``; ``label`` is -1 when the source has none. Images are decoded to
    ``channels`` channels (3 unless ``set_channels`` says otherwise)."""

    classes: list[str] = []
    channels: int = 3
    # Per-record captions where the source itself carries them (a captioned CSV/TSV list, tar shards; None
    # where a record has none), else None; undecodable bytes are kept as surrogates, to be reported.
    captions: list[str | None] | None = None

    def __init__(self, records: Sequence[tuple[str, int]], name: str) -> None:
        self.records = list(records)
        self.name = name

    def __len__(self) -> int:
        return len(self.records)

    def path(self, index: int) -> str:
        return self.records[index][0]

    def label(self, index: int) -> int:
        return self.records[index][1]

    def set_channels(self, n: int) -> None:
        """Decode every image to ``n`` channels from now on (``decode_image``'s ``channels``)."""
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"{self.name}: channels={n!r}: need an integer >= 1")
        self.channels = int(n)

    def decode(self, index: int) -> Tensor | None:
        """Image ``index`` as ``[channels, H, W]`` uint8, or None if it cannot be decoded; raises
        ``ChannelMismatchError`` if it decodes with another channel count. Sources override this."""
        return load_path(self.records[index][0], channels=self.channels)

    def read_bytes(self, index: int) -> bytes | None:
        """The file of image ``index`` as it is stored (None where there is none, or it cannot be read): for
        decoding elsewhere (``data.decode_on_device``)."""
        path = self.records[index][0]
        try:
            if ".tar:" in path.lower() and not os.path.isfile(path):
                return read_tar_member(path)
            return Path(path).read_bytes()
        except OSError:
            return None

    def load(self, index: int) -> Tensor | None:
        """``decode``, with an image of the wrong channel count unreadable (None) like any bad file: one
        stray file must not stop a run (a wrong setting is caught by ``check_readable``)."""
        try:
            return self.decode(index)
        except ChannelMismatchError:
            return None

    def __getitem__(self, index: int) -> tuple[Tensor | None, int]:
        return self.load(index), self.label(index)

    def check_readable(self, probe: int = 64) -> None:
        """Fails early, with the source named, if none of its first ``probe`` images decodes: a
        ``ChannelMismatchError`` when some decode, but all with another channel count than ``channels``,
        else a ``NoImagesError``; warns when some of them have another channel count."""
        if not self.records:
            raise NoImagesError(f"{self.name}: no images found (extensions: {', '.join(IMAGE_EXTENSIONS)})")
        n = min(probe, len(self))
        mismatch, mismatched, readable = None, 0, 0
        for i in range(n):
            try:
                readable += self.decode(i) is not None
            except ChannelMismatchError as e:
                mismatch, mismatched = mismatch or e, mismatched + 1
        if readable:
            if mismatched:  # they will be skipped: say so now, not only in the run's list of skipped images
                warnings.warn(
                    f"{self.name}: {mismatched} of the first {n} images have another channel count than "
                    f"{self.channels} and will be skipped; first: {mismatch}",
                    stacklevel=2,
                )
            return
        if mismatch is not None:
            raise ChannelMismatchError(
                f"{self.name}: none of the first {n} images has {self.channels} channels; first: {mismatch}"
            )
        raise NoImagesError(f"{self.name}: none of the first {n} images can be decoded")


class FolderSource(ImageSource):
    """All images below ``root`` (recursive, sorted); the class is the first-level sub-folder."""

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        paths = sorted(p for p in root.rglob("*") if is_image(p) and p.is_file())
        first_level = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else None for p in paths]
        self.classes = sorted({c for c in first_level if c is not None})
        index = {c: i for i, c in enumerate(self.classes)}
        super().__init__([(str(p), index.get(c, -1)) for p, c in zip(paths, first_level, strict=True)], str(root))


class ListSource(ImageSource):
    """A ``.txt`` list (one path per line, taken whole), a ``.csv`` list (``path[,label]``, optional header;
    labels are integers, or class names numbered in sorted order as folder classes are) or a ``.tsv`` list
    (``path<TAB>caption``, optional header); relative paths are relative to the list's folder. A CSV or TSV
    header naming a ``caption``, ``text`` or ``title`` column makes a captioned list: that column is the
    caption, a ``label`` column the label and a ``path`` column (else the first other one) the path."""

    def __init__(self, list_file: str | Path) -> None:
        list_file = Path(list_file)
        suffix = list_file.suffix.lower()
        # Bytes that are not UTF-8 survive as surrogates (as os.fsdecode gives file names): one bad caption
        # is reported by opendino.data.captions instead of failing the whole list.
        if suffix in (".csv", ".tsv"):
            with list_file.open(newline="", encoding="utf-8", errors="surrogateescape") as f:
                dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if suffix == ".tsv" else {}
                rows = [row for row in csv.reader(f, **dialect) if any(cell.strip() for cell in row)]
        else:
            text = list_file.read_text(encoding="utf-8", errors="surrogateescape")
            rows = [[line.strip()] for line in text.splitlines() if line.strip()]
        header = []
        if rows and Path(rows[0][0].strip()).suffix.lower() not in IMAGE_EXTENSIONS:
            header = [cell.strip().lower() for cell in rows.pop(0)]
        named = [header.index(c) for c in CAPTION_COLUMNS if c in header]
        caption_col = named[0] if named else 1 if suffix == ".tsv" else None
        if caption_col is None:  # today's list: path[,label], whatever the header says
            path_col, label_col = 0, 1
        else:
            path_col = header.index("path") if "path" in header else int(caption_col == 0)
            label_col = header.index("label") if "label" in header else None
        rows = [row for row in rows if len(row) > path_col and row[path_col].strip()]
        cell = lambda row, col: row[col].strip() if col is not None and len(row) > col else ""  # noqa: E731
        labels = [cell(row, label_col) for row in rows]
        named_labels = [x for x in labels if x]
        classes = [] if all(x.lstrip("-").isdigit() for x in named_labels) else sorted(set(named_labels))
        ids = {x: i for i, x in enumerate(classes)} if classes else {x: int(x) for x in named_labels}
        records = []
        for row, label in zip(rows, labels, strict=True):
            path = Path(row[path_col].strip())
            path = path if path.is_absolute() else list_file.parent / path
            records.append((str(path), ids[label] if label else -1))
        super().__init__(records, str(list_file))
        self.classes = classes
        if caption_col is not None:  # raw cells (whitespace kept: a blank caption is reported as such)
            self.captions = [row[caption_col] if len(row) > caption_col and row[caption_col] else None for row in rows]


class TarShardSource(ImageSource):
    """webdataset-style tar shards, indexed once (member offsets) and read by random access."""

    def __init__(self, shards: Sequence[str | Path]) -> None:
        self.shards = [str(s) for s in shards]
        self._index: list[tuple[int, int, int]] = []  # (shard, offset, size) of each image member
        records, self.captions = [], []
        for shard_id, shard in enumerate(self.shards):
            with tarfile.open(shard) as tar:
                members = [m for m in tar.getmembers() if m.isfile()]
            labels, texts = {}, {}
            with open(shard, "rb") as f:
                for m in members:
                    if m.name.endswith(".cls"):
                        f.seek(m.offset_data)
                        labels[m.name.rsplit(".", 1)[0]] = int(f.read(m.size).decode().strip() or -1)
                    elif m.name.endswith(".txt"):  # a caption: small, read now
                        f.seek(m.offset_data)
                        texts[m.name.rsplit(".", 1)[0]] = f.read(m.size).decode("utf-8", errors="surrogateescape")
            for m in members:
                key, _, ext = m.name.rpartition(".")
                if f".{ext.lower()}" in IMAGE_EXTENSIONS:
                    self._index.append((shard_id, m.offset_data, m.size))
                    records.append((f"{shard}:{m.name}", labels.get(key, -1)))
                    self.captions.append(texts.get(key))
        super().__init__(records, ", ".join(self.shards[:3]) + (" ..." if len(self.shards) > 3 else ""))

    def read_bytes(self, index: int) -> bytes | None:
        shard, offset, size = self._index[index]
        try:
            with open(self.shards[shard], "rb") as f:
                f.seek(offset)
                return f.read(size)
        except OSError:
            return None

    def decode(self, index: int) -> Tensor | None:
        data = self.read_bytes(index)
        return None if data is None else _decode_named(data, self.path(index), channels=self.channels)


class SyntheticSource(ImageSource):
    """``n`` scenes of the embedded synthetic world, rendered on the fly. The label is the class of the most
    visible shape, known only once the scene is rendered: the last scene is kept, so a training sample (its
    image, then its label) renders once."""

    def __init__(self, n: int = 10_000, size: int = 128, split: str = "train", seed: int = 0) -> None:
        from opendino.data.synthetic import CLASSES, render_scene

        self._render = render_scene
        self.size, self.split, self.seed = size, split, seed
        self.classes = list(CLASSES)
        self._last = None  # (index, scene) of the last render
        super().__init__([(f"synthetic:{split}:{i}", -1) for i in range(n)], f"synthetic world ({split}, n={n})")

    def scene(self, index: int):
        if self._last is None or self._last[0] != index:
            self._last = (index, self._render(index, self.size, self.split, self.seed))
        return self._last[1]

    def label(self, index: int) -> int:
        return self.scene(index).label

    def read_bytes(self, index: int) -> None:
        return None  # rendered, not stored

    def decode(self, index: int) -> Tensor:
        if self.channels != 3:  # scenes are rendered in RGB
            raise ChannelMismatchError(
                f"{self.path(index)}: the synthetic world is RGB (3 channels), {self.channels} requested "
                "(model.in_chans sets the channel count)"
            )
        scene = self.scene(index)
        return torch.from_numpy(np.array(scene.image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


SOURCES = ("folder", "list", "tar", "synthetic", "mix")


def open_source(path: str | Path | None = None, source: str | None = None, **synthetic_kwargs) -> ImageSource:
    """The source for ``path``, of kind ``source`` (``folder``, ``list``, ``tar``, ``mix``) or, without it, the
    kind the path shows (a ``.yaml`` / ``.yml`` file is a mix manifest: ``mix.open_mix``); ``source="synthetic"``
    (or no path) is the embedded world."""
    from opendino.data.config import DataConfig

    DataConfig(source=source, path=None if path is None else str(path)).check()  # the rules' one home
    if source == "synthetic" or path is None:
        return SyntheticSource(**synthetic_kwargs)
    text, p = str(path), Path(path)
    if source == "mix" or (source is None and p.suffix.lower() in (".yaml", ".yml") and not p.is_dir()):
        from opendino.data.mix import open_mix

        return open_mix(p)
    if not p.exists():  # a glob of shards (a path that exists is taken as it is, brackets and all)
        shards = sorted(glob.glob(text)) if any(ch in text for ch in "*?[") else []
        if not shards:
            raise FileNotFoundError(f"{path}: no such file or folder, and no tar shards match")
        if source not in (None, "tar"):
            raise ValueError(f"data.path={path} is a glob of tar shards, not a {source}")
        return TarShardSource(shards)
    if p.is_dir():
        shards = sorted(p.glob("*.tar"))
        if source == "tar" or (source is None and shards and not any(is_image(q) for q in p.iterdir())):
            if not shards:
                raise FileNotFoundError(f"{p}: data.source=tar but the folder holds no .tar shards")
            return TarShardSource(shards)
        if source is None and shards:
            raise ValueError(f"{p} holds both .tar shards and images: set data.source=tar or data.source=folder")
        if source == "list":
            raise ValueError(f"data.source=list needs a .txt or .csv file (or a .tsv list), not the folder {p}")
        return FolderSource(p)
    if source == "folder":
        raise ValueError(f"data.source=folder needs a folder, not the file {p}")
    if p.suffix.lower() == ".tar" and source in (None, "tar"):
        return TarShardSource([p])
    if p.suffix.lower() in LIST_EXTENSIONS and source in (None, "list"):
        return ListSource(p)
    if source == "list":
        raise ValueError(f"data.source=list needs a .txt or .csv file (or a .tsv list), not {p}")
    if source is None and is_image(p):
        return ImageSource([(str(p), -1)], str(p))
    raise ValueError(f"{p}: not an image folder, an image, a .txt/.csv/.tsv list, .tar shards or a .yaml mix")


def list_images(path: str | Path) -> list[Path]:
    """Image paths of a folder, a list or a single image (for extraction and tools)."""
    return [Path(r[0]) for r in open_source(path).records]
