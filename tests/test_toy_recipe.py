"""The recipe contract is enough: a recipe the trainer has never heard of (tests/toy_recipe.py) trains,
exports, resumes after kill -9 with identical metrics and trains on 2 gloo ranks like 1 process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from opendino import runs
from opendino.models import load_model
from opendino.train.config import load_train_config
from opendino.train.logging import read_metrics
from opendino.train.trainer import Trainer
from tests.conftest import REPO, torchrun_train, train_then_kill_9

B, STEPS = 4, 8
TOY = {
    "data": {"source": "synthetic", "synthetic_n": 64, "synthetic_size": 48},
    "model": {"arch": "vit_small", "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2, "layerscale_init": 0.1}},
    "crops": {"global_size": 32, "local_size": 16, "n_local": 1},
    "optim": {"epochs": 2},
    "train": {"recipe": "tests.toy_recipe:ToyRecipe", "batch_size": B, "epoch_length": 5, "steps": STEPS},
    "checkpoint": {"every": 3, "keep": 2},
    "log": {"every": 1, "progress": False, "tensorboard": False},
    "schedules": {
        "lr": {"start": 0.0, "peak": 2e-3, "end": 1e-4, "warmup_epochs": 0.4},
        "weight_decay": {"start": 0.04, "peak": 0.04, "end": 0.1},
    },
}


@pytest.fixture(scope="module")
def preset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("toy") / "toy.yaml"
    path.write_text(yaml.safe_dump(TOY))
    return path


@pytest.fixture(scope="module")
def reference(preset, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("toy-reference") / "run"
    Trainer(load_train_config(preset, [f"run.dir={run}"])).run()
    return run


def _values(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in read_metrics(run)]


def test_the_toy_recipe_trains_logs_its_terms_and_exports_its_ema(reference):
    records = read_metrics(reference)
    assert [r["step"] for r in records] == list(range(STEPS))
    assert {"loss", "cross_entropy", "accuracy", "grad_norm_student", "lr", "weight_decay"} <= set(records[0])
    assert "teacher_temp" not in records[0]  # the loop logs only what the recipe reports
    assert records[-1]["cross_entropy"] < records[0]["cross_entropy"]
    state = torch.load(reference / "checkpoints" / "step_00000007.pt", weights_only=True)
    assert state["export_prefix"] == "ema."
    exported = load_model(reference / "teacher.safetensors").state_dict()
    assert all(torch.equal(v, state["model"][f"ema.{k}"]) for k, v in exported.items())
    assert not torch.equal(exported["cls_token"], state["model"]["student.backbone.cls_token"])  # an EMA
    # the run folder as an initialisation or a Gram teacher gives the model it exported
    from_run = runs.load_backbone(str(reference)).state_dict()
    assert all(torch.equal(from_run[k], v) for k, v in exported.items())


def test_the_toy_recipe_resumes_after_kill_9_with_identical_metrics(preset, reference, tmp_path):
    run = tmp_path / "killed"
    # past the first checkpoint (step 2)
    assert train_then_kill_9(preset, run, [], 4) < STEPS, "the run finished before it could be killed"
    Trainer(load_train_config(preset, [f"run.dir={run}"])).run()
    assert _values(run) == _values(reference)


def test_the_toy_recipe_trains_on_two_ranks_like_one_process(preset, tmp_path, monkeypatch):
    single = tmp_path / "single"
    Trainer(load_train_config(preset, [f"run.dir={single}", f"train.batch_size={2 * B}"])).run()
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    run = tmp_path / "ddp"
    torchrun_train(preset, run, "parallel.data_parallel=ddp")
    for a, b in zip(read_metrics(run), read_metrics(single), strict=True):
        for key in ("loss", "cross_entropy", "grad_norm_student"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(b[key])), (a["step"], key, a[key], b[key])
    ta, tb = (load_model(r / "teacher.safetensors").state_dict() for r in (run, single))
    assert max((ta[k] - tb[k]).abs().max().item() for k in ta) < 1e-5
