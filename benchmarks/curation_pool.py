"""A skewed, unlabelled image pool for data-curation experiments, and a balanced labelled evaluation set.

The pool is what naive self-supervised training handles badly and curation should fix:

- **Long-tailed classes.** The originals are scenes of the synthetic world (train split) whose class
  frequencies follow a Zipf law over the 10 classes: the class of rank ``r`` (1 = commonest) gets a
  share proportional to ``1 / r ** zipf`` (``class_quotas``). With the default exponent 1.8 the
  commonest class is 63x as frequent as the rarest (at 3000 originals: 1776 against 28). Which class
  id has which rank is a seeded permutation of the 10 ids (``class_ranks(seed)``), so the rare classes
  are not always the same ids; the CLI prints the order.
- **Near-duplicates** (``duplicate_fraction`` of the final pool): copies of originals drawn uniformly
  (hence with the pool's class frequencies), each one of ``jpeg`` (re-encoded at quality 60-90, a
  ``.jpg`` file), ``shift`` (shifted by 1-4 pixels in x and/or y, edges padded by replication),
  ``rescale`` (a crop of 95-99 % of the area resized back, bicubic, never pixel-identical) or ``exact`` (the original's
  bytes).
- **Junk** (``junk_fraction``): ``blank`` images of one flat colour (half of them black, white or mid
  grey, so some are byte-identical), ``noise`` (uniform per-pixel noise) and ``gradient`` (a smooth
  linear blend between two random colours, no shape).

Layout: ``out/images/img_{i:06d}.png`` (``.jpg`` for the re-encoded copies, the only way the name
hints at a kind) with ``i`` a shuffled pool index, and ``out/pool.csv`` with the columns
``path,label,kind,group,variant``, one row per image in pool order (row ``i`` is ``img_{i:06d}``):
``path`` relative to ``out`` (so ``opendino.data.sources.open_source(out / "pool.csv")`` reads it as a
labelled list), ``label`` the class id (-1 for junk), ``kind`` original | duplicate | junk, ``group``
the pool index of the original a duplicate copies (an original's own index; -1 for junk) and
``variant`` the transform (original, jpeg, shift, rescale, exact, blank, noise, gradient). No dense
label files are written: ``FolderSource(out / "images")`` sees exactly the pool's images.

``write_balanced_eval`` writes a class-balanced labelled split in the layout of
``opendino.data.synthetic.write_image_folder`` (``out/<split>/<class>/<index>.png`` with the dense
labels beside and ``out/seg_classes.txt``), which ``opendino.eval.data.open_labelled`` reads once both
``train`` and ``val`` exist. Its default split, ``val``, never shares a scene with the pool.

    python benchmarks/curation_pool.py --out DIR --n 3000 --seed 0    # DIR/pool and DIR/eval/{train,val}
"""

from __future__ import annotations

import argparse
import csv
import math
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from opendino.data.synthetic import (
    CLASSES,
    SPLITS,
    render_scene,
    scene_spec,
    write_image_folder,
)

DEFAULT_ZIPF = 1.8  # 10 ** 1.8 = 63: the commonest class is 63x as frequent as the rarest
DUPLICATE_VARIANTS = ("jpeg", "shift", "rescale", "exact")
JUNK_VARIANTS = ("blank", "noise", "gradient")
JUNK_PROBABILITIES = (0.4, 0.3, 0.3)
BLANK_PALETTE = ((0, 0, 0), (255, 255, 255), (128, 128, 128))  # blanks taken from it are byte-identical
POOL_COLUMNS = ("path", "label", "kind", "group", "variant")


def class_quotas(n_originals: int, zipf: float = DEFAULT_ZIPF) -> list[int]:
    """Originals per class rank (index 0 = commonest), proportional to ``1 / rank ** zipf``, summing to
    ``n_originals``, non-increasing, and at least 1 each (largest-remainder rounding, then the smallest
    quotas are raised to 1 at the expense of the largest)."""
    k = len(CLASSES)
    if n_originals < k:
        raise ValueError(f"n_originals={n_originals}: need at least one original per class ({k})")
    if zipf < 0:
        raise ValueError(f"zipf={zipf} must be >= 0")
    weights = np.array([1.0 / (r**zipf) for r in range(1, k + 1)])
    raw = n_originals * weights / weights.sum()
    quotas = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - quotas), kind="stable")[: n_originals - quotas.sum()]:
        quotas[i] += 1
    for i in range(k):  # rounding must not leave a class out
        if quotas[i] == 0:
            quotas[i] = 1
            quotas[int(np.argmax(quotas))] -= 1
    return sorted((int(q) for q in quotas), reverse=True)


def class_ranks(seed: int = 0) -> list[int]:
    """The class id of each frequency rank (index 0 = commonest): a permutation seeded by ``seed``."""
    return [int(c) for c in np.random.default_rng([seed, 7001]).permutation(len(CLASSES))]


def pool_sizes(n_originals: int, duplicate_fraction: float, junk_fraction: float) -> tuple[int, int]:
    """``(n_duplicates, n_junk)`` so that they are these fractions of the whole pool (rounded)."""
    if not (0 <= duplicate_fraction and 0 <= junk_fraction and duplicate_fraction + junk_fraction < 1):
        raise ValueError(f"duplicate_fraction={duplicate_fraction}, junk_fraction={junk_fraction}: need >= 0, sum < 1")
    total = n_originals / (1 - duplicate_fraction - junk_fraction)
    return round(duplicate_fraction * total), round(junk_fraction * total)


def select_scenes(
    quotas: dict[int, int], split: str = "train", seed: int = 0, size: int = 64, max_tries: int | None = None
):
    """Yields ``(index, scene)`` for scenes ``0, 1, 2, ...`` of ``split`` whose label still has quota left,
    until every class quota is filled. The label is the class with most visible pixels, almost always
    the large main object's, so scenes whose main object is of a full class are skipped unrendered."""
    left = {c: q for c, q in quotas.items() if q > 0}
    max_tries = max_tries if max_tries is not None else 1000 * (sum(left.values()) + 10)
    index = 0
    while left:
        if index >= max_tries:
            raise RuntimeError(f"{split}: quotas {left} not filled after {max_tries} scenes")
        main = next(o for o in scene_spec(index, split, seed).objects if o.size == "large")
        if main.cls in left:
            scene = render_scene(index, size, split, seed)
            if scene.label in left:
                left[scene.label] -= 1
                if not left[scene.label]:
                    del left[scene.label]
                yield index, scene
        index += 1


def _shift(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    while True:
        dx, dy = (int(d) for d in rng.integers(-4, 5, 2))
        if dx or dy:
            break
    a = np.asarray(image)
    h, w = a.shape[:2]
    padded = np.pad(a, ((4, 4), (4, 4), (0, 0)), mode="edge")
    # output pixel (y, x) shows input pixel (y - dy, x - dx)
    out = padded[4 - dy : 4 - dy + h, 4 - dx : 4 - dx + w]
    return Image.fromarray(np.ascontiguousarray(out))


def _rescale(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = image.size
    pixels = np.asarray(image)
    for _ in range(16):  # a crop of nearly the whole image can round back to the same pixels: draw again
        side = math.sqrt(float(rng.uniform(0.95, 0.99)))
        cw, ch = w * side, h * side
        x0, y0 = float(rng.uniform(0, w - cw)), float(rng.uniform(0, h - ch))
        out = image.resize((w, h), Image.Resampling.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
        if not np.array_equal(np.asarray(out), pixels):
            break
    return out


def _junk(variant: str, size: int, rng: np.random.Generator) -> Image.Image:
    if variant == "blank":
        if rng.uniform() < 0.5:
            color = BLANK_PALETTE[int(rng.integers(len(BLANK_PALETTE)))]
        else:
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
        return Image.new("RGB", (size, size), color)
    if variant == "noise":
        return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    c1, c2 = rng.integers(0, 256, (2, 3)).astype(np.float32)
    angle = float(rng.uniform(0, 2 * math.pi))
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    u, v = np.meshgrid(coords, coords)
    t = u * math.cos(angle) + v * math.sin(angle)
    t = ((t - t.min()) / max(float(t.max() - t.min()), 1e-6))[..., None]
    return Image.fromarray(np.clip(c1 * (1 - t) + c2 * t + 0.5, 0, 255).astype(np.uint8))


def _log(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def write_skewed_pool(
    out: Path,
    n_originals: int,
    *,
    size: int = 64,
    seed: int = 0,
    zipf: float = DEFAULT_ZIPF,
    duplicate_fraction: float = 0.2,
    junk_fraction: float = 0.05,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Writes the pool (module docstring) to ``out/images`` and ``out/pool.csv``; returns the csv's path.
    Deterministic from its arguments. ``out/images`` must be empty or absent unless ``overwrite``
    (which deletes it first)."""
    out = Path(out)
    images = out / "images"
    if images.exists() and any(images.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{images} is not empty (overwrite=True / --overwrite replaces it)")
        shutil.rmtree(images)
    images.mkdir(parents=True, exist_ok=True)
    n_dup, n_junk = pool_sizes(n_originals, duplicate_fraction, junk_fraction)
    total = n_originals + n_dup + n_junk
    ranks = class_ranks(seed)
    quotas = {ranks[r]: q for r, q in enumerate(class_quotas(n_originals, zipf))}
    rng = np.random.default_rng([seed, 7002])
    order = rng.permutation(total)  # pool index of the k-th generated image: originals, duplicates, junk
    rows: list[tuple[str, int, str, int, str] | None] = [None] * total
    start = time.perf_counter()

    originals: list[tuple[int, int]] = []  # (pool index, label)
    for k, (_, scene) in enumerate(select_scenes(quotas, "train", seed, size)):
        i = int(order[k])
        scene.image.save(images / f"img_{i:06d}.png")
        rows[i] = (f"images/img_{i:06d}.png", scene.label, "original", i, "original")
        originals.append((i, scene.label))
        if (k + 1) % 500 == 0:
            _log(progress, f"  originals {k + 1}/{n_originals} ({time.perf_counter() - start:.1f} s)")
    _log(progress, f"originals: {n_originals} in {time.perf_counter() - start:.1f} s")

    sources = rng.integers(0, n_originals, n_dup)
    variants = rng.integers(0, len(DUPLICATE_VARIANTS), n_dup)
    for k in range(n_dup):
        i = int(order[n_originals + k])
        group, label = originals[int(sources[k])]
        variant = DUPLICATE_VARIANTS[int(variants[k])]
        source = images / f"img_{group:06d}.png"
        name = f"img_{i:06d}.jpg" if variant == "jpeg" else f"img_{i:06d}.png"
        if variant == "exact":
            shutil.copyfile(source, images / name)
        else:
            with Image.open(source) as img:
                original = img.convert("RGB")
            if variant == "jpeg":
                original.save(images / name, quality=int(rng.integers(60, 91)))
            else:
                (_shift if variant == "shift" else _rescale)(original, rng).save(images / name)
        rows[i] = (f"images/{name}", label, "duplicate", group, variant)

    junk_kinds = rng.choice(len(JUNK_VARIANTS), n_junk, p=JUNK_PROBABILITIES)
    for k in range(n_junk):
        i = int(order[n_originals + n_dup + k])
        variant = JUNK_VARIANTS[int(junk_kinds[k])]
        _junk(variant, size, rng).save(images / f"img_{i:06d}.png")
        rows[i] = (f"images/img_{i:06d}.png", -1, "junk", -1, variant)

    manifest = out / "pool.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(POOL_COLUMNS)
        writer.writerows(rows)
    _log(progress, f"pool: {total} images in {time.perf_counter() - start:.1f} s -> {manifest}")
    return manifest


def write_balanced_eval(
    out: Path, n_per_class: int, *, size: int = 64, seed: int = 0, split: str = "val", pairs: bool = False
) -> Path:
    """Writes exactly ``n_per_class`` scenes of every class of ``split`` in the labelled-folder layout of
    ``write_image_folder`` (``out/<split>/<class>/<index>.png``, dense labels beside, with the view pair
    and flow when ``pairs``; ``out/seg_classes.txt``); returns ``out/<split>``. The scenes are the first of
    ``split`` with each label. ``opendino.eval.data.open_labelled(out)`` needs both ``train`` and ``val``."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; valid: {', '.join(SPLITS)}")
    wanted = select_scenes(dict.fromkeys(range(len(CLASSES)), n_per_class), split, seed, size)
    return write_image_folder(out, 0, size, split, seed, pairs, indices=[index for index, _ in wanted])


def read_pool(manifest: Path) -> list[dict[str, str]]:
    """The rows of ``pool.csv`` as dicts of strings."""
    with Path(manifest).open(newline="") as f:
        return list(csv.DictReader(f))


def summary(manifest: Path) -> str:
    """Class counts (originals and with duplicates, by frequency) and kind/variant counts of a pool."""
    rows = read_pool(manifest)
    originals = Counter(int(r["label"]) for r in rows if r["kind"] == "original")
    everything = Counter(int(r["label"]) for r in rows if r["kind"] != "junk")
    lines = [f"{'class':>10} {'id':>3} {'originals':>9} {'with dups':>9}"]
    for c, n in originals.most_common():
        lines.append(f"{CLASSES[c]:>10} {c:>3} {n:>9} {everything[c]:>9}")
    lines.append(f"commonest / rarest originals: {max(originals.values()) / min(originals.values()):.1f}x")
    kinds = Counter(r["kind"] for r in rows)
    variants = Counter((r["kind"], r["variant"]) for r in rows if r["kind"] != "original")
    lines.append("kinds: " + ", ".join(f"{k} {n} ({n / len(rows):.1%})" for k, n in kinds.most_common()))
    lines.append("variants: " + ", ".join(f"{k}/{v} {n}" for (k, v), n in sorted(variants.items())))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="writes OUT/pool and OUT/eval/{train,val}")
    parser.add_argument("--n", type=int, default=3000, help="originals in the pool")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--zipf", type=float, default=DEFAULT_ZIPF, help="class share ~ 1 / rank**zipf")
    parser.add_argument("--duplicate-fraction", type=float, default=0.2)
    parser.add_argument("--junk-fraction", type=float, default=0.05)
    parser.add_argument("--eval-per-class", type=int, default=50, help="scenes per class in eval/train and eval/val")
    parser.add_argument("--pairs", action="store_true", help="eval folders with view pairs and flow")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT/pool/images")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    manifest = write_skewed_pool(
        args.out / "pool",
        args.n,
        size=args.size,
        seed=args.seed,
        zipf=args.zipf,
        duplicate_fraction=args.duplicate_fraction,
        junk_fraction=args.junk_fraction,
        progress=not args.quiet,
        overwrite=args.overwrite,
    )
    for split in ("train", "val"):
        write_balanced_eval(
            args.out / "eval", args.eval_per_class, size=args.size, seed=args.seed, split=split, pairs=args.pairs
        )
    print(f"class order (commonest first): {', '.join(CLASSES[c] for c in class_ranks(args.seed))}")
    print(summary(manifest))
    print(f"eval: {args.out / 'eval'} (train and val, {args.eval_per_class} per class each)")
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
