"""The SSL recipe and trainer: a run, its outputs, exact resume after kill -9, NaN handling, init."""

from __future__ import annotations

import copy
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from opendino.cli import main
from opendino.data.augment import CropConfig
from opendino.data.loader import build_ssl_loader
from opendino.data.sources import open_source
from opendino.models import build_model, load_model, save_model
from opendino.recipes.base import lerp_by_tensor_
from opendino.recipes.ssl import SSLRecipe
from opendino.train.config import load_train_config
from opendino.train.logging import read_metrics
from opendino.train.optim import apply_schedules, build_optimizer
from opendino.train.step import train_step
from opendino.train.trainer import Trainer, TrainingDiverged
from tests.conftest import REPO, train_then_kill_9

TINY = {
    "data": {"source": "synthetic", "synthetic_n": 64, "synthetic_size": 48},
    "model": {"arch": "vit_small", "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}, "drop_path_rate": 0.1},
    "dino_head": {"prototypes": 64, "hidden_dim": 32, "bottleneck_dim": 16},
    "ibot_head": {"prototypes": 48, "hidden_dim": 32, "bottleneck_dim": 16},
    "crops": {"global_size": 32, "local_size": 16, "n_local": 2},
    "optim": {"epochs": 2, "layerwise_decay": 0.9},
    "train": {"batch_size": 4, "epoch_length": 6},
    "checkpoint": {"every": 4, "keep": 2},
    "log": {"every": 1, "progress": False, "tensorboard": False},
    "schedules": {
        "lr": {"start": 0.0, "peak": 2e-3, "end": 1e-4, "warmup_epochs": 1, "freeze_last_layer_epochs": 1},
        "weight_decay": {"start": 0.04, "peak": 0.04, "end": 0.1},
        "teacher_temp": {"start": 0.04, "peak": 0.07, "end": 0.07, "warmup_epochs": 1},
        "momentum": {"start": 0.9, "peak": 0.9, "end": 1.0},
    },
}
TIMING_KEYS = {"images_per_s"}


@pytest.fixture()
def preset(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def _values(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def test_a_run_writes_metrics_checkpoints_config_and_teacher(preset, tmp_path):
    run = tmp_path / "run"
    assert main(["train", str(preset), f"run.dir={run}", "log.tensorboard=true"]) == 0
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(12))
    for key in (
        "loss",
        "dino_local",
        "dino_global",
        "koleo",
        "ibot",
        "lr",
        "teacher_temp",
        "momentum",
        "images_per_s",
        "skipped_images",
    ):
        assert key in records[0]
    assert records[0]["lr"] == 0.0 and records[-1]["momentum"] > records[0]["momentum"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000007.pt", "step_00000011.pt"]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["batch_size"] == 4
    assert any((run / "tb").iterdir())
    teacher = load_model(run / "teacher.safetensors")
    assert teacher.embed_dim == 32
    assert teacher.drop_path_rate == 0.0  # the student's 0.1 is not the teacher's (no stochastic depth)
    # readable like the other files of the run (safetensors alone writes 0600)
    assert (run / "teacher.safetensors").stat().st_mode & 0o777 == (run / "config.yaml").stat().st_mode & 0o777


def test_the_demo_preset_trains_on_a_folder_and_names_each_unreadable_image_once(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        pixels = np.random.default_rng(i).integers(0, 256, (48, 56, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    bad = [folder / "empty.jpg", folder / "text.png"]
    bad[0].write_bytes(b"")
    bad[1].write_text("not an image")
    run = tmp_path / "run"
    preset = REPO / "configs" / "demo" / "pretrain.yaml"
    small = ["train.batch_size=4", "train.steps=3", "log.every=1", "log.progress=false", "log.tensorboard=false"]
    assert main(["train", str(preset), f"run.dir={run}", f"data.path={folder}", *small]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["path"] == str(folder)
    # 12 draws cover the 8 files (an epoch visits each once): both bad ones were met, each named once
    assert sorted((run / "skipped_images.txt").read_text().splitlines()) == sorted(map(str, bad))
    err = capsys.readouterr().err
    assert all(err.count(f"skipped unreadable image: {p} ") == 1 for p in bad)
    assert read_metrics(run)[-1]["skipped_images"] >= 2


@pytest.mark.parametrize("stage", ["pretrain", "gram", "hires"])
def test_the_stage_presets_crop_as_the_official_7b_stages(stage):
    """docs/design/recipe.md §4.2-4.4: global 256 / local 112 crops without flips, Gram crops 512, the stage-3
    size table."""
    cfg = load_train_config(REPO / "configs" / "stages" / f"{stage}.yaml")
    assert cfg.crops.horizontal_flips is False
    if stage == "hires":
        assert [row[:3] for row in cfg.crops.resolution_sets][:2] == [[512, 112, 768], [768, 112, 1152]]
    else:
        assert (cfg.crops.global_size, cfg.crops.local_size) == (256, 112)
        assert cfg.crops.global_size * cfg.gram.crop_scale == 512


def test_steps_past_the_end_of_the_schedules_are_a_warning(preset, tmp_path, capsys):
    args = ["train", str(preset), f"run.dir={tmp_path / 'run'}", "optim.epochs=1", "train.epoch_length=2"]
    assert main([*args, "train.steps=4"]) == 0
    out = capsys.readouterr().out
    assert "runs past the end of the schedules (optim.epochs=1 x train.epoch_length=2 = 2 steps)" in out
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run")]
    assert lrs[1] == lrs[2] == lrs[3] != lrs[0]  # held at the schedule's last value


def test_a_resume_names_changed_settings_and_a_finished_run_says_nothing_ran(preset, tmp_path, capsys):
    run = [str(preset), f"run.dir={tmp_path / 'run'}", "checkpoint.every=1"]
    assert main(["train", *run, "train.steps=2"]) == 0
    assert main(["train", *run, "train.steps=2"]) == 0
    assert "nothing to run" in capsys.readouterr().out
    assert main(["train", *run, "train.steps=3", "train.seed=7"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "train.seed: 0 -> 7" in out and "train.steps" not in out.split("warning")[1]
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [0, 1, 2]


def test_kill_9_then_resume_gives_the_uninterrupted_metrics(preset, tmp_path):
    reference = tmp_path / "reference"
    Trainer(load_train_config(preset, [f"run.dir={reference}"])).run()
    run = tmp_path / "killed"
    # past the first checkpoint (step 3)
    assert train_then_kill_9(preset, run, [], 7) < 12, "the run finished before it could be killed"
    Trainer(load_train_config(preset, [f"run.dir={run}"])).run()  # resumes from the last checkpoint
    assert _values(read_metrics(run)) == _values(read_metrics(reference))
    a = load_model(run / "teacher.safetensors").state_dict()
    b = load_model(reference / "teacher.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_losses_are_skipped_then_stop_the_run(preset, tmp_path, monkeypatch):
    original = SSLRecipe.forward
    calls = {"n": 0}

    def sometimes_nan(self, batch, *args, **kwargs):
        loss, terms = original(self, batch, *args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan"), terms) if calls["n"] in (3, 6, 7, 8) else (loss, terms)

    monkeypatch.setattr(SSLRecipe, "forward", sometimes_nan)
    run = tmp_path / "nan"
    cfg = load_train_config(preset, [f"run.dir={run}", "train.max_bad_steps=3"])
    with pytest.raises(TrainingDiverged, match="3 consecutive non-finite losses.*step_00000003.pt, is intact"):
        Trainer(cfg).run()
    records = read_metrics(run)
    skipped = [r["step"] for r in records if r.get("skipped_step")]
    assert skipped == [2, 5, 6, 7]
    # The checkpoint of step 3 was written from good weights and still loads.
    state = torch.load(run / "checkpoints" / "step_00000003.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_the_sync_free_ema_update_equals_lerp_and_is_switched_off_by_its_flag():
    # The accelerator path of the EMA (a device flag that is never read on the host), run on CPU tensors.
    teacher, student = [torch.randn(5, 3), torch.randn(7)], [torch.randn(5, 3), torch.randn(7)]
    expected = [t.lerp(s, 0.01) for t, s in zip(teacher, student, strict=True)]
    before = [t.clone() for t in teacher]
    lerp_by_tensor_(teacher, student, torch.tensor(False).float() * 0.01)
    assert all(torch.equal(t, b) for t, b in zip(teacher, before, strict=True))
    lerp_by_tensor_(teacher, student, torch.tensor(True).float() * 0.01)
    assert all(torch.allclose(t, e, atol=1e-7) for t, e in zip(teacher, expected, strict=True))


def test_a_non_finite_step_changes_no_weight_and_no_optimizer_state(preset):
    cfg = load_train_config(preset, [])
    recipe = SSLRecipe(cfg).train()
    optimizer = build_optimizer(recipe.param_groups())
    apply_schedules(optimizer, 1e-3, 0.04, 1e-3)
    recipe.before_step(0)
    batch = next(
        iter(build_ssl_loader(open_source(source="synthetic", n=8, size=48), [CropConfig(32, 16, 2)], batch_size=4))
    )
    kwargs = {"clip_grad": 3.0}
    assert train_step(recipe, optimizer, batch, **kwargs).finite  # a good step first, so moments exist
    before = copy.deepcopy((recipe.state_dict(), optimizer.state_dict()["state"]))
    batch["global"][0, 0, 0, 0] = float("nan")
    result = train_step(recipe, optimizer, batch, **kwargs)
    assert not result.finite
    after = (recipe.state_dict(), optimizer.state_dict()["state"])
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    for i, state in before[1].items():
        assert all(torch.equal(state[k], after[1][i][k]) for k in state)
    batch["global"][0, 0, 0, 0] = 0.0
    assert train_step(recipe, optimizer, batch, **kwargs).finite
    assert not torch.equal(before[0]["student.backbone.cls_token"], recipe.state_dict()["student.backbone.cls_token"])


def test_continue_pretraining_from_a_backbone_with_frozen_warmup(preset, tmp_path):
    backbone = build_model("vit_small", embed_dim=32, depth=2, num_heads=2)
    save_model(backbone, tmp_path / "init.safetensors")
    run = tmp_path / "continued"
    cfg = load_train_config(
        preset,
        [
            f"run.dir={run}",
            f"init.backbone={tmp_path / 'init.safetensors'}",
            "init.head_warmup_steps=2",
            "train.steps=2",
        ],
    )
    Trainer(cfg).run()
    teacher = load_model(run / "teacher.safetensors").state_dict()
    assert all(torch.equal(teacher[k], v) for k, v in backbone.state_dict().items())


def test_a_shallower_student_starts_from_chosen_blocks_of_a_backbone(preset, tmp_path):
    backbone = build_model("vit_small", embed_dim=32, depth=3, num_heads=2)
    save_model(backbone, tmp_path / "deep.safetensors")
    overrides = [f"init.backbone={tmp_path / 'deep.safetensors'}", "init.head_warmup_steps=2", "train.steps=2"]
    cfg = load_train_config(preset, [f"run.dir={tmp_path / 'shallow'}", "init.backbone_blocks=[2,0]", *overrides])
    Trainer(cfg).run()
    source, taken = backbone.state_dict(), load_model(tmp_path / "shallow" / "teacher.safetensors").state_dict()
    for key, value in taken.items():
        origin = key.replace("blocks.0.", "blocks.2.").replace("blocks.1.", "blocks.0.")
        assert torch.equal(value, source[origin]), key
    cfg = load_train_config(preset, [f"run.dir={tmp_path / 'bad'}", "init.backbone_blocks=[0,3]", *overrides])
    with pytest.raises(ValueError, match="has blocks 0..2"):
        Trainer(cfg).run()


def test_crops_cut_on_the_device_train_like_crops_cut_in_workers(preset, tmp_path):
    on_device = ["data.photometric_on_device=true", "train.steps=3"]
    Trainer(load_train_config(preset, [f"run.dir={tmp_path / 'workers'}", *on_device])).run()
    cut_there = ["data.crops_on_device=true", *on_device]
    Trainer(load_train_config(preset, [f"run.dir={tmp_path / 'device'}", *cut_there])).run()
    workers, device = read_metrics(tmp_path / "workers"), read_metrics(tmp_path / "device")
    assert len(device) == 3
    for a, b in zip(workers, device, strict=True):  # the same crops, to within one grey level
        # (not KoLeo: the log of nearest-neighbour distances between near-identical features at init
        # magnifies rounding; it moves by ~0.2 here)
        for key in ("dino_local", "dino_global", "ibot"):
            assert b[key] == pytest.approx(a[key], abs=2e-3), key


def test_jpegs_decoded_on_the_device_train_exactly_like_jpegs_decoded_in_workers(preset, tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "photos").mkdir()
    for i in range(8):
        coarse = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((56, 48), Image.BICUBIC).save(tmp_path / "photos" / f"{i}.jpg", quality=90)
    common = [f"data.path={tmp_path / 'photos'}", "data.source=folder", "data.photometric_on_device=true"]
    common += ["data.crops_on_device=true"]
    common += ["train.steps=3"]
    Trainer(load_train_config(preset, [f"run.dir={tmp_path / 'workers'}", *common])).run()
    there = [*common, "data.decode_on_device=true"]
    Trainer(load_train_config(preset, [f"run.dir={tmp_path / 'device'}", *there])).run()
    workers, device = read_metrics(tmp_path / "workers"), read_metrics(tmp_path / "device")
    assert len(device) == 3 and _values(device) == _values(workers)  # the same decoder on the CPU: the same run


def test_loss_falls_on_the_synthetic_world(preset, tmp_path):
    run = tmp_path / "falls"
    Trainer(load_train_config(preset, [f"run.dir={run}", "train.steps=24", "optim.epochs=4"])).run()
    losses = [r["loss"] for r in read_metrics(run)]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.1


def test_the_losses_compute_in_float32_under_bf16_autocast():
    """docs/design/recipe.md §2: the official losses run in float32; under autocast a matrix product inside one (the
    DINO einsum, KoLeo's neighbours, the Gram matrices) would otherwise be a bf16 product."""
    from opendino.losses import dino_loss, koleo_loss, sinkhorn_knopp
    from opendino.losses.gram import gram_loss

    g = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(8, 32, 4096, generator=g), torch.randn(2, 32, 4096, generator=g).softmax(-1)
    cls, student, grams = torch.randn(32, 384, generator=g), torch.randn(4, 50, 64, generator=g), torch.randn(4, 50, 64)
    losses = {
        "dino": lambda: dino_loss(logits, teacher, ignore_diagonal=True),
        "koleo": lambda: koleo_loss(cls),
        "gram": lambda: gram_loss(student, grams),
        "sinkhorn": lambda: sinkhorn_knopp(logits[0], 0.07),
    }
    for name, loss in losses.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = loss()
        assert under_autocast.dtype == torch.float32, name
        torch.testing.assert_close(under_autocast, loss(), rtol=1e-6, atol=1e-7, msg=name)


def test_clip_grad_zero_turns_clipping_off(preset):
    recipe = SSLRecipe(load_train_config(preset))
    for p in recipe.student.parameters():
        p.grad = torch.full_like(p, 10.0)
    norms = recipe.clip_gradients(0.0)
    assert all((p.grad == 10.0).all() for p in recipe.student.parameters()) and norms["backbone"] > 1
    norms = recipe.clip_gradients(1.0)
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in recipe.student.backbone.parameters()]))
    assert clipped == pytest.approx(1.0, rel=1e-4)


def test_sinkhorn_stays_finite_for_large_logits():
    from opendino.losses import sinkhorn_knopp

    logits = torch.randn(16, 32, generator=torch.Generator().manual_seed(0)) * 1.5
    assert torch.isinf(torch.exp(logits / 0.04)).any()  # without the shift, exp() overflows float32
    probs = sinkhorn_knopp(logits, 0.04)
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(16), atol=1e-4)


def test_sinkhorn_with_zero_iterations_is_the_uncentred_softmax():
    from opendino.losses import sinkhorn_knopp

    logits = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.07, n_iterations=0), torch.softmax(logits / 0.07, -1))
    centred = sinkhorn_knopp(logits, 0.07)  # three iterations: prototypes used almost equally
    assert centred.sum(0).std() < 0.5 * torch.softmax(logits / 0.07, -1).sum(0).std()


def test_a_run_shorter_than_its_warmup_ends_inside_it():
    from opendino.schedules import linear_warmup_cosine_decay

    array = linear_warmup_cosine_decay(0.0, 1.0, 0.1, warmup_iterations=10, total_iterations=4)
    assert array.tolist() == [0.0, 0.1, 0.2, 0.30000000000000004]


@pytest.mark.slow
def test_compiled_blocks_train_like_eager(preset, tmp_path):
    # LayerScale 0.1: with the official 1e-5 all CLS tokens start nearly equal, and KoLeo's -log(distance)
    # turns the float rounding of compiled kernels into a 1e-3 difference (its gradient norm is ~4e4).
    kwargs = "model.kwargs={embed_dim: 32, depth: 2, num_heads: 2, layerscale_init: 0.1}"
    runs = {}
    for compiled in (False, True):
        run = tmp_path / f"compiled_{compiled}"
        overrides = [f"run.dir={run}", "train.steps=3", f"train.compile={compiled}", kwargs]
        Trainer(load_train_config(preset, overrides)).run()
        runs[compiled] = read_metrics(run)
    for eager, compiled in zip(runs[False], runs[True], strict=True):
        for key in ("loss", "dino_local", "dino_global", "koleo", "ibot", "grad_norm_backbone"):
            assert compiled[key] == pytest.approx(eager[key], rel=1e-4), (eager["step"], key)


def test_gram_refresh_rule():
    from opendino.recipes.gram import GramConfig

    steps = [s for s in range(40) if GramConfig(refresh_from=10, refresh_every=10, max_refreshes=3).refreshes_at(s)]
    assert steps == [10, 20, 30]
    assert [s for s in range(40) if GramConfig(refresh_from=5).refreshes_at(s)] == [5]
    assert not any(GramConfig().refreshes_at(s) for s in range(40))


def test_gram_anchoring_run_logs_the_term_and_refreshes_its_teacher(preset, tmp_path):
    run = tmp_path / "gram"
    overrides = [f"run.dir={run}", "gram.enabled=true", "gram.refresh_from=5", "gram.loss_weight=2.0"]
    cfg = load_train_config(preset, overrides)
    Trainer(cfg).run()
    records = read_metrics(run)
    # Never zero: the student sees masked crops with drop path, the Gram teacher 2x crops resized bicubically.
    assert all(r["gram_weight"] == 2.0 and 0 < r["gram"] < 4 for r in records)
    before = torch.load(run / "checkpoints" / "step_00000007.pt", weights_only=True)["model"]
    gram = {k[len("gram_teacher.") :]: v for k, v in before.items() if k.startswith("gram_teacher.")}
    initial = SSLRecipe(cfg).state_dict()
    assert not torch.equal(gram["cls_token"], initial["gram_teacher.cls_token"])  # refreshed at step 5
    assert not torch.equal(gram["cls_token"], before["teacher.backbone.cls_token"])  # and frozen since


def test_three_stage_chain_pretrain_gram_hires(preset, tmp_path):
    """Stage 2 continues stage 1 (models, optimizer, step) with a Gram teacher taken from its EMA teacher;
    stage 3 starts fresh from stage 2's teacher with mixed resolutions and a fixed Gram teacher."""
    s1, s2, s3 = tmp_path / "s1", tmp_path / "s2", tmp_path / "s3"
    Trainer(load_train_config(preset, [f"run.dir={s1}", "train.steps=8"])).run()
    stage2 = [f"run.dir={s2}", f"init.from_run={s1}", "gram.enabled=true", "train.steps=12"]
    Trainer(load_train_config(preset, stage2)).run()
    steps = [r["step"] for r in read_metrics(s2)]
    assert steps == [8, 9, 10, 11] and all(r["gram"] > 0 for r in read_metrics(s2))
    stage3 = [
        f"run.dir={s3}",
        f"init.from_run={s2}",
        "init.from_mode=teacher",
        "gram.enabled=true",
        f"gram.checkpoint={s2}",  # a run folder: its newest EMA teacher (= its exported teacher.safetensors)
        "crops.resolution_sets=[[32,16,48,0.5],[48,16,64,0.5]]",
        "train.steps=4",
    ]
    cfg = load_train_config(preset, stage3)
    Trainer(cfg).run()
    assert [r["step"] for r in read_metrics(s3)] == [0, 1, 2, 3]
    # Stage 3's Gram teacher is stage 2's exported teacher, unchanged (no refresh).
    state = torch.load(s3 / "checkpoints" / "step_00000003.pt", weights_only=True)["model"]
    gram = load_model(s2 / "teacher.safetensors").state_dict()
    assert all(torch.equal(state[f"gram_teacher.{k}"], v) for k, v in gram.items())


def test_dense_monitor_reads_label_carrying_features_and_logs_in_runs(preset, tmp_path):
    from opendino.probes import patch_majority
    from opendino.train.monitor import N_SEG_CLASSES, DenseMonitor

    monitor = DenseMonitor(32, 8, (0.5,) * 3, (0.2,) * 3, n_fit=24, n_eval=12)

    class Oracle(torch.nn.Module):  # patch features = the one-hot patch labels (plus noise)
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, is_training=True):
            labels = patch_majority(monitor.maps, monitor.grid, N_SEG_CLASSES).flatten(1)
            onehot = torch.nn.functional.one_hot(labels, N_SEG_CLASSES).float()
            return {"x_norm_patchtokens": onehot + 0.01 * torch.randn_like(onehot), "x_norm_clstoken": onehot.mean(1)}

    assert monitor(Oracle())["monitor_seg_miou"] > 0.95
    run = tmp_path / "monitored"
    cfg = load_train_config(preset, [f"run.dir={run}", "monitor.every=3", "log.every=3", "gram.enabled=true"])
    Trainer(cfg).run()
    records = read_metrics(run)
    assert [r["step"] for r in records if "monitor_seg_miou" in r] == [2, 5, 8, 11]
    for r in records:
        assert 0 <= r["monitor_seg_miou"] <= 1 and -1 <= r["monitor_cls_patch_cos"] <= 1
        assert r["monitor_gram_distance"] >= 0 and 0 <= r["monitor_knn"] <= 1


def test_the_compiled_loss_region_equals_eager(preset):
    """``train.compile`` compiles ``loss_terms`` (Sinkhorn-Knopp, DINO, KoLeo, iBOT): same values and
    gradients as eager, also when the masked-token count and the teacher temperature change between calls
    (the count becomes a dynamic dimension, the temperature a graph input)."""
    from torch._dynamo.utils import counters

    from opendino.train.parallel import compile_modules

    torch._dynamo.reset()
    counters.clear()
    recipe = SSLRecipe(load_train_config(preset))
    eager = recipe.loss_terms
    compile_modules(recipe, recipe.parallel_plan(), heads=False, methods=True)
    gen = torch.Generator().manual_seed(0)
    B, K, n_local = 4, recipe.cfg.ibot_head.prototypes, 2
    for n_masked, teacher_temp in ((5, 0.04), (9, 0.05), (13, 0.07)):
        masks = torch.zeros(2 * B, 16, dtype=torch.bool)
        masks.view(-1)[torch.randperm(masks.numel(), generator=gen)[:n_masked]] = True
        per_crop = masks.sum(-1, keepdim=True).clamp(min=1)
        inputs = [
            torch.randn(2 * B, recipe.cfg.dino_head.prototypes, generator=gen),  # teacher CLS logits
            torch.randn(n_masked, K, generator=gen),  # teacher iBOT logits
            torch.randn((2 + n_local) * B, recipe.cfg.dino_head.prototypes, generator=gen).requires_grad_(),
            torch.randn(n_masked, K, generator=gen).requires_grad_(),
            torch.randn(2 * B, 8, generator=gen).requires_grad_(),  # pre-head CLS tokens for KoLeo
        ]
        extra = (masks, (1.0 / per_crop).expand_as(masks)[masks], torch.tensor([n_masked]), teacher_temp)
        results = []
        for fn in (eager, recipe.loss_terms):
            leaves = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
            terms = fn(*leaves, *extra)
            sum(terms.values()).backward()
            results.append((terms, [x.grad for x in leaves if x.requires_grad]))
        (ref_terms, ref_grads), (terms, grads) = results
        for name, value in ref_terms.items():
            torch.testing.assert_close(terms[name], value, rtol=1e-5, atol=1e-6)
        for g, ref in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-7)
    # one graph with the first shapes, one with M dynamic that serves every later count; no graph break
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


def _limit_file_size(limit: int):
    def apply():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_checkpoint_that_cannot_be_written_stops_in_words_and_the_run_resumes(preset, tmp_path):
    run = tmp_path / "full"
    Trainer(load_train_config(preset, [f"run.dir={run}", "train.steps=4"])).run()  # a checkpoint at step 3
    intact = run / "checkpoints" / "step_00000003.pt"
    cmd = [sys.executable, "-m", "opendino", "train", str(preset), f"run.dir={run}", "train.steps=12"]
    # A real short write: files may not grow past half a checkpoint (what a full disk does to torch.save).
    limit = _limit_file_size(intact.stat().st_size // 2)
    result = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit, timeout=300)
    assert result.returncode == 1
    assert "could not write the checkpoint of step 7" in result.stderr and str(run / "checkpoints") in result.stderr
    assert f"the newest intact checkpoint is {intact}" in result.stderr and "bytes" in result.stderr
    assert "enforce fail" not in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003.pt"]  # no partial file
    Trainer(load_train_config(preset, [f"run.dir={run}", "train.steps=12"])).run()  # space freed: it resumes
    assert [r["step"] for r in read_metrics(run)][-1] == 11


def test_a_run_folder_written_before_the_recipe_contract_resumes_exactly(preset, tmp_path, capsys):
    """tests/data/run_before_contract: 4 steps of this preset written by the code before the recipe contract
    (commit 3b2fc82); its config lacks the settings added since, its checkpoint the export prefix and the
    optimizer groups' frozen_until. It resumes without a warning, exactly as the same checkpoint does under
    a configuration written by today's code, and with the metric keys of an uninterrupted run. (Against an
    uninterrupted run the values are exact only on the machine that wrote the folder: this tiny model's
    KoLeo amplifies another CPU's float32 rounding, 8 % by step 2.)"""
    import shutil

    from opendino.config import to_dict

    run, current = tmp_path / "old", tmp_path / "current"
    for folder in (run, current):
        shutil.copytree(REPO / "tests" / "data" / "run_before_contract", folder)
    (current / "config.yaml").write_text(
        yaml.safe_dump(to_dict(load_train_config(preset, [f"run.dir={current}", "train.steps=8"])), sort_keys=False)
    )
    reference = tmp_path / "reference"
    Trainer(load_train_config(preset, [f"run.dir={reference}", "train.steps=8"])).run()
    capsys.readouterr()
    Trainer(load_train_config(preset, [f"run.dir={run}", "train.steps=8"])).run()
    out = capsys.readouterr().out
    assert "resuming" in out and "warning" not in out
    Trainer(load_train_config(preset, [f"run.dir={current}", "train.steps=8"])).run()
    assert _values(read_metrics(run)) == _values(read_metrics(current))
    assert [sorted(r) for r in _values(read_metrics(run))] == [sorted(r) for r in _values(read_metrics(reference))]
    from opendino.runs import load_backbone

    exported = load_model(run / "teacher.safetensors").state_dict()
    newest = load_backbone(str(run)).state_dict()
    assert all(torch.equal(newest[k], v) for k, v in exported.items())


def test_gram_tokens_used_selects_the_masked_or_the_unmasked_patches(preset):
    from opendino.config import ConfigError
    from opendino.losses import gram_loss
    from opendino.recipes.gram import GramAnchor, GramConfig

    backbone = build_model("vit_small", embed_dim=32, depth=1, num_heads=2)
    gen = torch.Generator().manual_seed(0)
    student, ema = torch.randn(4, 16, 32, generator=gen), torch.randn(4, 16, 32, generator=gen)
    masks = torch.rand(4, 16, generator=gen) < 0.4
    losses = {}
    for used, keep in (("all", torch.ones_like(masks)), ("masked", masks), ("unmasked", ~masks)):
        anchor = GramAnchor(GramConfig(enabled=True, ema_teacher=True, tokens_used=used), backbone, None)
        losses[used] = anchor.loss(student, {"collated_masks": masks}, ema)
        torch.testing.assert_close(losses[used], gram_loss(student[keep], ema[keep], img_level=False))
    assert len({round(v.item(), 6) for v in losses.values()}) == 3
    nothing = torch.zeros_like(masks)  # a rank whose crops have no masked token: 0, not NaN
    anchor = GramAnchor(GramConfig(enabled=True, ema_teacher=True, tokens_used="masked"), backbone, None)
    assert anchor.loss(student, {"collated_masks": nothing}, ema).item() == 0.0
    with pytest.raises(ConfigError, match="needs gram.img_level=false"):
        load_train_config(preset, ["gram.enabled=true", "gram.tokens_used=masked", "gram.img_level=true"])
    with pytest.raises(ConfigError, match="gram.tokens_used='some'; valid: all, masked, unmasked"):
        load_train_config(preset, ["gram.enabled=true", "gram.tokens_used=some"])


def test_gram_anchoring_on_the_ema_teachers_own_patches_of_the_unmasked_tokens(preset, tmp_path):
    run = tmp_path / "ema-gram"
    overrides = [f"run.dir={run}", "train.steps=3", "gram.enabled=true", "gram.ema_teacher=true"]
    Trainer(load_train_config(preset, [*overrides, "gram.tokens_used=unmasked"])).run()
    records = read_metrics(run)
    assert all(r["gram"] > 0 and r["gram_weight"] == 1.0 for r in records)
    state = torch.load(run / "checkpoints" / "step_00000002.pt", weights_only=True)["model"]
    assert not any(k.startswith("gram_teacher.") for k in state)  # no Gram teacher network to keep


def test_a_resume_takes_the_head_warmup_of_its_own_config(preset, tmp_path):
    run = tmp_path / "warm"
    Trainer(load_train_config(preset, [f"run.dir={run}", "init.head_warmup_steps=100", "train.steps=2"])).run()
    frozen = load_model(run / "teacher.safetensors").state_dict()
    Trainer(load_train_config(preset, [f"run.dir={run}", "init.head_warmup_steps=0", "train.steps=4"])).run()
    moved = load_model(run / "teacher.safetensors").state_dict()
    assert not torch.equal(frozen["blocks.0.attn.qkv.weight"], moved["blocks.0.attn.qkv.weight"])
