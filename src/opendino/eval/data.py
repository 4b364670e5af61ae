"""Labelled evaluation data: users' folders and the synthetic world, behind one layout.

Classification uses the ImageNet layout ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (train fits the
probe, val is scored). Dense labels sit beside an image with the same stem (docs/data.md):
``<stem>.seg.png`` (uint8: 0 background, 1 + class, 255 ignored), ``<stem>.depth.png`` (uint16,
millimetres, 0 = no depth), and for correspondence a second view ``<stem>.view2.png`` with
``<stem>.flow.npy`` (for every pixel of the image its ``(x, y)`` position in the second view, NaN where
it leaves it). ``--data synthetic`` writes the synthetic world in exactly this layout once, into a cache.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F

from opendino.data.sources import is_image
from opendino.data.synthetic import SEG_CLASSES_FILE, write_image_folder

SPLITS = ("train", "val")


@dataclasses.dataclass
class LabelledSplit:
    paths: list[Path]
    labels: Tensor  # [N] class index (sub-folder), long
    classes: list[str]

    def has(self, suffix: str) -> bool:
        """Whether every image has the dense label ``<stem><suffix>`` beside it."""
        return bool(self.paths) and all(dense_path(p, suffix).exists() for p in self.paths)


def dense_path(image: Path, suffix: str) -> Path:
    return image.with_name(image.name.rsplit(".", 1)[0] + suffix)


def synthetic_folder(cache: Path, n_train: int, n_val: int, size: int) -> Path:
    """The synthetic world written once in the labelled layout (with pairs) and reused afterwards."""
    root = cache / f"synthetic-size{size}-train{n_train}-val{n_val}"
    if not (root / "complete").exists() or not (root / SEG_CLASSES_FILE).exists():  # the file came later
        for split, n in (("train", n_train), ("val", n_val)):
            write_image_folder(root, n, size, split=split, pairs=True)
        (root / "complete").touch()
    return root


def open_labelled(root: Path) -> dict[str, LabelledSplit]:
    """``root/train/<class>/*`` and ``root/val/<class>/*``; the classes are the union of both, sorted."""
    missing = [s for s in SPLITS if not (root / s).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{root} is not a labelled folder: no {', '.join(missing)} sub-folder. Expected the layout "
            "DIR/train/<class>/<image> and DIR/val/<class>/<image> (docs/data.md)"
        )
    classes = sorted({d.name for s in SPLITS for d in (root / s).iterdir() if d.is_dir()})
    splits = {}
    for split in SPLITS:
        paths, labels = [], []
        for k, name in enumerate(classes):
            folder = root / split / name
            if folder.is_dir():
                found = sorted(p for p in folder.rglob("*") if is_image(p))
                paths += found
                labels += [k] * len(found)
        if not paths:
            raise FileNotFoundError(f"no images under {root / split}")
        splits[split] = LabelledSplit(paths, torch.tensor(labels), classes)
    return splits


def load_segmentation(paths: list[Path], size: int) -> Tensor:
    """``[N, size, size]`` uint8 class maps (nearest resizing keeps labels exact)."""
    maps = [np.asarray(Image.open(dense_path(p, ".seg.png")).resize((size, size), Image.NEAREST)) for p in paths]
    return torch.from_numpy(np.stack(maps))


def load_depth(paths: list[Path], size: int) -> Tensor:
    """``[N, size, size]`` float32 metres, 0 where there is no depth."""
    maps = []
    for p in paths:
        mm = torch.from_numpy(np.asarray(Image.open(dense_path(p, ".depth.png"))).astype(np.float32))
        maps.append(F.interpolate(mm[None, None], size=(size, size), mode="nearest")[0, 0] / 1000)
    return torch.stack(maps)


def load_flow(image: Path, size: int) -> Tensor:
    """``[size, size, 2]`` positions in the second view, in pixels of a ``size``-pixel render."""
    flow = torch.from_numpy(np.load(dense_path(image, ".flow.npy")))  # [H, W, 2] at the written size
    scale = size / flow.shape[0]
    flow = F.interpolate(flow.permute(2, 0, 1)[None], size=(size, size), mode="nearest")[0].permute(1, 2, 0)
    return (flow + 0.5) * scale - 0.5
