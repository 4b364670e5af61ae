"""The embedded synthetic world, first version: scenes of coloured shapes over textured backgrounds.

Deterministic from ``(seed, split, index)``; splits never share a scene (the split is part of the random
stream's key). Each scene has a class label (the shape with the most visible pixels) and a semantic map
(0 = background, ``1 + class`` for object pixels). Rendering uses PIL at the requested size.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "ellipse",
    "diamond",
    "hexagon",
    "crescent",
)
BACKGROUNDS = ("gradient", "stripes", "checker", "noise", "dots", "waves")
SPLITS = {"train": 0, "val": 1, "test": 2}


@dataclasses.dataclass
class Scene:
    image: Image.Image
    label: int
    semantic: np.ndarray  # [H, W] uint8


def _polygon(cx: float, cy: float, r: float, n: int, rot: float, inner: float | None = None) -> list:
    pts = []
    steps = 2 * n if inner else n
    for i in range(steps):
        radius = r if not inner or i % 2 == 0 else r * inner
        a = rot + 2 * math.pi * i / steps
        pts.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
    return pts


def _draw_shape(draw: ImageDraw.ImageDraw, cls: str, cx: float, cy: float, r: float, rot: float, fill) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if cls == "circle":
        draw.ellipse(box, fill=fill)
    elif cls == "ring":
        draw.ellipse(box, outline=fill, width=max(2, int(r * 0.35)))
    elif cls == "ellipse":
        draw.polygon(
            [
                (
                    cx + r * math.cos(t) * math.cos(rot) - 0.5 * r * math.sin(t) * math.sin(rot),
                    cy + r * math.cos(t) * math.sin(rot) + 0.5 * r * math.sin(t) * math.cos(rot),
                )
                for t in np.linspace(0, 2 * math.pi, 48)
            ],
            fill=fill,
        )
    elif cls == "square":
        draw.polygon(_polygon(cx, cy, r, 4, rot), fill=fill)
    elif cls == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.6 * r, cy), (cx, cy + r), (cx - 0.6 * r, cy)], fill=fill)
    elif cls == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, rot), fill=fill)
    elif cls == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, rot), fill=fill)
    elif cls == "star":
        draw.polygon(_polygon(cx, cy, r, 5, rot, inner=0.45), fill=fill)
    elif cls == "cross":
        w = r * 0.35
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    elif cls == "crescent":
        draw.ellipse(box, fill=fill)
        off = 0.45 * r
        draw.ellipse((cx - r + off, cy - r - off * 0.3, cx + r + off, cy + r - off * 0.3), fill=0)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    yy, xx = np.mgrid[0:size, 0:size] / size
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    freq = rng.uniform(3, 12)
    angle = rng.uniform(0, math.pi)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    if kind == "gradient":
        t = u
    elif kind == "stripes":
        t = (np.sin(2 * math.pi * freq * u) > 0).astype(float)
    elif kind == "checker":
        t = ((np.floor(xx * freq) + np.floor(yy * freq)) % 2).astype(float)
    elif kind == "noise":
        coarse = rng.uniform(0, 1, (8, 8))
        t = np.kron(coarse, np.ones((size // 8 + 1, size // 8 + 1)))[:size, :size]
    elif kind == "dots":
        t = ((np.sin(2 * math.pi * freq * xx) * np.sin(2 * math.pi * freq * yy)) > 0.5).astype(float)
    else:  # waves
        t = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (u + 0.05 * np.sin(2 * math.pi * 3 * yy)))
    img = c1[None, None] * (1 - t[..., None]) + c2[None, None] * t[..., None]
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def render_scene(index: int, size: int = 128, split: str = "train", seed: int = 0) -> Scene:
    """Scene ``index`` of ``split`` at ``size x size`` pixels."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; valid: {', '.join(SPLITS)}")
    rng = np.random.default_rng([seed, SPLITS[split], index])
    image = Image.fromarray(_background(rng, size))
    semantic = Image.new("L", (size, size), 0)
    draw_img, draw_sem = ImageDraw.Draw(image), ImageDraw.Draw(semantic)
    n_objects = int(rng.integers(1, 4))
    for _ in range(n_objects):
        cls = int(rng.integers(len(CLASSES)))
        r = rng.uniform(0.12, 0.3) * size
        cx, cy = rng.uniform(r * 0.6, size - r * 0.6, 2)
        rot = rng.uniform(0, 2 * math.pi)
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        # Paint the object, then the crescent's bite with the background: draw on a mask first.
        mask = Image.new("L", (size, size), 0)
        _draw_shape(ImageDraw.Draw(mask), CLASSES[cls], cx, cy, r, rot, 255)
        draw_img.bitmap((0, 0), mask, fill=color)
        draw_sem.bitmap((0, 0), mask, fill=cls + 1)
    sem = np.asarray(semantic)
    counts = np.bincount(sem.ravel(), minlength=len(CLASSES) + 1)[1:]
    return Scene(image=image, label=int(counts.argmax()), semantic=sem)


def write_image_folder(out: str | Path, n: int, size: int = 128, split: str = "train", seed: int = 0) -> Path:
    """Writes ``n`` scenes as ``out/<split>/<class>/<index>.png`` (an ImageNet-style class folder)."""
    root = Path(out) / split
    for index in range(n):
        scene = render_scene(index, size=size, split=split, seed=seed)
        folder = root / CLASSES[scene.label]
        folder.mkdir(parents=True, exist_ok=True)
        scene.image.save(folder / f"{index:06d}.png")
    return root
