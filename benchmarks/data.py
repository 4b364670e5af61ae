"""Throughput of the multi-crop pipeline (2x224 + 8x96) from a folder of ~500x375 JPEGs, per CPU core.

Compares, in one run: OpenDINO per sample (decode + crops + photometric, all in the worker), OpenDINO
split (decode + uint8 crops in the worker; photometric batched on the training device), OpenDINO with the
crops on the device too (decode + crop boxes in the worker; crops and photometric batched on the device),
and a reference per-image PIL + torchvision.transforms.v2 pipeline of the same recipe (what the official
code does).

    python benchmarks/data.py                  # CPU, one thread: images/s per core
    python benchmarks/data.py --device cuda    # the batched stages on the GPU
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2

from opendino.data.augment import CropConfig, MultiCrop
from opendino.data.loader import pad_stack
from opendino.data.sources import decode_image
from opendino.data.synthetic import render_scene


def make_jpegs(folder: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        img = render_scene(i, size=500).image.resize((500, 375), Image.Resampling.BICUBIC)
        paths.append(folder / f"{i:04d}.jpg")
        img.save(paths[-1], quality=90)
    return paths


def reference_pipeline(mean, std):
    """The official recipe on PIL images with torchvision v2, per image (docs/design/recipe.md §3.5)."""

    def colour(p_blur: float, solarize: float):
        ops = [
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(9, sigma=(0.1, 2.0))], p=p_blur),
        ]
        if solarize:
            ops.append(v2.RandomSolarize(threshold=128, p=solarize))
        return ops

    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    rrc = lambda size, scale: [  # noqa: E731
        v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC),
        v2.RandomHorizontalFlip(0.5),
    ]
    g1 = v2.Compose(rrc(224, (0.32, 1.0)) + colour(0.0, 0) + tail)
    g2 = v2.Compose(rrc(224, (0.32, 1.0)) + colour(0.9, 0.2) + tail)
    loc = v2.Compose(rrc(96, (0.05, 0.32)) + colour(0.5, 0) + tail)

    def run(path: Path) -> dict:
        img = Image.open(path).convert("RGB")
        return {"global": [g1(img), g2(img)], "local": [loc(img) for _ in range(8)]}

    return run


def rate(fn, items) -> float:
    start = time.perf_counter()
    for item in items:
        fn(item)
    return len(items) / (time.perf_counter() - start)


def batched_rate(fn, images: int, device: torch.device, repeats: int = 5) -> float:
    """Images/s of ``fn()`` on a batch of ``images``, after one warm-up call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return repeats * images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=48, help="images")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="device of the batched photometric stage")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    multicrop = MultiCrop(CropConfig())
    cfg = multicrop.config
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), args.n)
        ref = reference_pipeline(cfg.mean, cfg.std)
        rows = [("reference: PIL + torchvision v2 per image", rate(ref, paths))]
        rows.append(
            ("OpenDINO per sample (decode, crops, photometric)", rate(lambda p: multicrop(decode_image(p), gen), paths))
        )
        geometric = []
        rows.append(
            (
                "OpenDINO worker part (decode + uint8 crops)",
                rate(lambda p: geometric.append(multicrop.geometric(decode_image(p), gen)), paths),
            )
        )
        decoded = []

        def decode_and_draw(path: Path) -> None:
            img = decode_image(path)
            decoded.append((img, multicrop.crop_boxes(*img.shape[-2:], gen)))

        rows.append(("OpenDINO worker part, crops on the device (decode + crop boxes)", rate(decode_and_draw, paths)))
    device = torch.device(args.device)
    used = geometric[: args.batch_size]
    batch = {k: torch.cat([g[k] for g in used]).to(device) for k in ("global", "local")}
    batch["global"] = batch["global"].unflatten(0, (-1, 2)).transpose(0, 1).flatten(0, 1)
    dev_gen = torch.Generator(device).manual_seed(0)
    batched = batched_rate(lambda: multicrop.photometric_collated(batch, dev_gen), len(used), device)
    rows.append((f"OpenDINO batched photometric on {device.type} (batch {len(used)})", batched))
    whole = decoded[: args.batch_size]
    images = pad_stack([img for img, _ in whole]).to(device)
    boxes = torch.stack([b for _, b in whole]).to(device)
    cut = batched_rate(lambda: multicrop.geometric_collated({"images": images, "boxes": boxes}), len(whole), device)
    rows.append((f"OpenDINO crops cut batched on {device.type} (batch {len(whole)})", cut))
    print(f"\n{args.n} JPEGs 500x375, 2x224 + 8x96 crops, {args.threads} thread(s)\n")
    print("| pipeline | images/s |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.1f} |")


if __name__ == "__main__":
    main()
