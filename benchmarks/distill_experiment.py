"""Distillation against SSL from scratch at demo scale (CPU), and the cost of sharing the teacher.

1. the teacher: `--teacher-preset` (default `configs/demo/pretrain.yaml`, with `--teacher-set KEY=VALUE`
   overrides), or `--teacher RUN`; with `--heads-preset`, fresh heads are then fitted on its frozen backbone
   and that run is the distillation teacher;
2. for each of `--seeds`: the students of `--preset` (default `configs/distill/demo.yaml`: two) distilled
   from it in one run, and the same architectures pretrained by SSL from scratch
   (`configs/demo/pretrain.yaml`) for the same number of steps;
3. k-NN (5,000 / 2,000 held-out scenes: its seed-to-seed spread is the larger one) and segmentation
   (linear and nearest-neighbour, 1,000 / 500) of the teacher and every student, beside random init, and
   each student's k-NN difference to SSL from scratch with the same seed;
4. time per step: the multi-student run against the single-student runs (teacher forward shared or not).

    python benchmarks/distill_experiment.py --out runs/distill_experiment
    python benchmarks/distill_experiment.py --out runs/distill_blocks --seeds 0 1 2 \\
        --teacher-preset configs/demo/pretrain_long.yaml --heads-preset configs/demo/teacher_heads.yaml \\
        --preset configs/distill/demo_blocks.yaml
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from opendino import runs
from opendino.eval.data import synthetic_folder
from opendino.eval.suite import evaluate
from opendino.train.config import load_train_config
from opendino.train.logging import read_metrics
from opendino.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "configs" / "demo" / "pretrain.yaml"
DISTILL = REPO / "configs" / "distill" / "demo.yaml"
RESOLUTION = 128
KNN_SCENES = (5000, 2000)  # train, val


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


def evaluate_run(run: Path, knn_data: Path) -> dict[str, float]:
    """k-NN@20 on the large held-out set, segmentation on the default one; random init beside."""
    quiet = {"resolution": RESOLUTION, "progress": False, "log": lambda _: None}
    knn = evaluate(run, data=str(knn_data), tasks=("knn",), out=run / "eval-knn", **quiet)
    seg = evaluate(run, tasks=("seg",), **quiet)
    return {
        "knn_k20": knn["trained"]["knn"]["top1_k20"],
        "seg_miou": seg["trained"]["seg"]["miou"],
        "seg_nn_miou": seg["trained"]["seg"]["nn_miou"],
        "random_knn_k20": knn["random_init"]["knn"]["top1_k20"],
        "random_seg_miou": seg["random_init"]["seg"]["miou"],
        "random_seg_nn_miou": seg["random_init"]["seg"]["nn_miou"],
    }


def train_once(preset: Path, overrides: list[str]) -> None:
    """Trains unless the run folder already holds its exported model(s) (the experiment resumes)."""
    cfg = load_train_config(preset, overrides)
    names = [s["name"] for s in cfg.distill.students] or [""]
    if not all((Path(cfg.run.dir) / name / runs.EXPORT).exists() for name in names):
        Trainer(cfg).run()


def print_table(results: dict[str, list[dict[str, float]]], seeds: list[int]) -> None:
    """Markdown rows: each seed's value, their mean in bold, random init of the architecture in brackets."""
    print(f"\nseeds {seeds}: each seed's value, their mean in bold; random init of the architecture in brackets")
    print("| model | k-NN@20 | seg linear mIoU | seg NN mIoU |")
    print("|---|---|---|---|")
    for label, group in results.items():
        cells = []
        for key in ("knn_k20", "seg_miou", "seg_nn_miou"):
            values = [r[key] for r in group]
            each = " / ".join(f"{v:.3f}" for v in values)
            mean = f" **{statistics.mean(values):.3f}**" if len(values) > 1 else ""
            cells.append(f"{each}{mean} ({group[0]['random_' + key]:.3f})")
        print(f"| {label} | " + " | ".join(cells) + " |")


def print_paired_knn(results: dict[str, list[dict[str, float]]], names: list[str]) -> None:
    """Per student, the k-NN of the distilled run minus that of SSL from scratch with the same seed: the
    seed-to-seed spread of each alone is larger than the difference."""
    for name in names:
        diffs = [
            d["knn_k20"] - s["knn_k20"]
            for d, s in zip(results[f"{name} distilled"], results[f"{name} SSL from scratch"], strict=True)
        ]
        spread = f", s.d. {statistics.stdev(diffs):.3f}" if len(diffs) > 1 else ""
        print(
            f"{name}: k-NN distilled - SSL per seed {' / '.join(f'{d:+.3f}' for d in diffs)}; "
            f"mean {statistics.mean(diffs):+.3f}{spread}; ahead on {sum(d > 0 for d in diffs)} of {len(diffs)}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/distill_experiment")
    p.add_argument("--teacher", default=None, help="an existing teacher run (default: pretrain one)")
    p.add_argument("--teacher-preset", type=Path, default=PRETRAIN, help="the teacher's pretraining preset")
    p.add_argument(
        "--teacher-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override of the teacher's preset, repeatable (e.g. optim.epochs=40 schedules.lr.peak=1e-3)",
    )
    p.add_argument("--heads-preset", type=Path, default=None, help="fit fresh heads on the frozen teacher first")
    p.add_argument("--preset", type=Path, default=DISTILL, help="the distillation preset (its students)")
    p.add_argument(
        "--distill-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override of the distillation preset, repeatable (e.g. schedules.teacher_temp={start: 0.07, ...})",
    )
    p.add_argument("--steps", type=int, default=300, help="student steps (distilled and from scratch)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="the students' train.seed values")
    p.add_argument("--timing-steps", type=int, default=40, help="0: no timing of the shared teacher pass")
    args = p.parse_args()
    out = Path(args.out)

    teacher = Path(args.teacher) if args.teacher else out / "teacher"
    if not args.teacher:
        train_once(args.teacher_preset, [f"run.dir={teacher}", "log.progress=false", *args.teacher_set])
    runs = {"teacher": [teacher]}
    if args.heads_preset:
        heads = out / "teacher-heads"
        train_once(args.heads_preset, [f"run.dir={heads}", f"init.backbone={teacher}", "log.progress=false"])
        teacher = heads
    # each student's own sections (model, init, ...), as overrides
    students = {
        s["name"]: [f"{k}={json.dumps(v)}" for k, v in s.items() if k != "name"]
        for s in load_train_config(args.preset).distill.students
    }
    for seed in args.seeds:
        steps = [f"train.steps={args.steps}", f"train.seed={seed}", "log.progress=false"]
        distilled = out / f"seed{seed}" / "distilled"
        train_once(args.preset, [f"run.dir={distilled}", f"distill.teacher={teacher}", *args.distill_set, *steps])
        for name, sections in students.items():
            runs.setdefault(f"{name} distilled", []).append(distilled / name)
            scratch = out / f"seed{seed}" / f"ssl-{name}"
            train_once(PRETRAIN, [f"run.dir={scratch}", *[o for o in sections if o.startswith("model=")], *steps])
            runs.setdefault(f"{name} SSL from scratch", []).append(scratch)

    knn_data = synthetic_folder(out / "eval-data", *KNN_SCENES, RESOLUTION)
    results = {label: [evaluate_run(run, knn_data) for run in group] for label, group in runs.items()}
    if args.timing_steps:
        both, singles = time_shared_teacher(args.preset, teacher, students, out / "timing", args.timing_steps)
        results["timing"] = {"students_s_per_step": both, **{f"{k}_alone_s_per_step": v for k, v in singles.items()}}
    (out / "results.json").write_text(json.dumps(results, indent=2))

    print_table({label: results[label] for label in runs}, args.seeds)
    print_paired_knn(results, list(students))
    if args.timing_steps:
        separately = " + ".join(f"{v:.3f}" for v in singles.values())
        total = sum(singles.values())
        print(f"\ntime per step: the students in one run {both:.3f} s; separately {separately} = {total:.3f} s")


if __name__ == "__main__":
    main()
