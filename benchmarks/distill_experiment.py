"""Distillation against SSL from scratch at demo scale (CPU), and the cost of sharing the teacher.

1. the teacher: `configs/demo/pretrain.yaml` (with `--teacher-set KEY=VALUE` overrides), or `--teacher RUN`;
2. two students distilled from it in one run (`configs/distill/demo.yaml`), and the same two
   architectures pretrained by SSL from scratch for the same number of steps;
3. k-NN and segmentation (linear and nearest-neighbour) of the teacher and all four students, beside
   random init;
4. time per step: the 2-student run against the two single-student runs (teacher forward shared or not).

    python benchmarks/distill_experiment.py --out runs/distill_experiment
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import yaml

from opendino.eval.suite import evaluate
from opendino.train.config import load_train_config
from opendino.train.logging import read_metrics
from opendino.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "configs" / "demo" / "pretrain.yaml"
DISTILL = REPO / "configs" / "distill" / "demo.yaml"


def seconds_per_step(metrics_run: Path, batch: int) -> float:
    rates = [r["images_per_s"] for r in read_metrics(metrics_run)][1:]  # the first window includes start-up
    return batch / statistics.median(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/distill_experiment")
    p.add_argument("--teacher", default=None, help="an existing teacher run (default: pretrain one)")
    p.add_argument(
        "--teacher-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override of the teacher's preset, repeatable (e.g. optim.epochs=40 schedules.lr.peak=1e-3)",
    )
    p.add_argument("--steps", type=int, default=300, help="student steps (distilled and from scratch)")
    p.add_argument("--timing-steps", type=int, default=40)
    args = p.parse_args()
    out = Path(args.out)
    steps = [f"train.steps={args.steps}"]

    teacher = Path(args.teacher) if args.teacher else out / "teacher"
    if not (teacher / "teacher.safetensors").exists():
        overrides = [f"run.dir={teacher}", "log.progress=false", *args.teacher_set]
        Trainer(load_train_config(PRETRAIN, overrides)).run()
    distill_cfg = yaml.safe_load(DISTILL.read_text())
    students = {s["name"]: s["model"] for s in distill_cfg["distill"]["students"]}

    runs = {"teacher": teacher}
    distilled = out / "distilled"
    if not all((distilled / name / "teacher.safetensors").exists() for name in students):
        cfg = load_train_config(DISTILL, [f"run.dir={distilled}", f"distill.teacher={teacher}", *steps])
        Trainer(cfg).run()
    for name, model in students.items():
        runs[f"{name} distilled"] = distilled / name
        scratch = out / f"ssl-{name}"
        if not (scratch / "teacher.safetensors").exists():
            overrides = [f"run.dir={scratch}", f"model={json.dumps(model)}", "log.progress=false", *steps]
            Trainer(load_train_config(PRETRAIN, overrides)).run()
        runs[f"{name} SSL from scratch"] = scratch

    # Time per step: one run with both students against the two single-student runs.
    timing = out / "timing"
    short = [f"train.steps={args.timing_steps}", "log.every=5", "checkpoint.every=1000", "log.progress=false"]
    batch = load_train_config(DISTILL).train.batch_size
    Trainer(load_train_config(DISTILL, [f"run.dir={timing / 'both'}", f"distill.teacher={teacher}", *short])).run()
    both = seconds_per_step(timing / "both" / next(iter(students)), batch)
    singles = {}
    for name, model in students.items():
        overrides = [f"run.dir={timing / name}", f"distill.teacher={teacher}", "distill.students=[]"]
        Trainer(load_train_config(DISTILL, [*overrides, f"model={json.dumps(model)}", *short])).run()
        singles[name] = seconds_per_step(timing / name, batch)

    results = {}
    for label, run in runs.items():
        start = time.perf_counter()
        r = evaluate(run, tasks=("knn", "seg"), resolution=128, progress=False, log=lambda _: None)
        results[label] = {
            "knn_k20": r["trained"]["knn"]["top1_k20"],
            "seg_miou": r["trained"]["seg"]["miou"],
            "seg_nn_miou": r["trained"]["seg"]["nn_miou"],
            "random_knn_k20": r["random_init"]["knn"]["top1_k20"],
            "random_seg_miou": r["random_init"]["seg"]["miou"],
            "random_seg_nn_miou": r["random_init"]["seg"]["nn_miou"],
            "eval_s": time.perf_counter() - start,
        }
    results["timing"] = {"two_students_s_per_step": both, **{f"{k}_alone_s_per_step": v for k, v in singles.items()}}
    (out / "results.json").write_text(json.dumps(results, indent=2))

    print("\n| model | k-NN@20 | seg linear mIoU | seg NN mIoU |")
    print("|---|---|---|---|")
    for label in runs:
        r = results[label]
        print(
            f"| {label} | {r['knn_k20']:.3f} ({r['random_knn_k20']:.3f}) | {r['seg_miou']:.3f} "
            f"({r['random_seg_miou']:.3f}) | {r['seg_nn_miou']:.3f} ({r['random_seg_nn_miou']:.3f}) |"
        )
    print("(random init of the same architecture in brackets)")
    separately = " + ".join(f"{v:.3f}" for v in singles.values())
    total = sum(singles.values())
    print(f"\ntime per step: both students in one run {both:.3f} s; separately {separately} = {total:.3f} s")


if __name__ == "__main__":
    main()
