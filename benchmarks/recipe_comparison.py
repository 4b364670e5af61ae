"""The recipes of the DINOv3 paper's comparisons in one harness, each with and without Gram anchoring, on
the synthetic world at equal training compute: DINOv3, DINOv2, I-JEPA and the Franca-style nested heads.

Every recipe trains the same backbone size (a ViT of ``--width`` x ``--depth`` with 8-pixel patches, on
64-pixel global crops: an 8 x 8 token grid) for the same steps on the same images per step (``--batch``
images, two global crops each; the DINO-family recipes add their local crops, I-JEPA uses none). A run is
two stages: the first half of the steps, then the second half continued from it (models, optimizer, step
counter) either as it was or with Gram anchoring switched on: a frozen Gram teacher copied from the EMA
teacher (I-JEPA: the target encoder) at the half, weight ``--gram-weight``, per-image Grams of the global
crops (I-JEPA: of the context patches against the teacher's at the same positions). Both second stages
start from the same first stage, so the pair differs only by the Gram term. The dense monitor runs every
``--steps / 6`` steps. Each exported model (the EMA teacher / target encoder) is evaluated on held-out
scenes: k-NN, linear probe, linear segmentation, depth and correspondence; the random-initialised twin of
each recipe's architecture is evaluated once.

    python benchmarks/recipe_comparison.py --out runs/recipe-comparison --seeds 0 1 2 \
        --figure docs/recipe_comparison.png

Writes ``<out>/results.json`` (resumable: finished entries are kept), prints the table (mean ± standard
deviation over seeds) and, with ``--figure``, draws the table's bars and the monitor's curves.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from opendino.eval.data import open_labelled, synthetic_folder
from opendino.eval.suite import random_init_like, resolve_model, run_tasks
from opendino.train.config import load_train_config
from opendino.train.logging import read_metrics
from opendino.train.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = {
    "DINOv3": "demo/pretrain.yaml",
    "DINOv2": "dinov2/demo.yaml",
    "I-JEPA": "ijepa/demo.yaml",
    "Franca-style": "franca/demo.yaml",
}
METRICS = {
    "k-NN top-1": ("knn", "top1_k20"),
    "linear top-1": ("linear", "top1"),
    "seg mIoU": ("seg", "miou"),
    "depth RMSE ↓": ("depth", "rmse"),
    "corr. recall (1 patch)": ("corr", "recall_1patch"),
}
TASKS = ("knn", "linear", "seg", "depth", "corr")
MONITOR = ("monitor_seg_miou", "monitor_knn")


def geometry(recipe: str, args: argparse.Namespace) -> list[str]:
    """The shared backbone size, crops and run length, in each preset's own model family."""
    size = f"embed_dim: {args.width}, depth: {args.depth}, num_heads: {args.width // 64 or 1}, patch_size: 8"
    kwargs = {
        "DINOv3": f"{{{size}, pos_embed_rope_dtype: fp32, layerscale_init: 0.3}}",
        "DINOv2": f"{{{size}, img_size: 64, init_values: 0.3}}",
        "I-JEPA": f"{{{size}, pos_embed_rope_dtype: fp32, layerscale_init: 0.3, global_pool: avg}}",
        "Franca-style": f"{{{size}, pos_embed_rope_dtype: fp32, layerscale_init: 0.3}}",
    }[recipe]
    epoch = args.steps // 10
    return [
        f"model.kwargs={kwargs}",
        "crops.global_size=64",
        "crops.local_size=32",
        f"train.batch_size={args.batch}",
        f"train.epoch_length={epoch}",
        "optim.epochs=10",  # the schedules span the whole run; stage 1 stops at its half
        f"checkpoint.every={args.steps // 2}",
        "log.every=10",
        "log.progress=false",
        "log.tensorboard=false",
        f"monitor.every={max(10, args.steps // 60 * 10)}",
        "monitor.n_fit=192",
        "monitor.n_eval=96",
    ]


def gram_settings(args: argparse.Namespace) -> list[str]:
    return [
        "gram.enabled=true",
        "gram.img_level=true",
        f"gram.crop_scale={args.gram_crop_scale}",
        "gram.no_distortions=true",
        f"gram.loss_weight={args.gram_weight}",
    ]


def train(recipe: str, run: Path, seed: int, args: argparse.Namespace, *more: str) -> float:
    preset = CONFIGS / RECIPES[recipe]
    overrides = [*geometry(recipe, args), f"run.dir={run}", f"train.seed={seed}", *more, *args.overrides]
    start = time.perf_counter()
    Trainer(load_train_config(preset, overrides)).run()
    return time.perf_counter() - start


def evaluate_run(run: Path, args: argparse.Namespace, random_init: bool) -> dict:
    """The probes of ``opendino eval`` on the run's export, on one set of held-out scenes shared by every
    run; the random-initialised twin only when asked (it is the same for every seed of a recipe)."""
    model, info = resolve_model(run)
    cache = args.out / "eval-data"
    splits = open_labelled(synthetic_folder(cache, args.n_train, args.n_val, 64))
    settings = {**info, "resolution": 64, "device": "cpu", "batch_size": 64, "progress": False, "cache": cache}
    models = {"trained": model} | ({"random_init": random_init_like(model)} if random_init else {})
    rows = {}
    for name, m in models.items():
        results = run_tasks(m.eval(), splits, TASKS, settings, log=lambda _: None)
        rows[name] = {label: results[task][metric] for label, (task, metric) in METRICS.items()}
    return rows


def run_recipe(recipe: str, seed: int, args: argparse.Namespace) -> dict:
    """Stage 1, then stage 2 without and with Gram anchoring, each evaluated; the monitor's records."""
    base = args.out / f"{recipe}-seed{seed}"
    half = args.steps // 2
    seconds = {"stage1": train(recipe, base / "stage1", seed, args, f"train.steps={half}")}
    cont = [f"train.steps={args.steps}", f"init.from_run={base / 'stage1'}", "init.from_mode=continue"]
    seconds["plain"] = train(recipe, base / "plain", seed, args, *cont)
    seconds["gram"] = train(recipe, base / "gram", seed, args, *cont, *gram_settings(args))
    entry = {"seconds": seconds, "monitor": {}}
    for variant in ("plain", "gram"):
        evaluated = evaluate_run(base / variant, args, random_init=variant == "plain" and seed == args.seeds[0])
        entry[variant] = evaluated["trained"]
        if "random_init" in evaluated:
            entry["random_init"] = evaluated["random_init"]
        records = read_metrics(base / "stage1") + read_metrics(base / variant)
        entry["monitor"][variant] = [
            {"step": r["step"], **{k: r[k] for k in MONITOR}} for r in records if MONITOR[0] in r
        ]
    return entry


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/recipe-comparison"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--steps", type=int, default=140, help="training steps of every run (a multiple of 20)")
    p.add_argument("--batch", type=int, default=32, help="images per step")
    p.add_argument("--width", type=int, default=128, help="backbone width (heads: width / 64)")
    p.add_argument("--depth", type=int, default=4, help="backbone blocks")
    p.add_argument("--gram-weight", type=float, default=2.0)
    p.add_argument("--gram-crop-scale", type=float, default=1.0, help="Gram-teacher crops / global crops")
    p.add_argument("--n-train", type=int, default=300, help="held-out scenes the probes are fitted on")
    p.add_argument("--n-val", type=int, default=150, help="held-out scenes they are scored on")
    p.add_argument("--figure", type=Path, default=None)
    p.add_argument("overrides", nargs="*", help="a.b=c settings for every run")
    args = p.parse_args()
    if args.steps % 20:
        p.error("--steps must be a multiple of 20 (two stages of whole logging intervals)")
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for seed in args.seeds:
        for recipe in args.recipes:
            key = f"{recipe}|{seed}"
            if key not in results:  # a rerun continues where it stopped
                results[key] = run_recipe(recipe, seed, args)
                results_file.write_text(json.dumps(results, indent=1))
                print(f"{key}: {json.dumps({v: results[key][v] for v in ('plain', 'gram')})}", flush=True)
    summary = table(results, args)
    if args.figure:
        figure(summary, results, args)


def _mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(results: dict, args: argparse.Namespace) -> dict:
    print(
        f"\n{len(args.seeds)} seeds {args.seeds}; {args.steps} steps of {args.batch} images; ViT {args.width} x "
        f"{args.depth}, patch 8, 64 px; Gram weight {args.gram_weight}, crops x{args.gram_crop_scale}"
    )
    print("| recipe | Gram | " + " | ".join(METRICS) + " | train s |")
    print("|---" * (len(METRICS) + 3) + "|")
    summary = {}
    for recipe in args.recipes:
        entries = [results[f"{recipe}|{s}"] for s in args.seeds]
        rows = [("random init", "—", [e["random_init"] for e in entries if "random_init" in e], None)]
        for variant, mark in (("plain", "no"), ("gram", "yes")):
            secs = [e["seconds"]["stage1"] + e["seconds"][variant] for e in entries]
            rows.append((variant, mark, [e[variant] for e in entries], statistics.mean(secs)))
        for variant, mark, values, secs in rows:
            stats = {label: _mean_spread([v[label] for v in values]) for label in METRICS}
            summary[(recipe, variant)] = stats
            cells = [f"{m:.3f} ± {s:.3f}" if len(values) > 1 else f"{m:.3f}" for m, s in stats.values()]
            name = recipe if variant == "plain" else ("" if variant == "gram" else f"{recipe} (random init)")
            print(f"| {name} | {mark} | " + " | ".join(cells) + f" | {'' if secs is None else f'{secs:.0f}'} |")
    return summary


def figure(summary: dict, results: dict, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(METRICS), figsize=(3.3 * len(METRICS), 6.4))
    x = range(len(args.recipes))
    for ax, label in zip(axes[0], METRICS, strict=True):
        for offset, (variant, colour) in zip(
            (-0.27, 0.0, 0.27), (("random_init", "0.7"), ("plain", "tab:blue"), ("gram", "tab:orange")), strict=True
        ):
            means = [
                summary[(r, variant if variant != "random_init" else "random init")][label][0] for r in args.recipes
            ]
            spreads = [
                summary[(r, variant if variant != "random_init" else "random init")][label][1] for r in args.recipes
            ]
            name = {"random_init": "random init", "plain": "no Gram", "gram": "Gram (2nd half)"}[variant]
            ax.bar([i + offset for i in x], means, width=0.26, yerr=spreads, color=colour, capsize=2, label=name)
        ax.set_title(label, fontsize=9)
        ax.set_xticks(list(x), args.recipes, rotation=20, fontsize=8)
    axes[0][0].legend(fontsize=7)
    colours = dict(zip(args.recipes, ("tab:blue", "tab:green", "tab:red", "tab:purple"), strict=False))
    for ax, (key, title) in zip(
        axes[1], (("monitor_seg_miou", "monitor: segmentation mIoU"), ("monitor_knn", "monitor: k-NN")), strict=False
    ):
        for recipe in args.recipes:
            for variant, style in (("plain", "-"), ("gram", "--")):
                curves = [results[f"{recipe}|{s}"]["monitor"][variant] for s in args.seeds]
                steps = [r["step"] for r in curves[0]]
                mean = [statistics.mean(c[i][key] for c in curves) for i in range(len(steps))]
                ax.plot(
                    steps, mean, style, color=colours[recipe], label=f"{recipe}{' + Gram' if variant == 'gram' else ''}"
                )
        ax.axvline(args.steps // 2, color="0.6", lw=0.8)
        ax.set_title(f"{title} (mean of {len(args.seeds)} seeds)", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    axes[1][0].legend(fontsize=6, ncol=2)
    for ax in axes[1][2:]:
        ax.axis("off")
    fig.suptitle("Recipes at equal compute on the synthetic world (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=110)


if __name__ == "__main__":
    main()
