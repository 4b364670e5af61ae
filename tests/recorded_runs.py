"""Short runs whose metrics were recorded before the recipe contract (issue 20) and must not change.

``python -m tests.recorded_runs`` (from the repository root) runs them all and rewrites
``tests/data/recorded_metrics.json``; it was run on the code before the change (commit 3b2fc82, in a
worktree). ``tests/test_recorded.py`` runs the single-process ones again, and the 2-rank parity tests of
``tests/test_distributed.py`` compare their runs too: every logged value and the exported weights agree
to 1e-6. The runs: the demo preset for 20 steps; a Gram stage continuing it for 4 steps (two Gram-teacher
refreshes, the dense monitor twice); a two-student distillation from it (4 steps); 2-rank DDP and FSDP2
runs of a tiny ViT, exactly as the parity tests start them.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from opendino.cli import main
from opendino.train.logging import read_metrics
from tests.conftest import REPO, torchrun_train

RECORDED = REPO / "tests" / "data" / "recorded_metrics.json"
QUIET = ("log.every=1", "log.progress=false", "log.tensorboard=false")
TIMING_KEYS = {"images_per_s"}
# Logged since the recording (the monitor's degradation diagnostics, the lr ramp); every recorded key and
# value must still be there, and these are the only new ones allowed.
ADDED_KEYS = {
    "monitor_patch_rank",
    "monitor_patch_sim_mean",
    "monitor_patch_sim_std",
    "monitor_cls_attn_entropy",
    "lr_ramp",  # only with init.head_warmup_steps or init.backbone_ramp_steps
}
# the overrides of tests/test_distributed.py's parity test, for its preset (tests.test_distributed.TINY)
RANK_OVERRIDES = {mode: (f"parallel.data_parallel={mode}", "parallel.param_dtype=fp32") for mode in ("ddp", "fsdp")}


def summary(run: Path) -> dict:
    """Every logged value but timings, and a checksum of each exported tensor."""
    records = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(run)]
    weights = load_file(run / "teacher.safetensors")
    return {"metrics": records, "export": {k: v.double().sum().item() for k, v in sorted(weights.items())}}


def single_process_runs(work: Path) -> dict[str, dict]:
    """Runs the single-process scenarios in ``work``; returns their summaries by name."""
    demo, gram, distill = work / "demo", work / "gram", work / "distill"
    out = {}
    assert main(["train", str(REPO / "configs/demo/pretrain.yaml"), f"run.dir={demo}", "train.steps=20", *QUIET]) == 0
    out["demo"] = summary(demo)
    gram_args = [f"run.dir={gram}", f"init.from_run={demo}", "train.steps=24", *QUIET]
    gram_args += ["gram.refresh_from=21", "gram.refresh_every=2", "gram.max_refreshes=2"]
    gram_args += ["schedules.gram_loss_weight.warmup_epochs=0.5", "schedules.dino_local_loss_weight.warmup_epochs=0.5"]
    gram_args += ["monitor.every=2", "monitor.n_fit=16", "monitor.n_eval=8"]
    assert main(["train", str(REPO / "configs/demo/gram.yaml"), *gram_args]) == 0
    out["gram"] = summary(gram)
    distill_args = [f"run.dir={distill}", f"distill.teacher={demo}", "train.steps=4", *QUIET]
    assert main(["train", str(REPO / "configs/distill/demo.yaml"), *distill_args]) == 0
    for student in ("vit-tiny", "vit-mini"):
        out[f"distill/{student}"] = summary(distill / student)
    return out


# Float32 reductions round differently on other CPUs (AVX2 and AVX-512 kernels): the recorded values hold
# to a few 1e-6 on another machine (seen: 2.4e-6), exactly on the one that recorded them.
TOLERANCE = 1e-5


def _close(a, b, tolerance: float = TOLERANCE) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tolerance * max(1.0, abs(a), abs(b))
    return a == b


def assert_reproduces(name: str, new: dict) -> None:
    """``new`` (a :func:`summary`) has the recorded run's keys and values, to ``TOLERANCE``."""
    old = json.loads(RECORDED.read_text())[name]
    assert [sorted(set(r) - ADDED_KEYS) for r in new["metrics"]] == [sorted(r) for r in old["metrics"]], name
    for old_row, new_row in zip(old["metrics"], new["metrics"], strict=True):
        differ = {k: (v, new_row[k]) for k, v in old_row.items() if not _close(v, new_row[k])}
        assert not differ, f"{name} step {old_row['step']}: {differ}"
    assert sorted(new["export"]) == sorted(old["export"]), name
    differ = {k: (v, new["export"][k]) for k, v in old["export"].items() if not _close(v, new["export"][k])}
    assert not differ, f"{name} export: {differ}"


if __name__ == "__main__":
    import tempfile

    from tests.test_distributed import TINY

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        runs = single_process_runs(Path(tmp))
        preset = Path(tmp) / "tiny.yaml"
        preset.write_text(yaml.safe_dump(TINY))
        for mode, overrides in RANK_OVERRIDES.items():
            torchrun_train(preset, Path(tmp) / mode, *overrides)
            runs[mode] = summary(Path(tmp) / mode)
    RECORDED.write_text(json.dumps(runs, indent=1, sort_keys=True) + "\n")
    print(f"wrote {RECORDED}: {', '.join(runs)}", file=sys.stderr)
