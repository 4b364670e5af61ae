"""The embedded synthetic world: scenes of textured shapes at random depths over textured planes.

Every scene is deterministic from ``(seed, split, index)`` and defined in resolution-free coordinates,
so it renders at any size; splits draw from disjoint random streams and never share a scene. A scene
carries all the ground truth the evaluations need: a class label (the shape with the most visible
pixels, almost always the large main object near the centre), a semantic map (0 = background,
1 + class), an instance map (0 = background, 1.. in drawing order), a depth map (objects are
fronto-parallel at random depths in front of a tilted background plane, drawn far to near so occlusion
agrees with depth) and an English caption. ``render_pair`` renders the
scene twice, the second time under a known similarity transform, with dense ground-truth
correspondences.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
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
BACKGROUNDS = ("gradient", "striped", "checkered", "mottled", "dotted", "wavy")
FILLS = ("solid", "striped", "dotted", "checkered")
COLORS = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "orange": (240, 140, 30),
    "purple": (140, 50, 180),
    "pink": (240, 130, 190),
    "cyan": (40, 200, 210),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "brown": (130, 80, 40),
    "gray": (128, 128, 128),
}
SIZES = {"small": (0.05, 0.09), "medium": (0.09, 0.14), "large": (0.2, 0.32)}
SPLITS = {"train": 0, "val": 1, "test": 2}
DEPTH_RANGE = (1.0, 5.0)  # objects; the background plane lies between 6 and 10
MAIN_DEPTH = (1.0, 2.5)  # the main object stands in front of most distractors
BACKGROUND_CONTRAST = 0.45  # of the background pattern between its two colours
FILL_CONTRAST = 0.35  # an object's fill pattern is this much darker than its colour
# Like real categories (lemons tend to be yellow), each class has a typical colour that its objects take
# with this probability; the rest are coloured at random, so shape still matters.
CLASS_COLORS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "cyan", "white", "black")
TYPICAL_COLOR_PROBABILITY = 0.6


@dataclasses.dataclass(frozen=True)
class SceneObject:
    cls: int
    color: str
    fill: str
    size: str
    cx: float  # centre, radius: fractions of the image side
    cy: float
    r: float
    rot: float
    depth: float


@dataclasses.dataclass(frozen=True)
class SceneSpec:
    background: str
    bg_colors: tuple[str, str]
    bg_freq: float
    bg_angle: float
    plane_near: float  # background depth at the bottom edge
    plane_far: float  # ... and at the top edge
    objects: tuple[SceneObject, ...]
    noise_seed: int


@dataclasses.dataclass
class Scene:
    image: Image.Image
    label: int
    semantic: np.ndarray  # [H, W] uint8
    instance: np.ndarray  # [H, W] uint8
    depth: np.ndarray  # [H, W] float32
    caption: str
    spec: SceneSpec


def scene_spec(index: int, split: str = "train", seed: int = 0) -> SceneSpec:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; valid: {', '.join(SPLITS)}")
    rng = np.random.default_rng([seed, SPLITS[split], index])
    names = list(COLORS)
    bg_colors = tuple(names[i] for i in rng.choice(len(names), 2, replace=False))
    object_colors = [c for c in names if c not in bg_colors]  # objects always stand out in colour
    objects = []
    # Like the photographs of object-centric data sets: one large main object near the centre (it gives
    # the class label) and up to four small or medium distractors anywhere, in front or behind.
    for k in range(int(rng.integers(1, 6))):
        cls = int(rng.integers(len(CLASSES)))
        color = object_colors[int(rng.integers(len(object_colors)))]
        if rng.uniform() < TYPICAL_COLOR_PROBABILITY and CLASS_COLORS[cls] in object_colors:
            color = CLASS_COLORS[cls]
        size = "large" if k == 0 else ("small", "medium")[int(rng.integers(2))]
        lo, hi = (0.3, 0.7) if k == 0 else (0.05, 0.95)
        objects.append(
            SceneObject(
                cls=cls,
                color=color,
                fill=FILLS[int(rng.integers(len(FILLS)))],
                size=size,
                cx=float(rng.uniform(lo, hi)),
                cy=float(rng.uniform(lo, hi)),
                r=float(rng.uniform(*SIZES[size])),
                rot=float(rng.uniform(0, 2 * math.pi)),
                depth=float(rng.uniform(*(MAIN_DEPTH if k == 0 else DEPTH_RANGE))),
            )
        )
    objects.sort(key=lambda o: -o.depth)  # far to near: nearer objects occlude farther ones
    return SceneSpec(
        background=BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))],
        bg_colors=bg_colors,  # type: ignore[arg-type]
        bg_freq=float(rng.uniform(3, 10)),
        bg_angle=float(rng.uniform(0, math.pi)),
        plane_near=float(rng.uniform(6, 7)),
        plane_far=float(rng.uniform(8, 10)),
        objects=tuple(objects),
        noise_seed=int(rng.integers(2**31)),
    )


def _pattern(kind: str, u: np.ndarray, v: np.ndarray, freq: float, noise_seed: int) -> np.ndarray:
    """A 0..1 texture of scene coordinates ``(u, v)`` (so both views of a pair see the same texture)."""
    if kind in ("gradient", "solid"):
        return np.clip((u + v) / 2, 0, 1) if kind == "gradient" else np.zeros_like(u)
    if kind == "striped":
        return (np.sin(2 * math.pi * freq * u) > 0).astype(np.float32)
    if kind == "checkered":
        return ((np.floor(u * freq) + np.floor(v * freq)) % 2).astype(np.float32)
    if kind == "dotted":
        return ((np.sin(2 * math.pi * freq * u) * np.sin(2 * math.pi * freq * v)) > 0.5).astype(np.float32)
    if kind == "wavy":
        return 0.5 + 0.5 * np.sin(2 * math.pi * freq * (u + 0.05 * np.sin(2 * math.pi * 3 * v)))
    # mottled: bilinear value noise on a 12x12 lattice (wide enough for the margins a view pair sees)
    lattice = np.random.default_rng(noise_seed).uniform(0, 1, (12, 12))
    gu, gv = np.clip((u + 0.5) * 5, 0, 10.999), np.clip((v + 0.5) * 5, 0, 10.999)
    i, j = gv.astype(int), gu.astype(int)
    fu, fv = gu - j, gv - i
    top = lattice[i, j] * (1 - fu) + lattice[i, j + 1] * fu
    bottom = lattice[i + 1, j] * (1 - fu) + lattice[i + 1, j + 1] * fu
    return top * (1 - fv) + bottom * fv


def _polygon(o: SceneObject, n: int, inner: float | None = None) -> list[tuple[float, float]]:
    steps = 2 * n if inner else n
    pts = []
    for k in range(steps):
        radius = o.r if not inner or k % 2 == 0 else o.r * inner
        a = o.rot + 2 * math.pi * k / steps
        pts.append((o.cx + radius * math.cos(a), o.cy + radius * math.sin(a)))
    return pts


def _outline(o: SceneObject) -> list[list[tuple[float, float]]]:
    """Polygons in scene coordinates; a second polygon is a hole (ring, crescent)."""
    circle = lambda cx, cy, r, sy=1.0: [  # noqa: E731
        (
            cx + r * math.cos(t) * math.cos(o.rot) - sy * r * math.sin(t) * math.sin(o.rot),
            cy + r * math.cos(t) * math.sin(o.rot) + sy * r * math.sin(t) * math.cos(o.rot),
        )
        for t in np.linspace(0, 2 * math.pi, 40, endpoint=False)
    ]
    name = CLASSES[o.cls]
    if name == "circle":
        return [circle(o.cx, o.cy, o.r)]
    if name == "ring":
        return [circle(o.cx, o.cy, o.r), circle(o.cx, o.cy, o.r * 0.6)]
    if name == "ellipse":
        return [circle(o.cx, o.cy, o.r, 0.5)]
    if name == "crescent":
        off = 0.45 * o.r
        return [circle(o.cx, o.cy, o.r), circle(o.cx + off * math.cos(o.rot), o.cy + off * math.sin(o.rot), o.r)]
    if name in ("square", "triangle", "hexagon"):
        return [_polygon(o, {"square": 4, "triangle": 3, "hexagon": 6}[name])]
    if name == "star":
        return [_polygon(o, 5, inner=0.45)]
    if name == "diamond":
        c, s = math.cos(o.rot), math.sin(o.rot)
        local = [(0, -o.r), (0.6 * o.r, 0), (0, o.r), (-0.6 * o.r, 0)]
        return [[(o.cx + x * c - y * s, o.cy + x * s + y * c) for x, y in local]]
    w, r = 0.35 * o.r, o.r  # cross: two bars
    c, s = math.cos(o.rot), math.sin(o.rot)
    bars = [[(-r, -w), (r, -w), (r, w), (-r, w)], [(-w, -r), (w, -r), (w, r), (-w, r)]]
    return [[(o.cx + x * c - y * s, o.cy + x * s + y * c) for x, y in bar] for bar in bars]


def _object_mask(o: SceneObject, to_pixels, size: tuple[int, int]) -> np.ndarray:
    mask = Image.new("L", (size[1], size[0]), 0)
    draw = ImageDraw.Draw(mask)
    polys = [[to_pixels(x, y) for x, y in poly] for poly in _outline(o)]
    name = CLASSES[o.cls]
    draw.polygon(polys[0], fill=255)
    for poly in polys[1:]:  # a hole for rings and crescents, the second bar of a cross
        draw.polygon(poly, fill=0 if name in ("ring", "crescent") else 255)
    return np.asarray(mask) > 127


def _render(spec: SceneSpec, size: int, u: np.ndarray, v: np.ndarray, to_pixels) -> Scene:
    """Renders at pixel grid ``(u, v)`` (scene coordinates of each pixel centre)."""
    shape = u.shape
    c1, c2 = (np.array(COLORS[c], dtype=np.float32) for c in spec.bg_colors)
    t = _pattern(spec.background, *_rotate(u, v, spec.bg_angle), spec.bg_freq, spec.noise_seed)[..., None]
    image = c1 * (1 - BACKGROUND_CONTRAST * t) + c2 * BACKGROUND_CONTRAST * t
    depth = (spec.plane_far + (spec.plane_near - spec.plane_far) * np.clip(v, 0, 1)).astype(np.float32)
    semantic = np.zeros(shape, np.uint8)
    instance = np.zeros(shape, np.uint8)
    for k, o in enumerate(spec.objects):
        mask = _object_mask(o, to_pixels, shape)
        color = np.array(COLORS[o.color], dtype=np.float32)
        ou, ov = _rotate(u - o.cx, v - o.cy, o.rot)
        pattern = _pattern(o.fill, ou / o.r, ov / o.r, 2.0, 0)[..., None]
        texture = color * (1 - FILL_CONTRAST * pattern)  # the fill pattern is a darker shade of the colour
        image[mask] = texture[mask]
        semantic[mask], instance[mask], depth[mask] = o.cls + 1, k + 1, o.depth
    noise = np.random.default_rng(spec.noise_seed).normal(0, 5, image.shape)
    img = Image.fromarray(np.clip(image + noise, 0, 255).astype(np.uint8))
    counts = np.bincount(semantic.ravel(), minlength=len(CLASSES) + 1)[1:]
    label = int(counts.argmax()) if counts.any() else spec.objects[-1].cls
    return Scene(img, label, semantic, instance, depth, caption(spec), spec)


def _rotate(u: np.ndarray, v: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(angle), math.sin(angle)
    return u * c + v * s, -u * s + v * c


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(coords, coords)  # u (x), v (y)


def render_scene(index: int, size: int = 128, split: str = "train", seed: int = 0) -> Scene:
    """Scene ``index`` of ``split`` rendered at ``size x size`` pixels."""
    spec = scene_spec(index, split, seed)
    return _render(spec, size, *_grid(size), lambda x, y: (x * size, y * size))


@dataclasses.dataclass(frozen=True)
class Similarity:
    """``p2 = scale * R(angle) @ (p1 - c) + c + shift`` in scene coordinates, ``c`` the image centre."""

    scale: float
    angle: float
    shift: tuple[float, float]

    def apply(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, s = math.cos(self.angle), math.sin(self.angle)
        dx, dy = x - 0.5, y - 0.5
        return (
            self.scale * (c * dx - s * dy) + 0.5 + self.shift[0],
            self.scale * (s * dx + c * dy) + 0.5 + self.shift[1],
        )

    def invert(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, s = math.cos(-self.angle), math.sin(-self.angle)
        dx, dy = (x - 0.5 - self.shift[0]) / self.scale, (y - 0.5 - self.shift[1]) / self.scale
        return c * dx - s * dy + 0.5, s * dx + c * dy + 0.5


def render_pair(index: int, size: int = 128, split: str = "train", seed: int = 0) -> tuple[Scene, Scene, np.ndarray]:
    """The scene, the same scene seen under a random similarity transform, and for every pixel of the
    first view its ``(x, y)`` pixel position in the second (NaN where it leaves the second view)."""
    spec = scene_spec(index, split, seed)
    rng = np.random.default_rng([seed, SPLITS[split], index, 1])
    warp = Similarity(float(rng.uniform(0.8, 1.25)), float(rng.uniform(-0.5, 0.5)), tuple(rng.uniform(-0.1, 0.1, 2)))
    first = render_scene(index, size, split, seed)
    # View 2 pixel q shows the scene point warp^-1(q); objects are drawn through the same mapping.
    u2, v2 = warp.invert(*_grid(size))
    to_pixels = lambda x, y: tuple(float(t) * size for t in warp.apply(np.float64(x), np.float64(y)))  # noqa: E731
    second = _render(spec, size, u2.astype(np.float32), v2.astype(np.float32), to_pixels)
    x2, y2 = warp.apply(*_grid(size))
    flow = np.stack([x2 * size - 0.5, y2 * size - 0.5], axis=-1).astype(np.float32)
    inside = (flow >= -0.5).all(-1) & (flow <= size - 0.5).all(-1)
    flow[~inside] = np.nan
    return first, second, flow


def caption(spec: SceneSpec) -> str:
    parts = [
        f"a {o.size} {o.color} {'' if o.fill == 'solid' else o.fill + ' '}{CLASSES[o.cls]}"
        for o in reversed(spec.objects)
    ]
    things = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{things} on a {spec.background} {spec.bg_colors[0]} and {spec.bg_colors[1]} background"


SEG_CLASSES_FILE = "seg_classes.txt"  # beside the splits: the class of each segmentation id 1, 2, ... by line


def write_image_folder(
    out: str | Path,
    n: int,
    size: int = 128,
    split: str = "train",
    seed: int = 0,
    pairs: bool = False,
    indices: Iterable[int] | None = None,
) -> Path:
    """Writes ``n`` scenes (or the scenes at ``indices``) in the labelled-folder layout of docs/data.md:
    ``out/<split>/<class>/<i>.png`` with ``<i>.seg.png``, ``<i>.inst.png``, ``<i>.depth.png`` (uint16,
    millimetres) and ``<i>.txt`` beside it, ``out/seg_classes.txt`` (the class of each segmentation id),
    plus ``<i>.view2.png`` and ``<i>.flow.npy`` with ``pairs``."""
    root = Path(out) / split
    root.mkdir(parents=True, exist_ok=True)
    (Path(out) / SEG_CLASSES_FILE).write_text("\n".join(CLASSES) + "\n")
    for index in range(n) if indices is None else indices:
        if pairs:
            scene, second, flow = render_pair(index, size, split, seed)
        else:
            scene = render_scene(index, size, split, seed)
        folder = root / CLASSES[scene.label]
        folder.mkdir(parents=True, exist_ok=True)
        stem = folder / f"{index:06d}"
        scene.image.save(f"{stem}.png")
        Image.fromarray(scene.semantic).save(f"{stem}.seg.png")
        Image.fromarray(scene.instance).save(f"{stem}.inst.png")
        Image.fromarray((scene.depth * 1000).astype(np.uint16)).save(f"{stem}.depth.png")
        Path(f"{stem}.txt").write_text(scene.caption + "\n")
        if pairs:
            second.image.save(f"{stem}.view2.png")
            np.save(f"{stem}.flow.npy", flow)
    return root
