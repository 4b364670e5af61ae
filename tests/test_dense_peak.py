"""Dense-quality diagnostics and the dense peak: ``SelfAttention.attention_probs``, the monitor's patch
rank, patch-similarity and CLS-attention-entropy keys, ``monitor.keep_peak`` (``dense_peak.safetensors``
with its record in its metadata, carried over by a continuing run) and ``gram.checkpoint=dense_peak``."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from opendino import runs
from opendino.config import ConfigError
from opendino.models import ConvNeXt, DinoV2VisionTransformer, DinoVisionTransformer, build_model, load_model
from opendino.train.config import load_train_config
from opendino.train.dense_peak import DensePeak
from opendino.train.logging import read_metrics
from opendino.train.monitor import SCORE, DenseMonitor, patch_diagnostics
from opendino.train.trainer import Trainer

MEAN, STD = (0.5,) * 3, (0.2,) * 3
DIAGNOSTICS = ("monitor_patch_rank", "monitor_patch_sim_mean", "monitor_patch_sim_std")
ENTROPY = "monitor_cls_attn_entropy"
# A run of a few seconds whose monitored scores move: no LayerScale, a fast lr and a light EMA, so that the
# teacher's features change between the monitor points (steps 1, 3, 5, 7 of 8; a checkpoint at each).
TINY = {
    "data": {"source": "synthetic", "synthetic_n": 64, "synthetic_size": 48},
    "model": {
        "arch": "vit_small",
        "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "layerscale_init": None},
    },
    "dino_head": {"prototypes": 64, "hidden_dim": 32, "bottleneck_dim": 16},
    "ibot_head": {"prototypes": 48, "hidden_dim": 32, "bottleneck_dim": 16},
    "crops": {"global_size": 32, "local_size": 16, "n_local": 2},
    "optim": {"epochs": 2},
    "train": {"batch_size": 4, "epoch_length": 6, "steps": 8},
    "checkpoint": {"every": 2, "keep": 100},
    "log": {"every": 1, "progress": False, "tensorboard": False},
    "monitor": {"every": 2, "n_fit": 8, "n_eval": 8, "keep_peak": True},
    "schedules": {
        "lr": {"start": 0.0, "peak": 2e-2, "end": 1e-4, "warmup_epochs": 1, "freeze_last_layer_epochs": 1},
        "weight_decay": {"start": 0.04, "peak": 0.04, "end": 0.1},
        "teacher_temp": {"start": 0.04, "peak": 0.07, "end": 0.07, "warmup_epochs": 1},
        "momentum": {"start": 0.5, "peak": 0.5, "end": 0.5},
    },
}


def _tiny_vit(seed: int = 0) -> DinoVisionTransformer:
    """A small ViT (RoPE, storage tokens, masked key bias) with weights large enough for peaked attention."""
    torch.manual_seed(seed)
    model = DinoVisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, n_storage_tokens=2, mask_k_bias=True
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def _last_attention_call(model: DinoVisionTransformer, images: torch.Tensor):
    """The input (normalised tokens, rotations) and output of the last block's attention in one forward."""
    caught = {}
    attn = model.blocks[-1].attn
    pre = attn.register_forward_pre_hook(lambda m, args: caught.update(args=args))
    post = attn.register_forward_hook(lambda m, args, out: caught.update(out=out))
    with torch.no_grad():
        model(images, is_training=True)
    pre.remove()
    post.remove()
    (xs, ropes), out = caught["args"], caught["out"]
    return xs[0], ropes[0], out[0]


# -- SelfAttention.attention_probs ------------------------------------------------------------------------------------


def test_attention_weights_reproduce_the_fused_attention():
    model = _tiny_vit()
    attn = model.blocks[-1].attn
    x, rope, out = _last_attention_call(model, torch.randn(3, 3, 32, 32))
    assert rope is not None  # the rotations are part of what the probabilities must include
    with torch.no_grad():
        probs = attn.attention_probs(x, rope)
        qkv = attn.qkv(x)
        _, _, v = attn._heads(qkv, rope)
        mixed = (probs @ v).transpose(1, 2).flatten(2)
        fused = attn._attend(qkv, rope)
    n = 1 + 2 + 16  # cls, storage tokens, 4 x 4 patches
    assert probs.shape == (3, 2, n, n)
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 2, n), atol=1e-5, rtol=0)
    assert probs.amax(-1).mean() > 2 / n  # far from uniform: a wrong scale or missing rope would show
    torch.testing.assert_close(mixed, fused, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn.proj(mixed), out, atol=1e-5, rtol=1e-5)  # the module's own output


# -- patch_diagnostics -----------------------------------------------------------------------------------------


def test_patch_diagnostics_of_collapsed_patches():
    torch.manual_seed(0)
    one = torch.randn(1, 1, 32).expand(8, 16, 32).clone()  # every patch of every image the same
    d = patch_diagnostics(one)
    assert set(d) == set(DIAGNOSTICS)
    assert d["monitor_patch_rank"] == pytest.approx(1.0, abs=1e-3)
    assert d["monitor_patch_sim_mean"] == pytest.approx(1.0, abs=1e-9)
    assert d["monitor_patch_sim_std"] == pytest.approx(0.0, abs=1e-6)
    # within-image collapse only (images differ): no spread inside an image, a rank of at most the images
    per_image = torch.randn(8, 1, 32).expand(8, 16, 32).clone()
    d = patch_diagnostics(per_image * torch.rand(8, 16, 1).add(0.5))  # the norms do not matter
    assert d["monitor_patch_sim_mean"] == pytest.approx(1.0, abs=1e-9)
    assert d["monitor_patch_sim_std"] == pytest.approx(0.0, abs=1e-6)
    assert 1.5 < d["monitor_patch_rank"] <= 8 + 1e-3


def test_patch_diagnostics_of_random_patches():
    torch.manual_seed(0)
    patches = torch.randn(8, 16, 32)  # 128 patches in 32 dimensions
    d = patch_diagnostics(patches)
    assert 0.75 * 32 < d["monitor_patch_rank"] <= 32
    assert abs(d["monitor_patch_sim_mean"]) < 0.05
    assert d["monitor_patch_sim_std"] > 0.1  # about 1 / sqrt(32) for independent directions
    assert patch_diagnostics(3.0 * patches) == pytest.approx(d)  # scale-free: cosines and normalised rows
    # patches in a 4-dimensional subspace: the effective rank counts its directions
    subspace = torch.randn(8, 16, 4) @ torch.randn(4, 32)
    assert 2 < patch_diagnostics(subspace)["monitor_patch_rank"] <= 4 + 1e-3


# -- DenseMonitor keys --------------------------------------------------------------------------------------


def test_monitor_reports_diagnostics_and_cls_attention_entropy():
    monitor = DenseMonitor(32, 8, MEAN, STD, n_fit=8, n_eval=8)
    model = _tiny_vit().train()
    attn = model.blocks[-1].attn
    result = monitor(model)
    assert {"monitor_seg_miou", *DIAGNOSTICS, ENTROPY} <= set(result)
    assert all(math.isfinite(v) for v in result.values())
    assert 0 < result[ENTROPY] <= 1 + 1e-6
    assert model.training and not attn._forward_pre_hooks  # mode restored, the hook removed
    with torch.no_grad():
        patches = model.eval()(monitor.images, is_training=True)["x_norm_patchtokens"]
    assert patch_diagnostics(patches) == pytest.approx({k: result[k] for k in DIAGNOSTICS}, rel=1e-6)
    x, rope, _ = _last_attention_call(model, monitor.images)
    with torch.no_grad():
        cls_rows = attn.attention_probs(x, rope)[:, :, 0].double()  # [B, h, N]: what the CLS token reads
    entropy = -(cls_rows * cls_rows.log()).sum(-1) / math.log(cls_rows.shape[-1])
    assert result[ENTROPY] == pytest.approx(entropy.mean().item(), abs=1e-5)

    third = attn.qkv.out_features // 3
    with torch.no_grad():  # sharper queries: a lower temperature, a lower entropy (softmax is monotone in it)
        attn.qkv.weight[:third] *= 4
        attn.qkv.bias[:third] *= 4
    sharper = monitor(model)[ENTROPY]
    assert 0 < sharper < result[ENTROPY]
    with torch.no_grad():  # no queries: every token attends uniformly, entropy exactly log N / log N
        attn.qkv.weight[:third] = 0
        attn.qkv.bias[:third] = 0
    assert monitor(model)[ENTROPY] == pytest.approx(1.0, abs=1e-5)


def test_monitor_without_attention_weights_has_no_entropy():
    torch.manual_seed(0)
    convnext = ConvNeXt(depths=(1, 1, 1, 1), dims=(16, 16, 16, 16))  # stride 32: a 2 x 2 grid at 64 px
    result = DenseMonitor(64, 32, MEAN, STD, n_fit=8, n_eval=8)(convnext)
    assert ENTROPY not in result
    assert {"monitor_seg_miou", *DIAGNOSTICS} <= set(result)
    assert all(math.isfinite(v) for v in result.values())
    # The DINOv2 ViT shares the DINOv3 attention module (no RoPE): it has the entropy too.
    torch.manual_seed(0)
    dinov2 = DinoV2VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
    entropy = DenseMonitor(32, 8, MEAN, STD, n_fit=8, n_eval=8)(dinov2)[ENTROPY]
    assert 0 < entropy <= 1 + 1e-6


# -- monitor.keep_peak ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def preset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("preset") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture(scope="module")
def first_run(preset, tmp_path_factory) -> Path:
    """An 8-step run keeping its dense peak (shared by the tests below, which only read it or copy it)."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    run = tmp_path_factory.mktemp("runs") / "first"
    Trainer(load_train_config(preset, [f"run.dir={run}"])).run()
    return run


def _peak(run: Path) -> dict:
    record = runs.dense_peak_record(run)
    assert json.loads((run / runs.DENSE_PEAK_RECORD).read_text()) == record  # the copy to read agrees
    return record


def _rewrite_peak(run: Path, state: dict[str, torch.Tensor] | None = None, **record) -> None:
    """The run's dense peak with other weights and / or another record (step, score, monitor)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    file = run / runs.DENSE_PEAK
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    meta[runs.PEAK_METADATA_KEY] = json.dumps(json.loads(meta[runs.PEAK_METADATA_KEY]) | record)
    save_file(state if state is not None else load_file(str(file)), str(file), metadata=meta)
    (run / runs.DENSE_PEAK_RECORD).write_text(meta[runs.PEAK_METADATA_KEY])


def _scores(*folders: Path) -> list[tuple[int, float]]:
    return [(r["step"], r[SCORE]) for run in folders for r in read_metrics(run) if SCORE in r]


def _best(scores: list[tuple[int, float]]) -> tuple[int, float]:
    """The first step of the best score (a later equal score does not replace the peak)."""
    top = max(s for _, s in scores)
    return next(step for step, s in scores if s == top), top


def _teacher_at(run: Path, step: int) -> dict[str, torch.Tensor]:
    state = torch.load(run / runs.CHECKPOINTS / f"step_{step:08d}.pt", weights_only=True)["model"]
    return runs.prefixed(state, "teacher.backbone.")


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


def test_keep_peak_needs_the_dense_monitor(preset):
    for off in ("monitor.every=0", "monitor.dense=false"):
        with pytest.raises(ConfigError, match="keep_peak"):
            load_train_config(preset, [off])
    assert not load_train_config(preset, ["monitor.every=0", "monitor.keep_peak=false"]).monitor.keep_peak


def test_a_run_keeps_the_teacher_of_its_best_dense_score(first_run):
    scores = _scores(first_run)
    assert [step for step, _ in scores] == [1, 3, 5, 7]
    assert len({s for _, s in scores}) > 1  # the scores move, so the peak is a choice
    peak = _peak(first_run)
    assert set(peak) == {"step", SCORE, "monitor"}
    assert peak["monitor"] == {"size": 32, "patch": 8, "n_fit": 8, "n_eval": 8}
    assert (peak["step"], peak[SCORE]) == _best(scores)
    model = load_model(first_run / runs.DENSE_PEAK)
    _assert_same_state(model.state_dict(), _teacher_at(first_run, peak["step"]))
    cfg = load_train_config(first_run / runs.CONFIG)  # the run's own monitor: same scenes, same normalisation
    monitor = DenseMonitor(32, 8, cfg.crops.mean, cfg.crops.std, cfg.monitor.n_fit, cfg.monitor.n_eval)
    assert monitor(model)[SCORE] == pytest.approx(peak[SCORE], abs=1e-9)


def test_a_continuing_run_starts_from_the_peak_of_the_run_it_continues(first_run, preset, tmp_path):
    run = tmp_path / "second"
    Trainer(load_train_config(preset, [f"run.dir={run}", f"init.from_run={first_run}", "train.steps=12"])).run()
    assert [step for step, _ in _scores(run)] == [9, 11]
    peak = _peak(run)
    assert (peak["step"], peak[SCORE]) == _best(_scores(first_run, run))  # the best of the whole chain
    if peak["step"] < 8:  # the first run's peak, carried over unchanged
        assert (run / runs.DENSE_PEAK).read_bytes() == (first_run / runs.DENSE_PEAK).read_bytes()
    else:
        _assert_same_state(load_model(run / runs.DENSE_PEAK).state_dict(), _teacher_at(run, peak["step"]))
    assert _peak(first_run)["step"] < 8  # left as it was


def test_a_peak_from_another_monitor_is_not_carried(first_run, preset, tmp_path, capsys):
    source = tmp_path / "source"
    shutil.copytree(first_run, source)
    _rewrite_peak(source, **{SCORE: 1.0})  # unbeatable, if it were carried
    run = tmp_path / "continued"
    overrides = [f"run.dir={run}", f"init.from_run={source}", "train.steps=10", "monitor.n_eval=4"]
    Trainer(load_train_config(preset, overrides)).run()
    assert "not carrying the dense peak" in capsys.readouterr().out
    assert _peak(run)["step"] == 9 and _peak(run)["monitor"]["n_eval"] == 4


@pytest.mark.parametrize("carried_score", [1.0, -1.0])
def test_the_carried_peak_is_replaced_only_by_a_higher_score(first_run, preset, tmp_path, carried_score):
    """A carried score of 1 (the best mIoU) is never beaten; one of -1 is beaten at the first monitor point."""
    source = tmp_path / "source"
    shutil.copytree(first_run, source)
    _rewrite_peak(source, step=3, **{SCORE: carried_score})
    run = tmp_path / "continued"
    Trainer(load_train_config(preset, [f"run.dir={run}", f"init.from_run={source}", "train.steps=10"])).run()
    peak = _peak(run)
    if carried_score == 1.0:
        assert (peak["step"], peak[SCORE]) == (3, 1.0)
        assert (run / runs.DENSE_PEAK).read_bytes() == (source / runs.DENSE_PEAK).read_bytes()
    else:
        assert (peak["step"], peak[SCORE]) == _best(_scores(run)) and peak["step"] == 9
        _assert_same_state(load_model(run / runs.DENSE_PEAK).state_dict(), _teacher_at(run, 9))


# -- gram.checkpoint=dense_peak --------------------------------------------------------------------------------


def test_gram_teacher_from_the_dense_peak(first_run, preset, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(first_run, source)
    # A peak unlike any EMA teacher of the run, so that only the peak file can give these weights.
    peak = load_model(source / runs.DENSE_PEAK)
    with torch.no_grad():
        for p in peak.parameters():
            p.add_(torch.randn_like(p))
    _rewrite_peak(source, peak.state_dict())
    run = tmp_path / "gram"
    overrides = [f"run.dir={run}", f"init.from_run={source}", "train.steps=10", "monitor.keep_peak=false"]
    Trainer(load_train_config(preset, [*overrides, "gram.enabled=true", "gram.checkpoint=dense_peak"])).run()
    state = torch.load(run / runs.CHECKPOINTS / "step_00000009.pt", weights_only=True)["model"]
    _assert_same_state(runs.prefixed(state, "gram_teacher."), peak.state_dict())
    assert not (run / runs.DENSE_PEAK).exists()  # this stage keeps no peak of its own


def test_gram_dense_peak_without_a_peak_file_names_keep_peak(first_run, preset, tmp_path):
    source = tmp_path / "no_peak"
    shutil.copytree(first_run, source)
    (source / runs.DENSE_PEAK).unlink()
    (source / runs.DENSE_PEAK_RECORD).unlink()
    gram = ["gram.enabled=true", "gram.checkpoint=dense_peak", "monitor.keep_peak=false"]
    cfg = load_train_config(preset, [f"run.dir={tmp_path / 'gram'}", f"init.from_run={source}", *gram])
    with pytest.raises(ConfigError, match="monitor.keep_peak") as error:
        Trainer(cfg).run()
    assert str(source) in str(error.value)
    with pytest.raises(ConfigError, match="init.from_run"):  # a fresh run has no run to take a peak from
        load_train_config(preset, [f"run.dir={tmp_path / 'fresh'}", *gram])


def test_gram_dense_peak_later_than_the_newest_checkpoint_is_refused(first_run, preset, tmp_path):
    """A run stopped after its peak was written but before the checkpoint that covers it."""
    source = tmp_path / "source"
    shutil.copytree(first_run, source)
    newest = runs.list_checkpoints(source / runs.CHECKPOINTS)[-1][0]
    _rewrite_peak(source, step=newest + 2)
    gram = ["gram.enabled=true", "gram.checkpoint=dense_peak", "monitor.keep_peak=false"]
    cfg = load_train_config(preset, [f"run.dir={tmp_path / 'gram'}", f"init.from_run={source}", *gram])
    with pytest.raises(ConfigError, match="later than its newest checkpoint"):
        Trainer(cfg).run()


def test_a_new_best_waits_in_memory_for_the_next_checkpoint(tmp_path):
    """Held, not written: a run killed before its next checkpoint keeps the peak that checkpoint knew."""
    torch.manual_seed(0)
    model = build_model("vit_small", embed_dim=32, depth=1, num_heads=2, patch_size=8)
    settings = {"size": 32, "patch": 8, "n_fit": 8, "n_eval": 8}
    peak = DensePeak(tmp_path, None, settings, print)
    assert peak.beats(0.1)
    held = {k: v.clone() for k, v in model.state_dict().items()}
    peak.hold(5, 0.3, model.state_dict())
    assert not peak.beats(0.3) and not (tmp_path / runs.DENSE_PEAK).exists()
    with torch.no_grad():  # training goes on: the held copy must not follow the live weights
        for p in model.parameters():
            p.add_(1.0)
    peak.write(model)
    assert runs.dense_peak_record(tmp_path) == {"step": 5, SCORE: 0.3, "monitor": settings}
    _assert_same_state(load_model(tmp_path / runs.DENSE_PEAK).state_dict(), held)
    assert DensePeak(tmp_path, None, settings, print).best == 0.3  # a restart in the folder knows it
