"""Listing and decoding user images: a folder (recursive), a file list, or a single image.

Unreadable files never stop a job: they are skipped, and their paths are reported by the caller.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
LIST_EXTENSIONS = (".txt", ".csv")


def list_images(source: str | Path) -> list[Path]:
    """Image paths of a folder (recursive, sorted), a ``.txt`` / ``.csv`` list (first column; relative
    paths are relative to the list's folder) or a single image file."""
    source = Path(source)
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if source.is_file() and source.suffix.lower() in LIST_EXTENSIONS:
        with source.open(newline="") as f:
            rows = [row[0].strip() for row in csv.reader(f) if row and row[0].strip()]
        if rows and Path(rows[0]).suffix.lower() not in IMAGE_EXTENSIONS:
            rows = rows[1:]  # a csv header
        return [p if p.is_absolute() else source.parent / p for p in map(Path, rows)]
    if source.is_file() and source.suffix.lower() in IMAGE_EXTENSIONS:
        return [source]
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or folder")
    raise ValueError(f"{source}: not an image folder, an image, or a .txt/.csv list of images")


def load_rgb(path: str | Path) -> Image.Image | None:
    """The image as 8-bit RGB with its EXIF orientation applied, or None if it cannot be decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img = ImageOps.exif_transpose(img)
                img.load()
                return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
