"""Locked text alignment with and without the feature cache: training steps per second on this machine.

Both runs train the demo text preset (configs/text/demo.yaml) on the same frozen backbone for ``--steps``
steps; the cached run's one-off cache build is timed apart. The figure is the throughput of the logging
windows after the first (warm-up) one.

    python benchmarks/text_cache.py --backbone runs/demo-pretrain --out /tmp/text-cache --steps 60
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from opendino.train.config import load_train_config
from opendino.train.logging import read_metrics
from opendino.train.trainer import Trainer

PRESET = Path(__file__).resolve().parents[1] / "configs" / "text" / "demo.yaml"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", required=True)
    p.add_argument("--out", type=Path, default=Path("/tmp/text-cache"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    rows = {}
    for name, cached in (("cached features", "true"), ("backbone every step", "false")):
        run = args.out / name.replace(" ", "-")
        overrides = [
            f"run.dir={run}",
            f"init.backbone={args.backbone}",
            f"text.cache_features={cached}",
            f"train.steps={args.steps}",
            "log.every=10",
            "monitor.every=0",
            "log.progress=false",
            *args.overrides,
        ]
        cfg = load_train_config(PRESET, overrides)
        start = time.perf_counter()
        Trainer(cfg).run()
        total = time.perf_counter() - start
        windows = [r["images_per_s"] for r in read_metrics(run)][1:]
        images_per_s = statistics.median(windows)
        rows[name] = (images_per_s / cfg.train.batch_size, images_per_s, total)
    print(f"locked text alignment, {args.steps} steps, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"  {'path':<22} {'steps/s':>8} {'images/s':>9} {'run s (with the cache build)':>30}")
    for name, (steps, images, total) in rows.items():
        print(f"  {name:<22} {steps:>8.2f} {images:>9.0f} {total:>30.0f}")
    print(f"  speed-up of the cache: {rows['cached features'][0] / rows['backbone every step'][0]:.1f}x")


if __name__ == "__main__":
    main()
