"""Short runs whose metrics were recorded before the recipe contract (issue 20) and must not change.

``python -m tests.recorded_runs`` (from the repository root) runs them and rewrites
``tests/data/recorded_metrics.json``; ``tests/test_recorded.py`` runs them again and compares every
logged value and the exported weights to 1e-6. Each run is small enough for a 2-core CPU: the demo
preset for 20 steps, a Gram stage continuing it (with two Gram-teacher refreshes and the dense monitor),
a two-student distillation from it, and 2-rank DDP and FSDP2 runs of a tiny ViT.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from opendino.cli import main
from opendino.train.logging import read_metrics
from tests.conftest import REPO, torchrun_train
from tests.test_distributed import TINY  # a ViT 32 x 2, 5 steps of 4 images per rank

RECORDED = REPO / "tests" / "data" / "recorded_metrics.json"
QUIET = ("log.every=1", "log.progress=false", "log.tensorboard=false")
TIMING_KEYS = {"images_per_s"}


def _summary(run: Path) -> dict:
    """Every logged value but timings, and a checksum of each exported tensor."""
    records = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(run)]
    weights = load_file(run / "teacher.safetensors")
    return {"metrics": records, "export": {k: v.double().sum().item() for k, v in sorted(weights.items())}}


def record_runs(work: Path) -> dict[str, dict]:
    """Runs every recorded scenario in ``work``; returns its summary by name."""
    demo, gram, distill = work / "demo", work / "gram", work / "distill"
    out = {}
    assert main(["train", str(REPO / "configs/demo/pretrain.yaml"), f"run.dir={demo}", "train.steps=20", *QUIET]) == 0
    out["demo"] = _summary(demo)
    gram_args = [f"run.dir={gram}", f"init.from_run={demo}", "train.steps=26", *QUIET]
    gram_args += ["gram.refresh_from=22", "gram.refresh_every=2", "gram.max_refreshes=2"]
    gram_args += ["schedules.gram_loss_weight.warmup_epochs=0.5", "schedules.dino_local_loss_weight.warmup_epochs=0.5"]
    gram_args += ["monitor.every=3", "monitor.n_fit=16", "monitor.n_eval=8"]
    assert main(["train", str(REPO / "configs/demo/gram.yaml"), *gram_args]) == 0
    out["gram"] = _summary(gram)
    distill_args = [f"run.dir={distill}", f"distill.teacher={demo}", "train.steps=6", *QUIET]
    assert main(["train", str(REPO / "configs/distill/demo.yaml"), *distill_args]) == 0
    for student in ("vit-tiny", "vit-mini"):
        out[f"distill/{student}"] = _summary(distill / student)
    preset = work / "tiny.yaml"
    preset.write_text(yaml.safe_dump(TINY))
    for mode in ("ddp", "fsdp"):
        torchrun_train(preset, work / mode, f"parallel.data_parallel={mode}", *QUIET)
        out[mode] = _summary(work / mode)
    return out


if __name__ == "__main__":
    import tempfile

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        runs = record_runs(Path(tmp))
    RECORDED.write_text(json.dumps(runs, indent=1, sort_keys=True) + "\n")
    print(f"wrote {RECORDED}: {', '.join(runs)}", file=sys.stderr)
