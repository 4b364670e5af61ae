"""Gram anchoring at small scale (docs/experiments.md): a baseline whose dense features degrade, and Gram
anchoring started after the dense peak with different Gram teachers.

For each seed, the baseline runs ``--steps`` steps of one setting of benchmarks/gram_search.py (the one
that degraded in the search), in three segments: up to ``--early`` (its EMA teacher is the *early* Gram
teacher), up to ``--branch`` (the *late* teacher, from after the peak), and on to the end. The monitor keeps
the EMA teacher of its best dense score (``monitor.keep_peak``): the *peak* teacher, found by the monitor,
not by a chosen step. From the branch point, the arms continue the baseline (models, optimizer, step
counter) with only the Gram term added (weight ``--gram-weight``, per-image Grams, undistorted teacher
crops):

- peak teacher, crops x2 (features at twice the input size, resized bicubically to the student's grid),
  refreshed from the EMA teacher 3 times, every 1/6 of the stage (the official rule, scaled);
- the same without refreshes; the same at x1; an early and a late teacher at x2 with refreshes.

Every end model, the peak and the branch models are probed on held-out scenes (k-NN, linear, linear
segmentation, depth, correspondence). Writes ``<out>/results.json`` (resumable), a table (mean ± standard
deviation over seeds), the curves figure and the PCA / similarity pictures of the same images:

    python benchmarks/gram_experiment.py                   # 3 seeds, ~1 hour on 2 cores
    python benchmarks/gram_experiment.py --quick           # a smoke run of every arm (minutes)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gram_search import CURVES, DENSE, SETTINGS, geometry, summarize, train  # noqa: E402

from opendino import runs  # noqa: E402
from opendino.recipes.gram import PEAK_TEACHER  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = ("knn", "linear", "seg", "depth", "corr")
METRICS = {
    "k-NN": ("knn", "top1_k20"),
    "linear": ("linear", "top1"),
    "seg mIoU": ("seg", "miou"),
    "depth RMSE ↓": ("depth", "rmse"),
    "corr. recall": ("corr", "recall_1patch"),
}
# arm -> (Gram teacher, crop scale, refreshes)
ARMS = {
    "peak x2 refresh": ("peak", 2.0, True),
    "peak x2 fixed": ("peak", 2.0, False),
    "peak x1 refresh": ("peak", 1.0, True),
    "early x2 refresh": ("early", 2.0, True),
    "late x2 refresh": ("late", 2.0, True),
}


def common(args: argparse.Namespace, seed: int) -> list[str]:
    """The settings of every run of a seed: the search geometry and setting, the kept dense peak."""
    return [
        *geometry(args.steps, args.monitor_every),
        *SETTINGS[args.setting][1],
        f"train.seed={seed}",
        "monitor.keep_peak=true",
        f"checkpoint.every={args.monitor_every}",
        "checkpoint.keep=1",
    ]


def segment(folder: Path, previous: Path | None, until: int, args: argparse.Namespace, seed: int) -> None:
    """The baseline up to step ``until``, continuing ``previous`` (the segment before) if given."""
    cont = [f"init.from_run={previous}", "init.from_mode=continue"] if previous else []
    train(folder, [*common(args, seed), *cont, f"train.steps={until}"], args.threads)


def arm(name: str, base: Path, args: argparse.Namespace, seed: int) -> None:
    """One Gram arm of ``ARMS``: the baseline continued from the branch point with the Gram term."""
    teacher, scale, refresh = ARMS[name]
    source = {"peak": PEAK_TEACHER, "early": str(base / "early"), "late": None}[teacher]
    gram = [
        "gram.enabled=true",
        "gram.img_level=true",
        "gram.no_distortions=true",
        f"gram.crop_scale={scale}",
        f"gram.loss_weight={args.gram_weight}",
        *([f"gram.checkpoint={source}"] if source else []),
    ]
    if refresh:
        every = (args.steps - args.branch) // 6
        gram += [f"gram.refresh_from={args.branch + every}", f"gram.refresh_every={every}", "gram.max_refreshes=3"]
    cont = [f"init.from_run={base / 'branch'}", "init.from_mode=continue", f"train.steps={args.steps}"]
    train(base / name.replace(" ", "-"), [*common(args, seed), *cont, *gram], args.threads)


def evaluate(model_path: Path, args: argparse.Namespace) -> dict:
    """The probes of ``opendino eval`` on one model file, on held-out scenes shared by every model."""
    import torch

    from opendino.eval.data import open_labelled, synthetic_folder
    from opendino.eval.suite import run_tasks
    from opendino.models import load_model

    torch.set_num_threads(args.threads)
    crops = runs.read_config(model_path.parent)["crops"]
    cache = args.out / "eval-data"
    splits = open_labelled(synthetic_folder(cache, args.n_train, args.n_val, 64))
    settings = {
        "mean": tuple(crops["mean"]),
        "std": tuple(crops["std"]),
        "resolution": 64,
        "device": "cpu",
        "batch_size": 64,
        "progress": False,
        "cache": cache,
    }
    results = run_tasks(load_model(model_path).eval(), splits, TASKS, settings, log=lambda _: None)
    return {label: results[task][metric] for label, (task, metric) in METRICS.items()}


def curve(*folders: Path) -> list[dict]:
    """The monitor's records along a chain of run folders (later folders continue earlier ones)."""
    from opendino.train.logging import read_metrics

    records: dict[int, dict] = {}
    for folder in folders:
        for r in read_metrics(folder):
            if DENSE in r:
                records[r["step"]] = {"step": r["step"], **{k: r[k] for k in CURVES if k in r}}
    return [records[s] for s in sorted(records)]


def run_all(args: argparse.Namespace) -> dict:
    """Every run of every seed on ``--jobs`` processes, then every probe; results.json is resumable."""
    from opendino.eval.data import synthetic_folder

    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    bases = {seed: args.out / f"seed{seed}" for seed in args.seeds}
    pool = ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"))  # each its own torch threads
    start = time.perf_counter()
    with pool:
        chains = {pool.submit(_baseline_chain, bases[s], args, s): s for s in args.seeds}
        jobs = []
        for chain in as_completed(chains):  # a seed's second stage starts once its branch point exists
            chain.result()
            s = chains[chain]
            jobs.append(pool.submit(segment, bases[s] / "baseline", bases[s] / "branch", args.steps, args, s))
            jobs += [pool.submit(arm, name, bases[s], args, s) for name in ARMS]
        for j in jobs:
            j.result()
        train_seconds = time.perf_counter() - start
        models = {
            s: {
                "peak": bases[s] / "branch" / runs.DENSE_PEAK,  # the best before the branch
                "branch": bases[s] / "branch" / runs.EXPORT,
                "baseline": bases[s] / "baseline" / runs.EXPORT,
                **{name: bases[s] / name.replace(" ", "-") / runs.EXPORT for name in ARMS},
            }
            for s in args.seeds
        }
        synthetic_folder(args.out / "eval-data", args.n_train, args.n_val, 64)  # once, before parallel readers
        # each distinct file probed once (the peak is the branch model when it was the last point before it):
        # two processes would write the same feature-cache entry
        todo: dict[str, list[str]] = {}
        for s in args.seeds:
            for name, path in models[s].items():
                if f"{name}|{s}" not in results:
                    todo.setdefault(hashlib.sha1(path.read_bytes()).hexdigest(), []).append(f"{name}|{s}")
        first = {digest: keys[0] for digest, keys in todo.items()}
        paths = {f"{n}|{s}": p for s in args.seeds for n, p in models[s].items()}
        jobs = {pool.submit(evaluate, paths[key], args): digest for digest, key in first.items()}
        for job in as_completed(jobs):
            for key in todo[jobs[job]]:
                results[key] = job.result()
            results_file.write_text(json.dumps(results, indent=1))  # a crash keeps the probes done
    before = results.get("seconds", {})  # a rerun adds its own time to what the earlier ones spent
    results["seconds"] = {
        "train": train_seconds + before.get("train", 0.0),
        "total": time.perf_counter() - start + before.get("total", 0.0),
    }
    results["curves"] = {
        str(s): {
            "baseline": curve(bases[s] / "early", bases[s] / "branch", bases[s] / "baseline"),
            **{n: curve(bases[s] / "early", bases[s] / "branch", bases[s] / n.replace(" ", "-")) for n in ARMS},
        }
        for s in args.seeds
    }
    baseline_curves = [results["curves"][str(s)]["baseline"] for s in args.seeds]
    results["baseline_verdict"] = {k: v for k, v in summarize(baseline_curves).items() if k != "mean"}
    results["peak_step"] = {str(s): _peak_step(bases[s] / "branch") for s in args.seeds}  # the peak teachers
    results["baseline_peak_step"] = {str(s): _peak_step(bases[s] / "baseline") for s in args.seeds}
    for s, step in results["peak_step"].items():
        if step == args.branch - 1:
            print(
                f"warning: seed {s}: the dense peak is the last point before the branch: the peak and late "
                "teachers are the same model (no degradation before the branch)"
            )
    results_file.write_text(json.dumps(results, indent=1))
    return results


def _peak_step(run: Path) -> int:
    return json.loads((run / runs.DENSE_PEAK_RECORD).read_text())["step"]


def _baseline_chain(base: Path, args: argparse.Namespace, seed: int) -> None:
    segment(base / "early", None, args.early, args, seed)
    segment(base / "branch", base / "early", args.branch, args, seed)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(results: dict, args: argparse.Namespace) -> str:
    """The probes of every model (mean ± sample sd over seeds) and the monitor's last dense score."""
    rows = ["peak", "branch", "baseline", *ARMS]
    names = {
        "peak": "baseline at its dense peak before the branch (the peak teacher)",
        "branch": f"baseline at step {args.branch} (the late teacher)",
        "baseline": f"baseline at step {args.steps}, no Gram",
    }
    lines = [
        f"{len(args.seeds)} seeds {args.seeds}; setting `{args.setting}`; {args.steps} steps, Gram from step "
        f"{args.branch}; peak teachers from steps {list(results['peak_step'].values())}; the baseline's best "
        f"over the run at steps {list(results['baseline_peak_step'].values())}",
        "",
        "| model | " + " | ".join(METRICS) + " | monitor seg (end) |",
        "|---" * (len(METRICS) + 2) + "|",
    ]
    for row in rows:
        stats = [_mean_sd([results[f"{row}|{s}"][m] for s in args.seeds]) for m in METRICS]
        if row in ARMS or row == "baseline":
            end = _mean_sd([results["curves"][str(s)][row][-1][DENSE] for s in args.seeds])
            mon = f"{end[0]:.3f} ± {end[1]:.3f}"
        else:
            mon = ""
        cells = " | ".join(f"{m:.3f} ± {sd:.3f}" for m, sd in stats)
        lines.append(f"| {names.get(row, 'Gram: ' + row)} | {cells} | {mon} |")
    # Each arm against the baseline of its own seed (both continue the same branch point): paired differences.
    lines += ["", "| Gram arm − baseline, same seed | " + " | ".join(METRICS) + " | monitor seg (end) |"]
    lines.append("|---" * (len(METRICS) + 2) + "|")
    for row in ARMS:
        diffs = [
            _mean_sd([results[f"{row}|{s}"][m] - results[f"baseline|{s}"][m] for s in args.seeds]) for m in METRICS
        ]
        end = _mean_sd(
            [
                results["curves"][str(s)][row][-1][DENSE] - results["curves"][str(s)]["baseline"][-1][DENSE]
                for s in args.seeds
            ]
        )
        cells = " | ".join(f"{m:+.3f} ± {sd:.3f}" for m, sd in [*diffs, end])
        lines.append(f"| {row} | {cells} |")
    v = results["baseline_verdict"]
    lines += [
        "",
        f"Baseline monitor curve (mean of seeds): peak {v['peak']:.3f} at step {v['peak_step']}, end (last "
        f"points) {v['end']:.3f} ± {v['end_spread']:.3f}, paired drop {v['drop']:.3f} ± {v['drop_sd']:.3f}: "
        f"{'degrades' if v['degrades'] else 'does not degrade'} by the rule of benchmarks/gram_search.py",
    ]
    return "\n".join(lines)


def figure(results: dict, args: argparse.Namespace, path: Path) -> None:
    """Every monitor curve of the baseline and the arms: mean and a band of ± one sample sd over seeds."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    for ax, (key, title) in zip(axes.flat, CURVES.items(), strict=True):
        for name in ["baseline", *ARMS]:
            per_seed = [results["curves"][str(s)][name] for s in args.seeds]
            steps = [r["step"] for r in per_seed[0]]
            values = np.array([[r[key] for r in c] for c in per_seed])
            mean, sd = values.mean(0), values.std(0, ddof=1 if len(per_seed) > 1 else 0)
            keep = [i for i, st in enumerate(steps) if name == "baseline" or st >= args.branch - args.monitor_every]
            xs = [steps[i] for i in keep]
            line = ax.plot(xs, mean[keep], label=name, linewidth=2 if name in ("baseline", "peak x2 refresh") else 1)
            ax.fill_between(xs, (mean - sd)[keep], (mean + sd)[keep], color=line[0].get_color(), alpha=0.15)
        ax.axvline(args.branch, color="gray", linestyle=":", linewidth=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for step in results["peak_step"].values():
        axes.flat[0].axvline(step, color="green", linestyle="--", linewidth=0.6)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(
        f"Gram anchoring after the dense peak (setting {args.setting}; mean ± sd over seeds {args.seeds}; "
        f"dotted: Gram starts; dashed: each seed's peak teacher)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pictures(results: dict, args: argparse.Namespace, path: Path, resolution: int = 128) -> None:
    """PCA and similarity maps of the same held-out scenes: the peak teacher, the end without Gram and the
    end of the Gram arm with the best mean segmentation probe (the first seed), at twice the training
    resolution so that the patch grid is 16 x 16."""
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    import torch
    from matplotlib import pyplot as plt

    from opendino import runs
    from opendino.data.augment import normalize
    from opendino.data.synthetic import render_scene
    from opendino.eval.visualize import pca_rgb, similarity_map
    from opendino.models import load_model

    base = args.out / f"seed{args.seeds[0]}"
    best = max(ARMS, key=lambda a: statistics.mean(results[f"{a}|{s}"]["seg mIoU"] for s in args.seeds))
    models = {
        "the peak teacher": base / "branch" / runs.DENSE_PEAK,
        "end, no Gram": base / "baseline" / runs.EXPORT,
        f"end, Gram ({best})": base / best.replace(" ", "-") / runs.EXPORT,
    }
    crops = runs.read_config(base / "baseline")["crops"]
    scenes = [render_scene(20_000_000 + i, resolution, "val") for i in range(3)]
    images = torch.stack([torch.from_numpy(np.array(s.image)).permute(2, 0, 1) for s in scenes])
    x = normalize(images, crops["mean"], crops["std"])
    cols = 2 * len(scenes) + 1
    fig, axes = plt.subplots(len(models) + 1, cols, figsize=(1.9 * cols, 1.9 * (len(models) + 1)))
    axes[0, 0].text(0.5, 0.5, "input", ha="center", va="center", fontsize=9)
    for i in range(len(scenes)):
        axes[0, 1 + 2 * i].imshow(images[i].permute(1, 2, 0).numpy())
        axes[0, 1 + 2 * i].set_title(f"scene {i + 1}", fontsize=8)
        axes[0, 2 + 2 * i].imshow(images[i].permute(1, 2, 0).numpy())
        axes[0, 2 + 2 * i].plot([resolution / 2], [resolution / 2], "g+", markersize=10, mew=2)
        axes[0, 2 + 2 * i].set_title("query patch +", fontsize=8)
    for r, (name, file) in enumerate(models.items(), start=1):
        with torch.no_grad():
            tokens = load_model(file).eval().forward_features(x)["x_norm_patchtokens"]
        grid = int(round(tokens.shape[1] ** 0.5))
        axes[r, 0].text(0.5, 0.5, name.replace(", ", ",\n"), ha="center", va="center", fontsize=9)
        for i in range(len(scenes)):
            patch = tokens[i].reshape(grid, grid, -1)
            axes[r, 1 + 2 * i].imshow(pca_rgb(patch))
            sim = similarity_map(patch, grid // 2, grid // 2)
            axes[r, 2 + 2 * i].imshow(sim.numpy(), cmap="inferno", vmin=-1, vmax=1)
            if r == 1:
                axes[r, 1 + 2 * i].set_title("PCA of patches", fontsize=8)
                axes[r, 2 + 2 * i].set_title("cosine to the + patch", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"The same held-out scenes at {resolution} px (seed {args.seeds[0]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", default="7b", choices=list(SETTINGS), help="the baseline (gram_search.py)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=720, help="steps of every run")
    p.add_argument("--early", type=int, default=90, help="the early Gram teacher: the EMA teacher of this step")
    p.add_argument("--branch", type=int, default=450, help="Gram anchoring starts here (after the dense peak)")
    p.add_argument("--monitor-every", type=int, default=30)
    p.add_argument("--gram-weight", type=float, default=2.0)
    p.add_argument("--n-train", type=int, default=200, help="held-out scenes the probes are fitted on")
    p.add_argument("--n-val", type=int, default=100, help="held-out scenes they are scored on")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--out", type=Path, default=Path("runs/gram-experiment"))
    p.add_argument("--figure", type=Path, default=None, help="the curves (default: <out>/curves.png)")
    p.add_argument("--pictures", type=Path, default=None, help="the PCA pictures (default: <out>/pictures.png)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 seed, 40 steps, small probes")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.steps, args.early, args.branch, args.monitor_every = [0], 40, 10, 20, 10
        args.n_train, args.n_val = 40, 20
    if not 0 < args.early < args.branch < args.steps:
        p.error("need 0 < --early < --branch < --steps")
    if any(n % args.monitor_every for n in (args.steps, args.early, args.branch)) or args.monitor_every % 10:
        p.error("--steps, --early and --branch must be multiples of --monitor-every, itself a multiple of 10")
    if (args.steps - args.branch) // 6 < 1:
        p.error("the Gram stage (--steps - --branch) needs at least 6 steps for its refreshes")
    args.out.mkdir(parents=True, exist_ok=True)
    results = run_all(args)
    text = table(results, args)
    print(text)
    (args.out / "table.md").write_text(text + "\n")
    figure(results, args, args.figure or args.out / "curves.png")
    pictures(results, args, args.pictures or args.out / "pictures.png")
    print(f"train {results['seconds']['train']:.0f} s, all {results['seconds']['total']:.0f} s; {args.out}")


if __name__ == "__main__":
    main()
