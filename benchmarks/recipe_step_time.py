"""CPU (or GPU) training-step time of every recipe's demo preset, and I-JEPA against the DINOv3 recipe on the
same backbone, measured in one process one after the other.

    python benchmarks/recipe_step_time.py --steps 12

Each entry trains its preset for ``--steps`` steps on the synthetic world (a throw-away run folder) and
reports the median of the trainer's own ``images_per_s`` over the steps after the first two (compilation,
allocation): images are the batch's source images (two global crops each, plus the local crops of the DINO
family). ``same backbone`` runs the DINOv3 demo preset with I-JEPA's backbone (8-pixel patches: an 8 x 8 grid).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from opendino.train.config import load_train_config
from opendino.train.logging import read_metrics
from opendino.train.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
IJEPA_BACKBONE = (
    "model.kwargs={embed_dim: 192, depth: 6, num_heads: 3, patch_size: 8, pos_embed_rope_dtype: fp32, "
    "layerscale_init: 0.3}"
)
ENTRIES = {
    "DINOv3 (configs/demo/pretrain.yaml)": ("demo/pretrain.yaml", []),
    "DINOv2 (configs/dinov2/demo.yaml)": ("dinov2/demo.yaml", []),
    "Franca-style (configs/franca/demo.yaml)": ("franca/demo.yaml", []),
    "I-JEPA (configs/ijepa/demo.yaml)": ("ijepa/demo.yaml", []),
    "DINOv3, same backbone as I-JEPA (patch 8)": ("demo/pretrain.yaml", [IJEPA_BACKBONE]),
}


def measure(preset: str, extra: list[str], steps: int, device: str) -> float:
    with tempfile.TemporaryDirectory() as run:
        overrides = [
            f"run.dir={run}",
            f"train.steps={steps}",
            f"train.device={device}",
            "log.every=1",
            "log.progress=false",
            "log.tensorboard=false",
            f"checkpoint.every={steps + 1}",
            *extra,
        ]
        Trainer(load_train_config(CONFIGS / preset, overrides)).run()
        return statistics.median(r["images_per_s"] for r in read_metrics(Path(run))[2:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    rows = {name: measure(preset, extra, args.steps, args.device) for name, (preset, extra) in ENTRIES.items()}
    print(f"\n{torch.get_num_threads()} threads, device {args.device}, torch {torch.__version__}")
    print("| recipe (demo geometry, batch 32) | images / s | ms / step |")
    print("|---|---|---|")
    for name, rate in rows.items():
        print(f"| {name} | {rate:.1f} | {1000 * 32 / rate:.0f} |")


if __name__ == "__main__":
    main()
