"""The text-alignment comparison of the DINOv3 paper at demo scale, on the synthetic world: dino.txt on an
OpenDINO SSL backbone (locked, cached features) vs CLIP from scratch vs SigLIP from scratch vs the
Perception-Encoder-style variant (CLIP from scratch plus dense alignment to the SSL backbone's patches).

Every variant trains the same vision head and text tower for the same steps on the same batches (seeds
vary the initialisation and the data order); the image tower is the frozen SSL backbone (dino.txt) or a
random-initialised twin of it that is trained (the others). The SSL backbone's own pretraining is extra
compute for dino.txt (and the PE variant's teacher), reported beside the table. Then every run is evaluated
on held-out scenes: zero-shot top-1, retrieval R@1 (image to text), open-vocabulary mIoU, and the frozen
image tower's k-NN and linear segmentation.

    python benchmarks/text_experiment.py --backbone runs/demo-pretrain --out runs/text-experiment --seeds 0 1 2

Writes ``<out>/results.json``, prints a table (mean ± standard deviation over the seeds) and draws
``docs/text_experiment.png`` (``--figure``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from opendino.eval.suite import evaluate
from opendino.train.config import load_train_config
from opendino.train.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "text"
VARIANTS = {
    "dino.txt (locked SSL)": ("demo.yaml", ["init.backbone={backbone}"]),
    "CLIP (scratch)": ("clip.yaml", []),
    "SigLIP (scratch)": ("siglip.yaml", []),
    "PE-style (scratch + dense)": ("pe_style.yaml", ["text.dense_teacher={backbone}"]),
}
METRICS = {
    "zero-shot top-1": ("zeroshot", "top1"),
    "retrieval R@1 (i→t)": ("retrieval", "image_to_text_r1"),
    "open-vocab mIoU": ("ovseg", "miou"),
    "image k-NN top-1": ("knn", "top1_k20"),
    "image linear seg mIoU": ("seg", "miou"),
}
TASKS = ("zeroshot", "retrieval", "ovseg", "knn", "seg")


def run_variant(name: str, seed: int, args: argparse.Namespace) -> dict:
    preset, extra = VARIANTS[name]
    run = args.out / f"{preset.removesuffix('.yaml')}-seed{seed}"
    overrides = [
        f"run.dir={run}",
        f"train.seed={seed}",
        "log.progress=false",
        "monitor.every=0",
        *[o.format(backbone=args.backbone) for o in extra],
        *args.overrides,
    ]
    start = time.perf_counter()
    Trainer(load_train_config(CONFIGS / preset, overrides)).run()
    train_s = time.perf_counter() - start
    results = evaluate(
        run, tasks=TASKS, n_train=args.n_train, n_val=args.n_val, progress=False, log=lambda _: None, out=run / "eval"
    )
    row = {label: results["trained"][task][metric] for label, (task, metric) in METRICS.items()}
    return {**row, "train_s": train_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", required=True, help="the SSL run folder (configs/demo/pretrain.yaml)")
    p.add_argument("--out", type=Path, default=Path("runs/text-experiment"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n-train", type=int, default=600, help="held-out scenes the image probes are fitted on")
    p.add_argument("--n-val", type=int, default=300, help="held-out scenes every task is scored on")
    p.add_argument("--figure", type=Path, default=None)
    p.add_argument("overrides", nargs="*", help="a.b=c settings for every variant (e.g. train.steps=200)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for seed in args.seeds:
        for name in VARIANTS:
            key = f"{name}|{seed}"
            if key not in results:  # a rerun continues where it stopped
                results[key] = run_variant(name, seed, args)
                results_file.write_text(json.dumps(results, indent=1))
                print(f"{key}: {json.dumps(results[key])}", flush=True)
    print(f"\n{len(args.seeds)} seeds {args.seeds}; backbone {args.backbone}; overrides {args.overrides}")
    print("| variant | " + " | ".join(METRICS) + " | train s |")
    print("|---" * (len(METRICS) + 2) + "|")
    summary = {}
    for name in VARIANTS:
        rows = [results[f"{name}|{s}"] for s in args.seeds]
        cells, summary[name] = [], {}
        for label in [*METRICS, "train_s"]:
            values = [r[label] for r in rows]
            mean, spread = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
            summary[name][label] = (mean, spread)
            cells.append(f"{mean:.0f}" if label == "train_s" else f"{mean:.3f} ± {spread:.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.figure:
        _figure(summary, args.figure, len(args.seeds))


def _figure(summary: dict, path: Path, n_seeds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3.4))
    names = list(summary)
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for ax, label in zip(axes, METRICS, strict=True):
        means = [summary[n][label][0] for n in names]
        spreads = [summary[n][label][1] for n in names]
        ax.bar(range(len(names)), means, yerr=spreads, color=colours, capsize=3)
        ax.set_title(label, fontsize=9)
        ax.set_xticks(range(len(names)), [n.split(" (")[0] for n in names], rotation=30, fontsize=8)
    fig.suptitle(f"Text alignment at demo scale, synthetic world (mean ± std over {n_seeds} seeds)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
