"""Adapting released models: fitting the input layer to N channels, the frozen-then-ramped backbone,
Gram anchoring to the starting model, gradient accumulation, and the errors of inputs that do not fit."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import yaml

from opendino.config import ConfigError
from opendino.models import build_model, load_model, save_model
from opendino.models.channels import expand_channels, fit_input_layer
from opendino.models.checkpoint import CheckpointError
from opendino.models.registry import create, normalisation
from opendino.recipes.ssl import SSLRecipe
from opendino.runs import list_checkpoints
from opendino.train.config import load_train_config
from opendino.train.logging import read_metrics
from opendino.train.optim import apply_schedules, build_optimizer
from opendino.train.step import train_step
from opendino.train.trainer import Trainer
from tests.conftest import REPO, train_then_kill_9
from tests.test_train import TINY

ADAPT = REPO / "configs" / "adapt"
TIMING_KEYS = {"images_per_s"}


def _tiny(family: str, in_chans: int = 3):
    if family == "vit":
        return build_model("vits16", embed_dim=32, depth=2, num_heads=2, in_chans=in_chans)
    return create("convnext", {"in_chans": in_chans, "depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]})


def _features(model, x):
    out = model.eval().forward_features(x)
    return torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_patchtokens"]], 1)


@pytest.mark.parametrize("family", ["vit", "convnext"])
@pytest.mark.parametrize("channels", [1, 4, 6])
def test_a_fitted_input_layer_keeps_the_features_of_grey_images(family, channels):
    """The ``mean`` rule: an image whose channels are all equal gives the 3-channel model's features."""
    torch.manual_seed(0)
    source = _tiny(family)
    fitted = _tiny(family, channels)
    fitted.load_state_dict(fit_input_layer(source.state_dict(), fitted, "test"))
    grey = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        expected = _features(source, grey.expand(-1, 3, -1, -1))
        got = _features(fitted, grey.expand(-1, channels, -1, -1))
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (got - expected).abs().max()


def test_the_mean_rule_on_colour_images_and_the_zero_rule_on_any():
    """On colour images the ``mean`` rule differs from the source (no rule with mean-filled, rescaled
    filters can keep arbitrary RGB inputs); the ``zero`` rule keeps the source's features exactly, whatever
    the new channels hold."""
    torch.manual_seed(0)
    source, fitted = _tiny("vit"), _tiny("vit", 4)
    rgb = torch.rand(2, 3, 32, 32)
    with_mean = torch.cat([rgb, rgb.mean(1, keepdim=True)], 1)
    with torch.no_grad():
        expected = _features(source, rgb)
        fitted.load_state_dict(fit_input_layer(source.state_dict(), fitted, "test", "mean"))
        assert not torch.allclose(_features(fitted, with_mean), expected, atol=1e-3)
        fitted.load_state_dict(fit_input_layer(source.state_dict(), fitted, "test", "zero"))
        anything = torch.cat([rgb, torch.randn(2, 1, 32, 32) * 5], 1)
        assert torch.equal(_features(fitted, anything), _features(fitted, with_mean))
        assert torch.allclose(_features(fitted, anything), expected, atol=1e-6)


def test_expand_channels_rule():
    weight = torch.randn(5, 3, 2, 2)
    four = expand_channels(weight, 4)
    assert torch.allclose(four[:, :3], weight * 3 / 4) and torch.allclose(four[:, 3], weight.mean(1) * 3 / 4)
    one = expand_channels(weight, 1)
    assert torch.allclose(one[:, 0], weight.sum(1))
    assert expand_channels(weight, 3) is weight
    with pytest.raises(CheckpointError, match="adds channels"):
        expand_channels(weight, 2, "zero")


def test_a_checkpoint_of_another_patch_size_is_refused():
    source = build_model("vits16", embed_dim=32, depth=2, num_heads=2)
    model = build_model("vits16", embed_dim=32, depth=2, num_heads=2, patch_size=14)
    with pytest.raises(CheckpointError, match="patch size 16 but the model has 14.*closest known architecture"):
        fit_input_layer(source.state_dict(), model, "released.pth")


def _adapt_overrides(tmp_path: Path, backbone: Path, *extra: str) -> list[str]:
    """The adaptation preset at test size: the released ViT-S/16 architecture, tiny crops and heads."""
    return [
        f"run.dir={tmp_path / 'adapted'}",
        f"init.backbone={backbone}",
        "data.source=synthetic",
        "data.synthetic_n=64",
        "data.synthetic_size=48",
        "crops.global_size=32",
        "crops.local_size=16",
        "crops.n_local=2",
        "dino_head.prototypes=64",
        "dino_head.hidden_dim=32",
        "dino_head.bottleneck_dim=16",
        "ibot_head.prototypes=48",
        "ibot_head.hidden_dim=32",
        "ibot_head.bottleneck_dim=16",
        "train.batch_size=2",
        "train.epoch_length=4",
        "train.steps=6",
        "optim.epochs=2",
        "init.head_warmup_steps=2",
        "init.backbone_ramp_steps=2",
        "checkpoint.every=2",
        "checkpoint.keep=3",
        "log.every=1",
        "log.progress=false",
        "log.tensorboard=false",
        *extra,
    ]


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    """Random weights of the released ViT-S/16 in the official layout (a bare state dict ``.pth``)."""
    path = tmp_path_factory.mktemp("released") / "dinov3_vits16_random.pth"
    torch.manual_seed(1)
    torch.save(build_model("vits16").state_dict(), path)
    return path


def _backbone(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def test_continued_pretraining_freezes_then_ramps_the_backbone_anchored_to_itself(released, tmp_path):
    cfg = load_train_config(ADAPT / "vits16.yaml", _adapt_overrides(tmp_path, released))
    assert cfg.gram.checkpoint == "init" and cfg.gram.enabled
    Trainer(cfg).run()
    start = torch.load(released, weights_only=True)
    saved = dict(list_checkpoints(tmp_path / "adapted" / "checkpoints"))
    assert sorted(saved) == [1, 3, 5]
    after_phase_1 = torch.load(saved[1], weights_only=True)["model"]
    end = torch.load(saved[5], weights_only=True)["model"]
    for prefix in ("student.backbone.", "teacher.backbone.", "gram_teacher."):
        phase_1 = _backbone(after_phase_1, prefix)
        assert phase_1.keys() == start.keys()
        assert all(torch.equal(phase_1[k], v) for k, v in start.items()), f"{prefix} moved in phase 1"
    gram = _backbone(end, "gram_teacher.")
    assert all(torch.equal(gram[k], v) for k, v in start.items()), "the Gram teacher is the starting model, fixed"
    moved = _backbone(end, "student.backbone.")
    assert sum(not torch.equal(moved[k], v) for k, v in start.items()) > len(start) // 2, "phase 2 trains it"
    heads = _backbone(after_phase_1, "student.dino_head.")
    fresh = SSLRecipe(cfg).student.dino_head.state_dict()
    assert any(not torch.equal(heads[k], fresh[k]) for k in fresh), "the heads train in phase 1"
    records = read_metrics(tmp_path / "adapted")
    assert all(np.isfinite(r["loss"]) and "gram" in r for r in records)
    assert [r["lr_ramp"] for r in records] == [0.0, 0.0, 0.5, 1.0, 1.0, 1.0]  # frozen 2, ramped over 2
    # "did it help?": the adapted run and the released file it started from, side by side in one report
    from opendino.eval.suite import evaluate

    out = tmp_path / "eval"
    results = evaluate(
        tmp_path / "adapted",
        tasks=("knn",),
        out=out,
        n_train=16,
        n_val=8,
        progress=False,
        log=lambda _: None,
        baselines=[str(released), "pixels"],
    )
    assert results["meta"]["baselines"] == [f"baseline:{released}", "pixels"]
    assert (
        set(results[f"baseline:{released}"]["knn"]) == set(results["trained"]["knn"]) == set(results["pixels"]["knn"])
    )
    header = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("| task |"))
    assert "| trained |" in header and f"| trained − {released.stem} |" in header and "| pixels |" in header


def test_continued_pretraining_resumes_exactly_after_kill_9(released, tmp_path):
    overrides = _adapt_overrides(tmp_path, released, "train.steps=8")
    Trainer(load_train_config(ADAPT / "vits16.yaml", overrides)).run()
    reference = read_metrics(tmp_path / "adapted")
    killed = tmp_path / "killed"
    overrides = [o for o in overrides if not o.startswith("run.dir=")]
    # past the checkpoint of step 3 (inside the ramp), before the end
    assert train_then_kill_9(ADAPT / "vits16.yaml", killed, overrides, 5) < 8, "finished before it was killed"
    Trainer(load_train_config(ADAPT / "vits16.yaml", [f"run.dir={killed}", *overrides])).run()

    def values(records):
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]

    assert values(read_metrics(killed)) == values(reference)
    a = load_model(killed / "teacher.safetensors").state_dict()
    b = load_model(tmp_path / "adapted" / "teacher.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_backbone_lr_ramps_linearly_after_the_freeze():
    param = torch.nn.Parameter(torch.zeros(2))
    groups = [{"params": [param], "lr_multiplier": 0.5, "wd_multiplier": 1.0, "is_last_layer": False}]
    optimizer = build_optimizer([{**groups[0], "frozen_until": 2, "ramp_steps": 4}])
    lrs = []
    for step in range(8):
        apply_schedules(optimizer, 1.0, 0.0, 1.0, step)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == [0.0, 0.0, 0.125, 0.25, 0.375, 0.5, 0.5, 0.5]


def test_configuration_errors_of_channels_and_anchors(tmp_path):
    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump(TINY))
    with pytest.raises(ConfigError, match=r"crops.mean has 3 .* model.in_chans=4.*opendino data stats"):
        load_train_config(preset, ["model.in_chans=4"])
    with pytest.raises(ConfigError, match="set model.in_chans instead"):
        load_train_config(preset, ["model.kwargs={in_chans: 4}"])
    with pytest.raises(ConfigError, match="anchors to the starting model: set init.backbone"):
        load_train_config(preset, ["gram.enabled=true", "gram.checkpoint=init"])
    with pytest.raises(ConfigError, match="the dense monitor scores RGB"):
        load_train_config(preset, ["model.in_chans=1", "crops.mean=[0.5]", "crops.std=[0.2]", "monitor.every=1"])
    with pytest.raises(ConfigError, match=r"crops.std=\[0.2, 0.0, 0.2\]: every value must be > 0"):
        load_train_config(preset, ["crops.std=[0.2,0.0,0.2]"])
    with pytest.raises(ConfigError, match="train.accumulate=0"):
        load_train_config(preset, ["train.accumulate=0"])
    with pytest.raises(ConfigError, match="four of each|crops.mean has 3"):
        load_train_config(ADAPT / "multispectral.yaml", ["init.backbone=x.pth"])


# -- gradient accumulation -------------------------------------------------------------------------------
EXACT = {  # no randomness inside the step (drop path, RoPE augmentation) and no batch-level terms
    **TINY,
    "model": {
        "arch": "vit_small",
        "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2, "pos_embed_rope_rescale_coords": None},
        "drop_path_rate": 0.0,
    },
    "loss": {"koleo_weight": 0.0, "centering": "softmax", "center_momentum": 1.0},
}


def _recipe_and_batches(tmp_path: Path, n: int = 2):
    preset = tmp_path / "exact.yaml"
    preset.write_text(yaml.safe_dump(EXACT))
    cfg = load_train_config(preset, [f"run.dir={tmp_path / 'run'}", "train.batch_size=2"])
    trainer = Trainer(cfg)
    trainer.setup()
    batches = [next(trainer.batches) for _ in range(n)]
    return trainer.members[0].recipe, batches, cfg


def _crop_major(parts: list[torch.Tensor], crops: int) -> torch.Tensor:
    """Crop-major rows of several batches as one batch: crop 0 of every image of every part, crop 1, ..."""
    return torch.cat([c for group in zip(*(p.chunk(crops) for p in parts), strict=True) for c in group])


def _joined(batches: list[dict], n_local: int) -> dict:
    """The batch of all images of ``batches`` (the collated layout: crop-major, masks recounted)."""
    masks = _crop_major([b["collated_masks"] for b in batches], 2)
    return {
        "global": _crop_major([b["global"] for b in batches], 2),
        "local": _crop_major([b["local"] for b in batches], n_local),
        "labels": torch.cat([b["labels"] for b in batches]),
        "skipped": [],
        "collated_masks": masks,
        "mask_indices_list": masks.flatten().nonzero().flatten(),
        "masks_weight": (1 / masks.sum(-1).clamp(min=1.0))[:, None].expand_as(masks)[masks],
        "n_masked_patches": torch.tensor([masks.sum()]),
    }


def _gradients(recipe, batches, clip: float = 0.0) -> dict[str, torch.Tensor]:
    optimizer = build_optimizer(recipe.param_groups())
    train_step(recipe, optimizer, batches, clip_grad=clip)
    return {n: p.grad.clone() for n, p in recipe.student.named_parameters() if p.grad is not None}


def test_two_micro_batches_give_the_gradients_of_the_double_batch(tmp_path):
    recipe, batches, cfg = _recipe_and_batches(tmp_path)
    joined = _joined(batches, cfg.crops.n_local)
    state = copy.deepcopy(recipe.state_dict())
    accumulated = _gradients(recipe, batches)
    recipe.load_state_dict(state)
    double = _gradients(recipe, joined)
    assert accumulated.keys() == double.keys() and len(double) > 10
    for name, grad in double.items():
        assert torch.allclose(accumulated[name], grad, atol=1e-5, rtol=1e-4), name
    recipe.load_state_dict(state)
    one = _gradients(recipe, batches[0])
    recipe.load_state_dict(state)
    listed = _gradients(recipe, batches[:1])
    assert all(torch.equal(one[k], listed[k]) for k in one), "accumulate=1 is the plain step"


def test_accumulate_reads_micro_batches_in_order_and_scales_the_lr(tmp_path):
    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump(TINY))
    base = ["train.steps=3", "checkpoint.every=100", "optim.scaling_rule=linear_wrt_256"]
    Trainer(load_train_config(preset, [f"run.dir={tmp_path / 'k2'}", "train.accumulate=2", *base])).run()
    Trainer(load_train_config(preset, [f"run.dir={tmp_path / 'k1'}", *base])).run()
    k2, k1 = read_metrics(tmp_path / "k2"), read_metrics(tmp_path / "k1")
    assert [r["step"] for r in k2] == [0, 1, 2]
    assert all(abs(a["lr"] - 2 * b["lr"]) < 1e-12 for a, b in zip(k2, k1, strict=True))
    assert all(np.isfinite(r["loss"]) for r in k2)


def test_with_ddp_gradients_are_synchronised_once_per_step(tmp_path):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from opendino.train.parallel import apply_data_parallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        recipe, batches, cfg = _recipe_and_batches(tmp_path, 4)
        apply_data_parallel(recipe.parallel_plan(), cfg.parallel, torch.device("cpu"))
        calls = []

        def counting_hook(state, bucket):
            calls.append(bucket.index())
            return allreduce_hook(state, bucket)

        recipe.student.register_comm_hook(None, counting_hook)
        optimizer = build_optimizer(recipe.param_groups())
        train_step(recipe, optimizer, batches[:1])
        per_step = len(calls)
        assert per_step > 0
        calls.clear()
        train_step(recipe, optimizer, batches[1:4])
        assert len(calls) == per_step, f"{len(calls)} bucket all-reduces for 3 micro-batches, {per_step} for 1"
    finally:
        dist.destroy_process_group()


# -- images of N channels --------------------------------------------------------------------------------
def _tif_folder(root: Path, channels: int, n: int = 6, size: int = 40) -> Path:
    import tifffile

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        smooth = rng.random((size // 8, size // 8, channels)).repeat(8, 0).repeat(8, 1)
        tifffile.imwrite(root / f"img{i}.tif", (smooth * 255).astype(np.uint8))
    return root


def test_a_four_channel_tif_folder_trains_from_a_three_channel_checkpoint(tmp_path):
    from opendino.data.sources import ChannelMismatchError

    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump({**TINY, "data": {}}))
    torch.manual_seed(3)
    start = build_model("vit_small", **TINY["model"]["kwargs"])
    save_model(start, tmp_path / "rgb.safetensors")
    folder = _tif_folder(tmp_path / "tifs", 4)
    four = ["model.in_chans=4", "crops.mean=[0.5,0.5,0.5,0.5]", "crops.std=[0.25,0.25,0.25,0.25]"]
    common = [f"init.backbone={tmp_path / 'rgb.safetensors'}", "init.head_warmup_steps=2", "train.steps=2"]
    run = tmp_path / "four"
    Trainer(load_train_config(preset, [f"run.dir={run}", f"data.path={folder}", *four, *common])).run()
    adapted = load_model(run / "teacher.safetensors")
    assert adapted.model_kwargs["in_chans"] == 4
    expected = expand_channels(start.patch_embed.proj.weight.detach(), 4)
    assert torch.equal(adapted.patch_embed.proj.weight, expected), "phase 1 keeps the fitted patch embedding"
    rgb_folder = tmp_path / "rgb"
    rgb_folder.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(rgb_folder / "a.png")
    cfg = load_train_config(preset, [f"run.dir={tmp_path / 'bad'}", f"data.path={rgb_folder}", *four, *common])
    with pytest.raises(ChannelMismatchError, match=r"3 channels.*4"):
        Trainer(cfg).run()


def test_colour_operations_are_skipped_on_other_channel_counts():
    from opendino.data.augment import PhotometricPolicy, normalize, photometric

    grey_only = PhotometricPolicy(jitter=0.0, grayscale=1.0)
    torch.manual_seed(0)
    for channels in (1, 4):
        crops = torch.randint(0, 256, (3, channels, 8, 8), dtype=torch.uint8)
        mean, std = [0.5] * channels, [0.2] * channels
        assert torch.equal(photometric(crops, grey_only, mean, std), normalize(crops, mean, std))
        jittered = photometric(crops, PhotometricPolicy(jitter=1.0, grayscale=0.0), mean, std)
        assert jittered.shape == crops.shape and torch.isfinite(jittered).all()
        assert not torch.equal(jittered, normalize(crops, mean, std)), "brightness and contrast still apply"
    rgb = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    grey = photometric(rgb, grey_only, [0.5] * 3, [0.2] * 3)
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 1], grey[:, 2])
    with pytest.raises(ValueError, match="3 mean and 3 std values for images of 4 channels"):
        normalize(torch.zeros(1, 4, 2, 2, dtype=torch.uint8), [0.5] * 3, [0.2] * 3)


def test_extract_and_visualize_read_n_channel_images(tmp_path):
    from opendino.cli import main

    folder = _tif_folder(tmp_path / "tifs", 5, n=3, size=32)
    model = build_model("vits16", embed_dim=32, depth=2, num_heads=2, in_chans=5)
    save_model(model, tmp_path / "bare.safetensors")
    with pytest.raises(ValueError, match="5 input channels and records no normalisation"):
        normalisation(load_model(tmp_path / "bare.safetensors"))
    model.input_normalisation = ((0.5,) * 5, (0.2,) * 5)
    save_model(model, tmp_path / "five.safetensors")
    assert normalisation(load_model(tmp_path / "five.safetensors")) == model.input_normalisation
    out = tmp_path / "features.safetensors"
    assert (
        main(["extract", str(tmp_path / "five.safetensors"), str(folder), "--out", str(out), "--resolution", "32"]) == 0
    )
    from safetensors.torch import load_file

    assert load_file(str(out))["cls"].shape == (3, 32)
    pictures = tmp_path / "pictures"
    args = ["visualize", str(tmp_path / "five.safetensors"), str(folder), "--out", str(pictures)]
    assert main([*args, "--resolution", "32", "--view", "4,2,0"]) == 0
    assert len(list(pictures.glob("*.png"))) == 3
    twin = folder / "twin"  # an image of the same name in a sub-folder gets its own picture
    twin.mkdir()
    (twin / "img0.tif").write_bytes((folder / "img0.tif").read_bytes())
    assert main([*args, "--resolution", "32"]) == 0 and len(list(pictures.glob("*.png"))) == 4
    assert main([*args, "--resolution", "32", "--view", "5,2,0"]) == 2


def test_recipes_that_cannot_take_other_channels_say_so(tmp_path):
    four = ["model.in_chans=4", "crops.mean=[0.5,0.5,0.5,0.5]", "crops.std=[0.2,0.2,0.2,0.2]", "monitor.every=0"]
    with pytest.raises(ConfigError, match="the text recipe aligns RGB image backbones"):
        load_train_config(REPO / "configs" / "text" / "demo.yaml", [*four, "init.backbone=x"])
    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump(TINY))
    teacher = tmp_path / "teacher"
    Trainer(load_train_config(preset, [f"run.dir={teacher}", "train.steps=1"])).run()
    folder = _tif_folder(tmp_path / "tifs", 4)
    student = [
        f"run.dir={tmp_path / 'student'}",
        f"distill.teacher={teacher}",
        "data.source=null",
        f"data.path={folder}",
    ]
    cfg = load_train_config(preset, [*student, *four])
    with pytest.raises(ConfigError, match="takes 3 input channels and the students model.in_chans=4"):
        Trainer(cfg).run()


def test_the_gram_anchor_to_the_start_takes_the_same_blocks(tmp_path):
    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump(TINY))
    deep = build_model("vit_small", **{**TINY["model"]["kwargs"], "depth": 3})
    save_model(deep, tmp_path / "deep.safetensors")
    overrides = [
        f"run.dir={tmp_path / 'run'}",
        f"init.backbone={tmp_path / 'deep.safetensors'}",
        "init.backbone_blocks=[2,0]",
        "gram.enabled=true",
        "gram.checkpoint=init",
        "train.steps=1",
    ]
    trainer = Trainer(load_train_config(preset, overrides))
    trainer.setup()
    recipe = trainer.members[0].recipe
    assert all(
        torch.equal(v, recipe.teacher.backbone.state_dict()[k]) for k, v in recipe.gram_teacher.state_dict().items()
    )
    assert torch.equal(recipe.gram_teacher.blocks[0].attn.qkv.weight, deep.blocks[2].attn.qkv.weight)


def test_eval_of_an_n_channel_model_on_an_n_channel_folder(tmp_path):
    from opendino.eval.suite import evaluate

    for split in ("train", "val"):
        for name in ("a", "b"):
            _tif_folder(tmp_path / "data" / split / name, 4, n=4, size=32)
    model = build_model("vits16", embed_dim=32, depth=2, num_heads=2, in_chans=4)
    model.input_normalisation = ((0.5,) * 4, (0.25,) * 4)
    save_model(model, tmp_path / "four.safetensors")
    results = evaluate(
        tmp_path / "four.safetensors",
        data=str(tmp_path / "data"),
        tasks=("knn",),
        out=tmp_path / "eval",
        resolution=32,
        progress=False,
        log=lambda _: None,
        baselines=["pixels"],
    )
    assert results["meta"]["n_train"] == 8 and results["meta"]["n_val"] == 8
    assert set(results["pixels"]["knn"]) == set(results["trained"]["knn"])
    assert (tmp_path / "eval" / "report.md").exists()


@pytest.mark.slow
def test_the_adaptation_experiment_runs_every_arm(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "experiment"
    cmd = [sys.executable, str(REPO / "benchmarks" / "adapt_experiment.py"), "--quick", "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=REPO, timeout=900, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    results = json.loads((out / "results.json").read_text())
    assert sorted(results) == ["adapted + Gram to start|0", "adapted|0", "from scratch|0"]
