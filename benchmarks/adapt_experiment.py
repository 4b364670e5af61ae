"""Does continued pretraining help on a new domain? A small-scale adaptation experiment (docs/adaptation.md).

1. The *starting model* stands in for a released one: the demo preset (configs/demo/pretrain.yaml,
   300 steps on the synthetic world, seed 0), exported as a bare file.
2. The *new domain*: the same kind of scenes in false colour (channels rotated, then inverted:
   ``255 - image[[2, 0, 1]]``), a shift of every colour the starting model has seen. An unlabelled folder
   of them (another seed than the evaluation scenes) is the adaptation data; a labelled folder of them is
   the evaluation data.
3. Two arms continue the starting model on the new domain with configs/adapt/vits16.yaml's recipe at
   demo size (fresh heads, ``--warmup`` frozen steps, a ``--ramp`` lr ramp, ``--steps`` in all): without
   and with Gram anchoring to the starting model (``gram.checkpoint=init``), ``--seeds`` seeds each. A
   control trains the same steps on the new domain from random weights (the demo preset as it is).
4. The probes on the labelled new-domain folder (k-NN, linear, linear segmentation, depth): once for the
   starting model with its random twin and the raw pixels (``opendino eval START --baseline pixels``),
   then for each adapted run, on the same images with the same settings.

The adaptation settings (peak lr 1e-3, a third of the demo's pretraining peak; 60 + 60 of 300 steps) were
chosen before any result was seen and not tuned. Writes ``<out>/results.json`` (resumable: finished runs
and evaluations are kept) and prints the table (mean ± standard deviation over seeds):

    python benchmarks/adapt_experiment.py              # 3 seeds, ~45 min on 2 cores
    python benchmarks/adapt_experiment.py --quick      # a smoke run of every part (~2 min)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from opendino.data.sources import is_image
from opendino.data.synthetic import write_image_folder
from opendino.eval.data import open_labelled, synthetic_folder
from opendino.eval.suite import evaluate, resolve_model, run_tasks
from opendino.models import load_model, save_model
from opendino.train.config import load_train_config
from opendino.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
TASKS = ("knn", "linear", "seg", "depth")
METRICS = {
    "k-NN": ("knn", "top1_k20"),
    "linear": ("linear", "top1"),
    "seg mIoU": ("seg", "miou"),
    "depth RMSE ↓": ("depth", "rmse"),
}
ARMS = {
    "adapted": [],
    "adapted + Gram to start": ["gram.enabled=true", "gram.checkpoint=init", "gram.crop_scale=1.0"],
    # the control: the same steps on the new domain from random weights, at the demo's own lr
    "from scratch": [
        "init.backbone=null",
        "init.head_warmup_steps=0",
        "init.backbone_ramp_steps=0",
        "schedules.lr.peak=3.0e-3",
    ],
}


def false_colour(folder: Path) -> None:
    """Every image below ``folder`` (labels untouched) rewritten in false colour, once."""
    done = folder / "false-colour"
    if done.exists():
        return
    for path in sorted(folder.rglob("*.png")):
        if is_image(path) or path.name.endswith(".view2.png"):
            rgb = np.asarray(Image.open(path).convert("RGB"))
            Image.fromarray(255 - rgb[:, :, [2, 0, 1]]).save(path)
    done.touch()


def starting_model(out: Path, quick: bool) -> Path:
    """The demo preset's teacher, exported as a bare file (what a released model is to a user)."""
    file = out / "start.safetensors"
    if not file.exists():
        steps = ["train.steps=20"] if quick else []
        cfg = load_train_config(
            REPO / "configs/demo/pretrain.yaml", [f"run.dir={out / 'start-run'}", "log.progress=false", *steps]
        )
        run = Trainer(cfg).run()
        save_model(load_model(run / "teacher.safetensors"), file)
    return file


def adapt(out: Path, start: Path, data: Path, arm: str, seed: int, args: argparse.Namespace) -> Path:
    run = out / "runs" / f"{arm.replace(' ', '_').replace('+', 'and')}-seed{seed}"
    overrides = [
        f"run.dir={run}",
        f"init.backbone={start}",
        f"data.path={data}",
        f"train.seed={seed}",
        f"train.steps={args.steps}",
        f"init.head_warmup_steps={args.warmup}",
        f"init.backbone_ramp_steps={args.ramp}",
        "optim.epochs=10",
        "train.epoch_length=30",
        "schedules.lr.peak=1.0e-3",
        "checkpoint.every=100",
        "log.progress=false",
        *ARMS[arm],
    ]
    if not (run / "teacher.safetensors").exists():
        Trainer(load_train_config(REPO / "configs/demo/pretrain.yaml", overrides)).run()
    return run


def baselines(out: Path, start: Path, labelled: Path, results: dict, args) -> dict:
    """The starting model with its random twin and the pixel floor, once (``opendino eval --baseline
    pixels`` of the starting model: its report is ``<out>/eval/start/report.md``)."""
    if "baselines" not in results:
        r = evaluate(
            start,
            data=str(labelled),
            tasks=TASKS,
            out=out / "eval" / "start",
            resolution=args.resolution,
            progress=False,
            log=lambda _: None,
            baselines=["pixels"],
        )
        results["baselines"] = {"start": r["trained"], "random_init": r["random_init"], "pixels": r["pixels"]}
        (out / "results.json").write_text(json.dumps(results, indent=1))
    return results["baselines"]


def evaluated(out: Path, run: Path, labelled: Path, results: dict, key: str, args) -> dict:
    """The probes of one adapted run on the labelled new-domain folder (the same images and settings as
    the baselines: ``run_tasks``, which ``opendino eval`` runs for each model)."""
    if key not in results:
        model, info = resolve_model(run)
        settings = {
            **info,
            "resolution": args.resolution,
            "device": "cpu",
            "batch_size": 64,
            "progress": False,
            "cache": out / "eval" / "cache",
        }
        results[key] = {"trained": run_tasks(model.eval(), open_labelled(labelled), TASKS, settings, lambda _: None)}
        (out / "results.json").write_text(json.dumps(results, indent=1))
    return results[key]


def value(row: dict, metric: tuple[str, str]) -> float:
    task, name = metric
    return row[task][name]


def table(results: dict) -> str:
    base = results["baselines"]
    lines = ["| model | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]

    def runs_of(arm: str) -> list[dict]:
        return [r["trained"] for k, r in sorted(results.items()) if k.startswith(arm + "|")]

    def cells(rows: list[dict], minus: dict | None = None) -> str:
        out = []
        for metric in METRICS.values():
            vals = [value(r, metric) - (value(minus, metric) if minus else 0.0) for r in rows]
            sd = f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else ""
            out.append(f"{statistics.mean(vals):{'+' if minus else ''}.3f}{sd}")
        return " | ".join(out)

    for name, key in (("start model", "start"), ("pixels", "pixels"), ("random init", "random_init")):
        lines.append(f"| {name} | {cells([base[key]])} |")
    for arm in ARMS:
        if rows := runs_of(arm):
            lines.append(f"| {arm} ({len(rows)} seeds) | {cells(rows)} |")
    lines += ["", "difference to the start model (mean ± sd over seeds; depth RMSE: lower is better):", ""]
    lines += ["| arm | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for arm in ARMS:
        if rows := runs_of(arm):
            lines.append(f"| {arm} | {cells(rows, base['start'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/adapt-experiment")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=60, help="phase 1: heads only")
    parser.add_argument("--ramp", type=int, default=60, help="phase 2: the backbone lr ramp")
    parser.add_argument("--n-adapt", type=int, default=4000, help="unlabelled new-domain images to adapt on")
    parser.add_argument("--n-train", type=int, default=1000, help="labelled new-domain images the probes fit")
    parser.add_argument("--n-val", type=int, default=500)
    parser.add_argument("--resolution", type=int, default=128, help="evaluation size (the demo's: 2 x 64)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes, one seed")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps, args.warmup, args.ramp = [0], 6, 2, 2
        args.n_adapt, args.n_train, args.n_val, args.resolution = 64, 40, 20, 64
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    adapt_data = out / "new-domain-unlabelled"
    if not (adapt_data / "false-colour").exists():
        write_image_folder(adapt_data, args.n_adapt, 64, split="train", seed=1)
    false_colour(adapt_data)
    labelled = synthetic_folder(out / "new-domain-labelled", args.n_train, args.n_val, args.resolution)
    false_colour(labelled)
    start = starting_model(out, args.quick)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    baselines(out, start, labelled, results, args)
    for seed in args.seeds:
        for arm in ARMS:
            run = adapt(out, start, adapt_data, arm, seed, args)
            evaluated(out, run, labelled, results, f"{arm}|{seed}", args)
            print(f"{arm}, seed {seed}: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(table(results))
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
