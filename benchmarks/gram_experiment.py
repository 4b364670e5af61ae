"""Does Gram anchoring keep dense features from degrading? A long pretraining on the synthetic world without
Gram anchoring against the same run with a Gram term from an early EMA-teacher snapshot, both watched by
the dense-quality monitor (segmentation probe, CLS-to-patch similarity, k-NN). CPU, under an hour:

    python benchmarks/gram_experiment.py                      # 1,500 steps per run, figure in docs/
    python benchmarks/gram_experiment.py --steps 600 --anchor-step 100
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from opendino.train.config import load_train_config
from opendino.train.logging import read_metrics
from opendino.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo" / "pretrain.yaml"
METRICS = {
    "monitor_seg_miou": "dense: segmentation probe mIoU",
    "monitor_cls_patch_cos": "CLS-to-patch cosine similarity",
    "monitor_knn": "global: k-NN accuracy (k=10)",
}


def run(name: str, out: Path, args: argparse.Namespace, gram: bool) -> list[dict]:
    epoch = load_train_config(DEMO).train.epoch_length
    preset = {"base": str(DEMO), "optim": {"epochs": args.steps / epoch}}
    if gram:
        anchor = args.anchor_step / epoch
        preset["gram"] = {"enabled": True, "refresh_from": args.anchor_step, "crop_scale": 2.0}
        # Weight 0 until the snapshot, then a short cosine ramp to its value (as in the official stage 2).
        preset["schedules"] = {
            "gram_loss_weight": {
                "start": 0.0,
                "peak": 0.0,
                "end": args.gram_weight,
                "warmup_epochs": anchor,
                "cosine_epochs": 1,
            },
        }
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "preset.yaml").write_text(yaml.safe_dump(preset))
    overrides = [
        f"run.dir={folder}",
        f"monitor.every={args.monitor_every}",
        "log.every=10",
        f"checkpoint.every={args.steps}",
        "log.progress=false",
    ]
    Trainer(load_train_config(folder / "preset.yaml", overrides)).run()
    return [r for r in read_metrics(folder) if "monitor_seg_miou" in r]


def plot(curves: dict[str, list[dict]], anchor: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.2))
    for ax, (key, title) in zip(axes, METRICS.items(), strict=True):
        for name, records in curves.items():
            ax.plot([r["step"] for r in records], [r[key] for r in records], label=name)
        ax.axvline(anchor, color="gray", linestyle=":", linewidth=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--anchor-step", type=int, default=100, help="the EMA teacher becomes the Gram teacher here")
    p.add_argument("--gram-weight", type=float, default=2.0)
    p.add_argument("--monitor-every", type=int, default=50)
    p.add_argument("--out", default="runs/gram_experiment")
    p.add_argument("--figure", default=str(REPO / "docs" / "gram_experiment.png"))
    args = p.parse_args()
    out = Path(args.out)
    curves = {
        "no Gram anchoring": run("baseline", out, args, gram=False),
        f"Gram anchoring from step {args.anchor_step}": run("gram", out, args, gram=True),
    }
    plot(curves, args.anchor_step, Path(args.figure))
    (out / "curves.json").write_text(json.dumps(curves))
    print(f"| run | {' | '.join(METRICS)} (last) |")
    for name, records in curves.items():
        print(f"| {name} | " + " | ".join(f"{records[-1][k]:.3f}" for k in METRICS) + " |")
    print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
