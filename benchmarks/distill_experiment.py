"""Distillation against SSL from scratch at demo scale (CPU), and the cost of sharing the teacher.

1. the teacher: `--teacher-preset` (default `configs/demo/pretrain.yaml`, with `--teacher-set KEY=VALUE`
   overrides), or `--teacher RUN`;
2. the students of `--preset` (default `configs/distill/demo.yaml`: two) distilled from it in one run, and
   the same architectures pretrained by SSL from scratch (`configs/demo/pretrain.yaml`) for the same number
   of steps;
3. k-NN and segmentation (linear and nearest-neighbour) of the teacher and all four students, beside
   random init;
4. time per step: the multi-student run against the single-student runs (teacher forward shared or not).

    python benchmarks/distill_experiment.py --out runs/distill_experiment
    python benchmarks/distill_experiment.py --out runs/distill_blocks \
        --teacher-preset configs/demo/pretrain_long.yaml --preset configs/distill/demo_blocks.yaml
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

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


def time_shared_teacher(
    preset: Path, teacher: Path, students: dict[str, list[str]], out: Path, steps: int
) -> tuple[float, dict[str, float]]:
    """Seconds per step of one run with all students against each student's single-student run."""
    short = [f"train.steps={steps}", "log.every=5", "checkpoint.every=1000", "log.progress=false"]
    batch = load_train_config(preset).train.batch_size
    Trainer(load_train_config(preset, [f"run.dir={out / 'all'}", f"distill.teacher={teacher}", *short])).run()
    together = seconds_per_step(out / "all" / next(iter(students)), batch)
    singles = {}
    for name, sections in students.items():
        overrides = [f"run.dir={out / name}", f"distill.teacher={teacher}", "distill.students=[]"]
        Trainer(load_train_config(preset, [*overrides, *sections, *short])).run()
        singles[name] = seconds_per_step(out / name, batch)
    return together, singles


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/distill_experiment")
    p.add_argument("--teacher", default=None, help="an existing teacher run (default: pretrain one)")
    p.add_argument("--teacher-preset", type=Path, default=PRETRAIN, help="the teacher's pretraining preset")
    p.add_argument("--preset", type=Path, default=DISTILL, help="the distillation preset (its students)")
    p.add_argument(
        "--teacher-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override of the teacher's preset, repeatable (e.g. optim.epochs=40 schedules.lr.peak=1e-3)",
    )
    p.add_argument(
        "--distill-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override of the distillation preset, repeatable (e.g. schedules.teacher_temp={start: 0.07, ...})",
    )
    p.add_argument("--steps", type=int, default=300, help="student steps (distilled and from scratch)")
    p.add_argument("--seed", type=int, default=0, help="the students' train.seed (distilled and from scratch)")
    p.add_argument("--timing-steps", type=int, default=40, help="0: no timing of the shared teacher pass")
    args = p.parse_args()
    out = Path(args.out)
    steps = [f"train.steps={args.steps}", f"train.seed={args.seed}"]

    teacher = Path(args.teacher) if args.teacher else out / "teacher"
    if not (teacher / "teacher.safetensors").exists():
        overrides = [f"run.dir={teacher}", "log.progress=false", *args.teacher_set]
        Trainer(load_train_config(args.teacher_preset, overrides)).run()
    # each student's own sections (model, init, ...), as overrides
    students = {
        s["name"]: [f"{k}={json.dumps(v)}" for k, v in s.items() if k != "name"]
        for s in load_train_config(args.preset).distill.students
    }

    runs = {"teacher": teacher}
    distilled = out / "distilled"
    if not all((distilled / name / "teacher.safetensors").exists() for name in students):
        overrides = [f"run.dir={distilled}", f"distill.teacher={teacher}", *args.distill_set, *steps]
        cfg = load_train_config(args.preset, overrides)
        Trainer(cfg).run()
    for name, sections in students.items():
        runs[f"{name} distilled"] = distilled / name
        scratch = out / f"ssl-{name}"
        if not (scratch / "teacher.safetensors").exists():
            model = [o for o in sections if o.startswith("model=")]
            overrides = [f"run.dir={scratch}", *model, "log.progress=false", *steps]
            Trainer(load_train_config(PRETRAIN, overrides)).run()
        runs[f"{name} SSL from scratch"] = scratch

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
    if args.timing_steps:
        both, singles = time_shared_teacher(args.preset, teacher, students, out / "timing", args.timing_steps)
        results["timing"] = {"students_s_per_step": both, **{f"{k}_alone_s_per_step": v for k, v in singles.items()}}
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
    if args.timing_steps:
        separately = " + ".join(f"{v:.3f}" for v in singles.values())
        total = sum(singles.values())
        print(f"\ntime per step: the students in one run {both:.3f} s; separately {separately} = {total:.3f} s")


if __name__ == "__main__":
    main()
