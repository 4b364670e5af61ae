"""End-to-end training throughput: a folder of ~500x375 JPEGs -> data-loader workers (decode + uint8
crops, or with --crops-on-device decode only) -> the device (batched photometric distortions, and the
crops) -> the (compiled) training step, through the real ``opendino train`` trainer with the ImageNet
fast-setup preset (2x224 + 8x96 crops, 65,536 prototypes).

    python benchmarks/train_e2e.py --arch vit_small --batch-size 64 --workers 15 --compile
    python benchmarks/train_e2e.py --data-only device --batch-size 64 --workers 15   # its batches, no step
    python benchmarks/train_e2e.py --data-only device --crops-on-device --workers 15
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import torch
from PIL import Image

from opendino.data.pipeline import open_training_source
from opendino.data.synthetic import render_scene
from opendino.recipes import recipe_class
from opendino.train.config import load_train_config
from opendino.train.logging import read_metrics
from opendino.train.trainer import Trainer

PRESET = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "vitl16_im1k.yaml"


def write_jpeg(args: tuple[Path, int]) -> None:
    folder, index = args
    image = render_scene(index, size=500).image.resize((500, 375), Image.Resampling.BICUBIC)
    image.save(folder / f"{index:05d}.jpg", quality=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="vit_small")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--workers", type=int, default=max((os.cpu_count() or 2) - 1, 1))
    p.add_argument("--compile", action="store_true")
    p.add_argument("--capture", action="store_true", help="the step replayed from CUDA graphs (train.capture)")
    p.add_argument("--photometric-in-worker", action="store_true", help="per-sample CPU distortions instead")
    p.add_argument(
        "--crops-on-device",
        action="store_true",
        help="workers only decode and draw crop boxes; the crops are cut batched on the device",
    )
    p.add_argument(
        "--decode-on-device",
        action="store_true",
        help="with --crops-on-device: workers read the JPEG bytes, the device decodes them (nvJPEG)",
    )
    p.add_argument(
        "--data-only",
        choices=["loader", "device"],
        help="time the trainer's batches without the step: as the loader gives them (decoded, cropped, "
        "collated with masks, on the host), or on the device with the photometric stage applied",
    )
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "jpegs"
        folder.mkdir()
        with Pool(args.workers) as pool:
            pool.map(write_jpeg, [(folder, i) for i in range(args.images)])
        log_every = 10
        cfg = load_train_config(
            PRESET,
            [
                f"run.dir={Path(tmp) / 'run'}",
                f"data.path={folder}",
                f"data.num_workers={args.workers}",
                f"data.photometric_on_device={not args.photometric_in_worker}",
                f"data.crops_on_device={args.crops_on_device}",
                f"data.decode_on_device={args.decode_on_device}",
                f"model.arch={args.arch}",
                f"train.batch_size={args.batch_size}",
                f"train.steps={args.steps}",
                f"train.compile={args.compile}",
                f"train.capture={args.capture}",
                f"loss.pad_masked_rows={args.capture}",  # one masked count: one graph
                f"log.every={log_every}",
                "log.tensorboard=false",
                "log.progress=false",
                f"checkpoint.every={10 * args.steps}",
            ],
        )
        if args.data_only:
            steady = data_rate(Trainer(cfg), args.batch_size, args.steps, on_device=args.data_only == "device")
        else:
            Trainer(cfg).run()
            rates = [r["images_per_s"] for r in read_metrics(cfg.run.dir) if "images_per_s" in r]
            steady = statistics.median(rates[len(rates) // 2 :])  # the first windows include compilation
    where = "photometric in workers" if args.photometric_in_worker else "photometric on device"
    if args.crops_on_device:
        where = "crops and photometric on device"
    if args.decode_on_device:
        where = "decode, crops and photometric on device"
    what = f"data only ({args.data_only}, no step)" if args.data_only else f"{args.arch} b{args.batch_size}"
    print(
        f"| end to end {what}, {args.workers} workers, {where}"
        f"{', compiled' if args.compile else ''}{', captured' if args.capture else ''} | | {steady:.0f} | | |"
    )


def data_rate(trainer: Trainer, batch_size: int, steps: int, on_device: bool) -> float:
    """Images/s of the trainer's batches (on the device with ``on_device``, else as the loader gives them)
    over the second half of ``steps`` batches after a warm-up of 10: by then the workers' prefetched batches
    are used up, so the rate is the steady one. The device is synchronised at both ends of the timed half."""
    pipeline = trainer.pipeline(recipe_class(trainer.cfg.train.recipe).from_config(trainer.cfg).data_needs())
    source = open_training_source(trainer.cfg.data)
    batches = pipeline.batches(source, start=0) if on_device else iter(pipeline.loader(source, start=0))
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else lambda: None
    for _ in range(10 + steps // 2):
        next(batches)
    sync()
    start = time.perf_counter()
    timed = steps - steps // 2
    for _ in range(timed):
        next(batches)
    sync()
    return timed * batch_size / (time.perf_counter() - start)


if __name__ == "__main__":
    main()
