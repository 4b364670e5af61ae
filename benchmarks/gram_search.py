"""Looking for dense-feature degradation at small scale: the DINOv3 demo recipe on the synthetic world,
in one small ViT geometry, under settings that might make its patch features degrade over a long run.

Every setting trains ``--steps`` steps per seed with the dense monitor every ``--monitor-every`` steps
(nearest-neighbour segmentation mIoU of the EMA teacher's patches, k-NN of its CLS token, and the
diagnostics: CLS-to-patch cosine, effective rank of the patches, patch-to-patch similarity mean and
spread, CLS attention entropy). A setting *degrades* when its mean dense curve ends below its peak by more
than the seeds' spread at the end. The table and the curves of every setting go to ``--out``; the figure
to ``--figure``:

    python benchmarks/gram_search.py --settings constant_lr no_ibot --seeds 0 1 2
    python benchmarks/gram_search.py --list

Resumable: finished runs (their ``teacher.safetensors``) are not trained again.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from scipy.stats import t

from opendino import runs
from opendino.train.config import load_train_config
from opendino.train.logging import read_metrics
from opendino.train.monitor import SCORE as DENSE
from opendino.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "configs" / "demo" / "pretrain.yaml"
VIT = "{embed_dim: 128, depth: 4, num_heads: 2, patch_size: 8, pos_embed_rope_dtype: fp32, layerscale_init: 0.3}"
CONSTANT_LR = "schedules.lr={start: 0.0, peak: 3.0e-3, end: 3.0e-3, warmup_epochs: 1, freeze_last_layer_epochs: 1}"
# The ViT-7B stage-1 schedule (docs/design/recipe.md §4.2): after the warm-up, lr, weight decay and EMA
# momentum stay constant (0.04, 0.994), so the teacher keeps following the student to the end (with the
# demo's momentum cosine to 1.0 the teacher stops moving in the last third of a run).
SCHEDULE_7B = [
    CONSTANT_LR,
    "schedules.weight_decay={start: 0.04, peak: 0.04, end: 0.04}",
    "schedules.momentum={start: 0.994, peak: 0.994, end: 0.994}",
]
# Each setting: what it changes from the demo recipe in the geometry of geometry() (a ViT 128 x 4 with
# 8-pixel patches on 64-pixel crops: an 8 x 8 token grid).
SETTINGS: dict[str, tuple[str, list[str]]] = {
    "demo": ("the demo recipe (cosine lr 3e-3 to 1e-5, momentum 0.99 to 1)", []),
    "constant_lr": ("lr constant at 3e-3 after warm-up (momentum still 0.99 to 1)", [CONSTANT_LR]),
    "no_ibot": ("constant lr, no iBOT loss (momentum 0.99 to 1)", [CONSTANT_LR, "loss.ibot_weight=0.0"]),
    "7b": ("the 7B schedule: lr 3e-3, weight decay 0.04, momentum 0.994, all constant", SCHEDULE_7B),
    "7b_no_ibot": ("7B schedule, no iBOT loss", [*SCHEDULE_7B, "loss.ibot_weight=0.0"]),
    "7b_small_ibot": ("7B schedule, iBOT weight 0.1", [*SCHEDULE_7B, "loss.ibot_weight=0.1"]),
    "7b_small_data": ("7B schedule, 512 training images (~37 epochs)", [*SCHEDULE_7B, "data.synthetic_n=512"]),
    "7b_hot_teacher": (
        "7B schedule, teacher temperature 0.1",
        [*SCHEDULE_7B, "schedules.teacher_temp={start: 0.04, peak: 0.1, end: 0.1, warmup_epochs: 3}"],
    ),
    "7b_few_prototypes": (
        "7B schedule, 32 prototypes per head",
        [*SCHEDULE_7B, "dino_head.prototypes=32", "ibot_head.prototypes=32"],
    ),
}
CURVES = {
    "monitor_seg_miou": "segmentation mIoU (NN, dense)",
    "monitor_knn": "k-NN (k=10, global)",
    "monitor_cls_patch_cos": "CLS-to-patch cosine",
    "monitor_patch_rank": "effective rank of patches",
    "monitor_patch_sim_std": "patch-to-patch cosine spread",
    "monitor_cls_attn_entropy": "CLS attention entropy / log N",
}


def geometry(steps: int, monitor_every: int) -> list[str]:
    """The settings every run shares: the small ViT, the crops, the run length, logging and the monitor."""
    return [
        f"model.kwargs={VIT}",
        "crops.global_size=64",
        "crops.local_size=32",
        "train.batch_size=32",
        f"train.epoch_length={steps // 10}",
        "optim.epochs=10",
        f"checkpoint.every={steps}",
        "log.every=10",
        "log.progress=false",
        "log.tensorboard=false",
        f"monitor.every={monitor_every}",
        "monitor.n_fit=128",
        "monitor.n_eval=64",
    ]


def train(folder: Path, overrides: list[str], threads: int | None = None) -> list[dict]:
    """One run of the preset with ``overrides`` (skipped when finished; ``threads``: torch threads); the
    monitor's records."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if not (folder / runs.EXPORT).exists():
        Trainer(load_train_config(PRESET, [*overrides, f"run.dir={folder}"])).run()
    return [r for r in read_metrics(folder) if DENSE in r]


def summarize(curves: list[list[dict]]) -> dict:
    """The verdict on one setting's seeds. The peak is the best point of the mean dense curve before its
    last ``tail`` points (3 for long curves), whose mean per seed is the end. Each seed's drop is its value
    at that peak step minus its end (paired), and the setting *degrades* when the mean drop is both
    significant (one-sided t-test, 5 %, over the seeds) and larger than the seeds' spread at the end. The
    peak is chosen on the same curves it is tested on, which favours finding a drop: treat a borderline
    verdict as none."""
    steps = [r["step"] for r in curves[0]]
    if any([r["step"] for r in c] != steps for c in curves):
        raise ValueError("the seeds were monitored at different steps")
    mean = {k: [statistics.mean(c[i][k] for c in curves) for i in range(len(steps))] for k in CURVES}
    dense, tail = mean[DENSE], max(1, min(3, len(steps) // 4))
    peak = max(range(len(steps) - tail), key=dense.__getitem__)
    ends = [statistics.mean(r[DENSE] for r in c[-tail:]) for c in curves]
    drops = [c[peak][DENSE] - end for c, end in zip(curves, ends, strict=True)]
    n = len(curves)
    spread = statistics.stdev(ends) if n > 1 else 0.0
    drop_sd = statistics.stdev(drops) if n > 1 else 0.0
    drop = statistics.mean(drops)
    significant = n > 1 and (
        drop_sd == 0 and drop > 0 or drop_sd > 0 and drop / (drop_sd / n**0.5) > t.ppf(0.95, n - 1)
    )
    return {
        "steps": steps,
        "mean": mean,
        "peak_step": steps[peak],
        "peak": dense[peak],
        "end": statistics.mean(ends),
        "end_spread": spread,
        "drop": drop,
        "drop_sd": drop_sd,
        "degrades": bool(significant and drop > spread),
        "knn_start_end": (mean["monitor_knn"][0], mean["monitor_knn"][-1]),
    }


def figure(summaries: dict[str, dict], path: Path) -> None:
    """The mean monitor curves of every setting, one panel per curve."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (key, title) in zip(axes.flat, CURVES.items(), strict=True):
        for name, s in summaries.items():
            ax.plot(s["steps"], s["mean"][key], label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Degradation search: DINOv3 demo recipe, ViT 128x4 patch 8, 64 px (mean over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=600, help="steps per run (a multiple of 10 x --monitor-every)")
    p.add_argument("--monitor-every", type=int, default=30)
    p.add_argument("--out", type=Path, default=Path("runs/gram-search"))
    p.add_argument("--figure", type=Path, default=None)
    p.add_argument("--list", action="store_true", help="print the settings and stop")
    args = p.parse_args()
    if args.list:
        for name, (text, overrides) in SETTINGS.items():
            print(f"{name}: {text}\n    {' '.join(overrides)}")
        return
    summaries = {}
    for name in args.settings:
        text, overrides = SETTINGS[name]
        curves = [
            train(
                args.out / f"{name}-seed{seed}",
                [*geometry(args.steps, args.monitor_every), *overrides, f"train.seed={seed}"],
            )
            for seed in args.seeds
        ]
        summaries[name] = summarize(curves) | {"text": text, "overrides": overrides}
    (args.out / "summary.json").write_text(json.dumps(summaries, indent=1))
    print(f"\n{len(args.seeds)} seeds {args.seeds}, {args.steps} steps; dense = NN segmentation mIoU of the monitor")
    print(
        "| setting | monitor seg: peak (step) | end ± seed spread | drop ± sd (paired) | CLS-patch cos, first → last "
        "| patch rank, max → last | k-NN, first → last | degrades |"
    )
    print("|---" * 8 + "|")
    for name, s in summaries.items():
        m = s["mean"]
        cos, rank, knn = m["monitor_cls_patch_cos"], m["monitor_patch_rank"], m["monitor_knn"]
        verdict = ("yes" if s["degrades"] else "no") if len(args.seeds) > 1 else "needs seeds"
        print(
            f"| `{name}`: {s['text']} | {s['peak']:.3f} ({s['peak_step']}) | {s['end']:.3f} ± {s['end_spread']:.3f} "
            f"| {s['drop']:.3f} ± {s['drop_sd']:.3f} | {cos[0]:.2f} → {cos[-1]:.2f} | {max(rank):.1f} → {rank[-1]:.1f} "
            f"| {knn[0]:.2f} → {knn[-1]:.2f} | {verdict} |"
        )
    if args.figure:
        figure(summaries, args.figure)


if __name__ == "__main__":
    main()
