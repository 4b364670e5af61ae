"""The text recipe through the real loop: dino.txt on a frozen backbone with its feature cache, CLIP /
SigLIP / the dense-aligned variant from scratch, resume after kill -9 and a partial cache with identical
metrics, 2 gloo ranks like 1 process, and the configuration's rules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from opendino.config import ConfigError
from opendino.models import build_model, save_model
from opendino.models.text import load_text_model
from opendino.train.config import load_train_config
from opendino.train.logging import read_metrics
from opendino.train.trainer import Trainer
from tests.conftest import REPO, torchrun_train, train_then_kill_9

STEPS = 8
TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2, "layerscale_init": 0.1, "pos_embed_rope_dtype": "fp32"}


def _preset(backbone: Path) -> dict:
    return {
        "data": {"source": "synthetic", "synthetic_n": 48, "synthetic_size": 32},
        "model": {"arch": "vit_small", "kwargs": TINY_VIT, "drop_path_rate": 0.0},
        "crops": {"global_size": 32, "global_scale": [0.5, 1.0]},
        "init": {"backbone": str(backbone)},
        "text": {"tower": "text_tiny", "context_length": 48, "cache_chunk": 16, "head_drop_path": 0.1},
        "optim": {"epochs": 2, "clip_grad": 0.0, "scaling_rule": "none", "adamw_beta2": 0.99},
        "train": {"recipe": "text", "batch_size": 8, "epoch_length": 4, "steps": STEPS},
        "checkpoint": {"every": 3, "keep": 2},
        "monitor": {"every": 4, "n_eval": 12, "dense": False},
        "log": {"every": 1, "progress": False, "tensorboard": False},
        "schedules": {
            "lr": {"start": 0.0, "peak": 2e-3, "end": 0.0, "warmup_epochs": 0.5},
            "weight_decay": {"start": 1e-4, "peak": 1e-4, "end": 1e-4},
        },
    }


@pytest.fixture(scope="module")
def preset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("text")
    torch.manual_seed(0)
    save_model(build_model("vit_small", **TINY_VIT), folder / "backbone.safetensors")
    path = folder / "text.yaml"
    path.write_text(yaml.safe_dump(_preset(folder / "backbone.safetensors")))
    return path


@pytest.fixture(scope="module")
def reference(preset, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("text-reference") / "run"
    Trainer(load_train_config(preset, [f"run.dir={run}"])).run()
    return run


def _values(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in read_metrics(run)]


def test_locked_alignment_trains_on_cached_features_and_exports_a_text_model(reference):
    records = read_metrics(reference)
    assert [r["step"] for r in records] == list(range(STEPS))
    assert {"contrastive", "temperature", "grad_norm_head", "grad_norm_text"} <= set(records[0])
    assert "grad_norm_backbone" not in records[0]  # locked: the backbone has no gradients
    assert records[-1]["contrastive"] < records[0]["contrastive"]
    assert {"zeroshot_top1", "retrieval_i2t_r1"} <= set(records[3])  # the training-time text metrics
    cache = sorted((reference / "feature_cache").glob("chunk_*.npy"))
    assert len(cache) == 3 and json.loads((reference / "feature_cache" / "meta.json").read_text())["images"] == 48
    model = load_text_model(reference)
    text = model.encode_text(["a large red circle", "a small blue square"])
    assert text.shape == (2, model.head.embed_dim) and torch.allclose(text.norm(dim=-1), torch.ones(2))
    frozen = torch.load(next((reference / "checkpoints").glob("*.pt")), weights_only=True)["model"]
    backbone = {k.removeprefix("model.backbone."): v for k, v in frozen.items() if k.startswith("model.backbone.")}
    start = load_model_state(Path(yaml.safe_load((reference / "config.yaml").read_text())["init"]["backbone"]))
    assert all(torch.equal(backbone[k], v) for k, v in start.items())  # locked means unchanged


def load_model_state(path: Path) -> dict:
    from opendino.models import load_model

    return load_model(path).state_dict()


def test_a_resume_after_kill_9_and_a_partial_cache_give_identical_metrics(preset, reference, tmp_path):
    run = tmp_path / "killed"
    # past the first checkpoint (step 2)
    assert train_then_kill_9(preset, run, [], 5) < STEPS, "the run finished before it could be killed"
    cache = run / "feature_cache"
    kept = {p.name: p.stat().st_mtime_ns for p in cache.glob("chunk_*.npy")}
    # a build killed mid-chunk: that chunk is absent and a temporary file is left behind
    (cache / "chunk_00001.npy").rename(cache / "chunk_00001.tmp.npy")
    Trainer(load_train_config(preset, [f"run.dir={run}"])).run()
    assert _values(run) == _values(reference)
    rebuilt = {p.name: p.stat().st_mtime_ns for p in cache.glob("chunk_*.npy")}
    assert rebuilt.keys() == kept.keys()
    assert all(rebuilt[n] == kept[n] for n in kept if n != "chunk_00001.npy")  # only the lost chunk recomputed


def test_a_cache_of_another_backbone_is_refused(preset, reference, tmp_path):
    run = tmp_path / "other"
    run.mkdir()
    (run / "feature_cache").mkdir()
    meta = json.loads((reference / "feature_cache" / "meta.json").read_text())
    (run / "feature_cache" / "meta.json").write_text(json.dumps({**meta, "backbone": "0" * 16}))
    from opendino.data.feature_cache import FeatureCacheError

    with pytest.raises(FeatureCacheError, match="another backbone"):
        Trainer(load_train_config(preset, [f"run.dir={run}"])).run()


@pytest.mark.parametrize(
    "overrides",
    [
        ["text.mode=unlocked", "init.backbone=null"],  # CLIP from scratch
        ["text.mode=unlocked", "init.backbone=null", "text.loss=siglip"],
        ["text.mode=unlocked", "text.dense_weight=1.0", "text.dense_teacher=${backbone}", "init.backbone=null"],
    ],
    ids=["clip", "siglip", "dense"],
)
def test_unlocked_modes_train_the_image_tower(preset, tmp_path, overrides):
    backbone = yaml.safe_load(preset.read_text())["init"]["backbone"]
    overrides = [o.replace("${backbone}", backbone) for o in overrides]
    run = tmp_path / "run"
    Trainer(load_train_config(preset, [f"run.dir={run}", "train.steps=3", "monitor.every=0", *overrides])).run()
    records = read_metrics(run)
    assert all(math.isfinite(r["loss"]) for r in records) and "grad_norm_backbone" in records[0]
    assert not (run / "feature_cache").exists()
    if "text.dense_weight=1.0" in overrides:
        assert records[0]["loss"] > records[0]["contrastive"] and records[0]["dense"] > 0
    model = load_text_model(run)
    if "text.loss=siglip" in overrides:
        assert model.logit_bias is not None and records[0]["temperature"] == pytest.approx(0.1, rel=1e-3)
    trained = model.backbone.state_dict()
    start = load_model_state(Path(backbone))
    assert any(not torch.equal(trained[k], v) for k, v in start.items())


def test_the_logit_scale_is_clamped_after_each_step(preset, tmp_path):
    run = tmp_path / "run"
    overrides = [f"run.dir={run}", "train.steps=2", "monitor.every=0", "text.logit_scale_init=6.0"]
    Trainer(load_train_config(preset, overrides)).run()
    records = read_metrics(run)
    assert records[0]["temperature"] == pytest.approx(math.exp(-6.0), rel=1e-4)  # before the first update
    assert records[1]["temperature"] == pytest.approx(0.01, rel=1e-4)  # clamped to ln 100
    assert load_text_model(run).logit_scale.item() <= math.log(100) + 1e-6


def test_two_ranks_train_like_one_process(preset, tmp_path, monkeypatch):
    single = tmp_path / "single"
    overrides = ["train.steps=4", "monitor.every=0", "text.head_drop_path=0.0"]
    Trainer(load_train_config(preset, [f"run.dir={single}", "train.batch_size=8", *overrides])).run()
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    run = tmp_path / "ddp"
    torchrun_train(preset, run, "train.batch_size=4", "parallel.data_parallel=ddp", *overrides)
    for a, b in zip(read_metrics(run), read_metrics(single), strict=True):
        for key in ("loss", "grad_norm_text", "grad_norm_head"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(b[key])), (a["step"], key, a[key], b[key])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["init.backbone=null"], "text.mode=locked aligns a text tower to a frozen image backbone"),
        (["text.dense_weight=1.0"], "needs text.mode=unlocked"),
        (["text.tower=text_huge"], "text.tower"),
        (["text.loss=infonce"], "text.loss"),
        (["parallel.data_parallel=fsdp"], "neither caches features nor evaluates during training"),
        (["text.embed_dim=33"], "must be even"),
        (["text.eval_data=/no/such/folder"], "not a labelled folder"),
    ],
)
def test_configuration_errors_are_clear(preset, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(preset, [f"run.dir={tmp_path / 'run'}", *overrides])
    assert not (tmp_path / "run").exists()
