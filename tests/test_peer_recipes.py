"""The peer recipes in the harness: I-JEPA (recipes/ijepa.py), the DINOv2 options (softmax centring, a
shared head, a weight-normalised prototype layer) and Franca-style nested heads of the SSL recipe, Gram
anchoring on I-JEPA; each demo preset trains, resumes exactly after kill -9, runs on 2 gloo ranks and is
read by ``opendino eval``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from opendino.cli import main
from opendino.config import ConfigError
from opendino.data.pipeline import DataPipeline, open_training_source
from opendino.losses import dino_loss
from opendino.models import load_model
from opendino.models.heads import DINOHead, MatryoshkaHead, WeightNormLinear
from opendino.recipes import recipe_class
from opendino.recipes import ssl as ssl_module
from opendino.recipes.gram import GramAnchor, GramConfig
from opendino.recipes.ijepa import IJEPARecipe
from opendino.recipes.ssl import SSLRecipe
from opendino.train.config import load_train_config
from opendino.train.logging import read_metrics
from opendino.train.trainer import Trainer
from tests.conftest import REPO, torchrun_train, train_then_kill_9

# Each demo preset at test size: the same recipe settings, a tiny world, model and run.
SMALL = [
    "data.synthetic_n=48",
    "data.synthetic_size=32",
    "crops.global_size=32",
    "crops.local_size=16",
    "train.batch_size=4",
    "train.epoch_length=4",
    "optim.epochs=2",
    "checkpoint.every=3",
    "log.every=1",
    "log.progress=false",
    "log.tensorboard=false",
]
MODELS = {
    "ijepa": [
        "model.kwargs={embed_dim: 32, depth: 2, num_heads: 2, patch_size: 4, global_pool: avg}",
        "ijepa.predictor_dim=16",
        "ijepa.predictor_depth=1",
        "ijepa.min_keep=4",
    ],
    "dinov2": ["model.kwargs={embed_dim: 32, depth: 2, num_heads: 2, img_size: 32, patch_size: 8}"],
    "franca": ["model.kwargs={embed_dim: 32, depth: 2, num_heads: 2, layerscale_init: 0.3}"],
}
HEADS = [
    "dino_head.hidden_dim=32",
    "dino_head.bottleneck_dim=16",
    "ibot_head.hidden_dim=32",
    "ibot_head.bottleneck_dim=16",
]
TIMING = {"images_per_s"}


def _overrides(recipe: str, run: Path, *more: str) -> list[str]:
    return [*SMALL, *MODELS[recipe], *([] if recipe == "ijepa" else HEADS), f"run.dir={run}", *more]


def _preset(recipe: str) -> Path:
    return REPO / "configs" / recipe / "demo.yaml"


def _values(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run)]


# -- the demo presets as runs -------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["ijepa", "dinov2", "franca"])
def test_a_demo_preset_resumes_after_kill_9_with_the_uninterrupted_metrics(recipe, tmp_path):
    steps = ["train.steps=8"]
    reference = tmp_path / "reference"
    Trainer(load_train_config(_preset(recipe), _overrides(recipe, reference, *steps))).run()
    run = tmp_path / "killed"
    overrides = _overrides(recipe, run, *steps)
    # past the first checkpoint (step 3)
    assert train_then_kill_9(_preset(recipe), run, overrides, 5) < 8, "the run finished before it could be killed"
    Trainer(load_train_config(_preset(recipe), _overrides(recipe, run, *steps))).run()
    assert _values(run) == _values(reference)
    a = load_model(run / "teacher.safetensors").state_dict()
    b = load_model(reference / "teacher.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "recipe, data_parallel", [("ijepa", "ddp"), ("ijepa", "fsdp"), ("dinov2", "ddp"), ("franca", "ddp")]
)
def test_a_demo_preset_runs_on_two_gloo_ranks_and_its_run_resumes_on_one(recipe, data_parallel, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    run = tmp_path / data_parallel
    parallel = [f"parallel.data_parallel={data_parallel}", "parallel.param_dtype=fp32"]
    torchrun_train(
        _preset(recipe), run, *_overrides(recipe, run, "train.steps=3", "model.drop_path_rate=0.0", *parallel)
    )
    records = read_metrics(run)
    assert [r["step"] for r in records] == [0, 1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    overrides = _overrides(recipe, run, "train.steps=5", "model.drop_path_rate=0.0", "train.batch_size=8")
    Trainer(load_train_config(_preset(recipe), overrides)).run()
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2, 3, 4]


def test_dinov2_and_franca_runs_on_two_ranks_equal_one_process(tmp_path, monkeypatch):
    """The SSL recipe's options keep its data-parallel exactness (softmax centres are all-reduced)."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    same = ["train.steps=3", "model.drop_path_rate=0.0", "loss.koleo_group_size=-1"]
    # DINOv2 starts its CLS token at std 1e-6: the CLS outputs of all images are nearly equal, and KoLeo's
    # -log(distance) turns the rounding of batch-4 vs batch-8 matmuls into a different step 2 (its weight
    # 0 here: the rest of the loss then matches to 1e-6).
    per_recipe = {"dinov2": ["loss.koleo_weight=0"], "franca": []}
    for recipe, extra in per_recipe.items():
        single = tmp_path / f"{recipe}-single"
        overrides = _overrides(recipe, single, *same, *extra, "train.batch_size=8")
        Trainer(load_train_config(_preset(recipe), overrides)).run()
        ranks = tmp_path / f"{recipe}-ranks"
        torchrun_train(_preset(recipe), ranks, *_overrides(recipe, ranks, *same, *extra))
        for a, b in zip(read_metrics(ranks), read_metrics(single), strict=True):
            for key in ("loss", "dino_global", "ibot", "grad_norm_backbone"):
                assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(b[key])), (recipe, a["step"], key)


@pytest.mark.parametrize("recipe", ["ijepa", "franca"])
def test_opendino_eval_reads_a_peer_recipes_run(recipe, tmp_path):
    run = tmp_path / "run"
    Trainer(load_train_config(_preset(recipe), _overrides(recipe, run, "train.steps=2"))).run()
    out = tmp_path / "eval"
    args = ["eval", str(run), "--out", str(out), "--n-train", "24", "--n-val", "12", "--tasks", "knn,seg"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["trained"]) == {"knn", "seg"} and set(results["random_init"]) == {"knn", "seg"}


# Backbone sizes of the full-scale presets (built on the meta device): the released DINOv2 counts less the
# position embeddings beyond the 224-px grid (1370 - 257 rows) -- ViT-L/14 trained with SwiGLU (hidden 2736:
# 17,760 more parameters per block than the released MLP) --, the I-JEPA ViT-H/14 (~630.4M without our CLS
# and mask tokens), the DINOv3 7B's width for Web-DINO.
FULL_SCALE = {
    "dinov2/vitl14.yaml": (304_368_640 - (1370 - 257) * 1024 + 24 * 17_760, 0),
    "dinov2/vitg14.yaml": (1_136_480_768 - (1370 - 257) * 1536, 0),
    "dinov2/webdino_7b.yaml": (6.7e9, 0.05e9),
    "ijepa/vith14_in1k.yaml": (630.4e6, 0.3e6),
    "franca/vitl14.yaml": (303.7e6, 0.1e6),
}


@pytest.mark.parametrize("preset", sorted(FULL_SCALE))
def test_the_full_scale_presets_build_the_published_geometries(preset):
    cfg = load_train_config(REPO / "configs" / preset)
    with torch.device("meta"):
        recipe = recipe_class(cfg.train.recipe).from_config(cfg)
    count = sum(p.numel() for p in recipe.export_module().parameters())
    expected, tolerance = FULL_SCALE[preset]
    assert abs(count - expected) <= tolerance, (preset, count)


# -- I-JEPA -------------------------------------------------------------------------------------


def _ijepa(tmp_path: Path, *more: str) -> tuple[IJEPARecipe, dict]:
    cfg = load_train_config(_preset("ijepa"), _overrides("ijepa", tmp_path / "run", *more))
    recipe = IJEPARecipe.from_config(cfg)
    pipeline = DataPipeline(cfg.data, cfg.crops, recipe.data_needs(), 4, seed=0)
    batch = next(pipeline.batches(open_training_source(cfg.data), 0))
    return recipe, batch


def test_ijepa_trains_context_encoder_and_predictor_never_the_target(tmp_path):
    recipe, batch = _ijepa(tmp_path)
    recipe.before_step(0)
    loss, terms = recipe(batch)
    loss.backward()
    assert torch.isfinite(loss) and set(terms) == {"ijepa"}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in recipe.student.predictor.parameters())
    assert recipe.student.backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in recipe.target.parameters())
    assert recipe.export_module() is recipe.target


def test_the_context_encoder_on_every_patch_is_the_whole_network_and_drop_path_follows_the_rows(tmp_path):
    recipe, batch = _ijepa(tmp_path, "model.drop_path_rate=0.5")
    backbone = recipe.target  # eval mode: no stochastic depth
    images = batch["global"]
    every = torch.arange(64).expand(images.shape[0], -1)
    kept = backbone.forward_kept(images, every)["x_norm_patchtokens"]
    assert torch.allclose(kept, backbone(images, is_training=True)["x_norm_patchtokens"], atol=1e-5)
    some = torch.stack([torch.randperm(64)[:20].sort().values for _ in range(images.shape[0])])
    alone = backbone.forward_kept(images[:1], some[:1])["x_norm_patchtokens"]
    assert torch.allclose(backbone.forward_kept(images, some)["x_norm_patchtokens"][:1], alone, atol=1e-5)
    recipe.before_step(0)  # the student in train mode: stochastic depth on a subset of the rows
    loss, _ = recipe(batch)
    loss.backward()
    assert torch.isfinite(loss)


def test_ijepa_masks_follow_the_step_and_the_micro_batch_only(tmp_path):
    recipe, _ = _ijepa(tmp_path)
    cpu = torch.device("cpu")

    def same(x, y):
        return all(u.shape == v.shape and torch.equal(u, v) for u, v in zip(x, y, strict=True))

    recipe.before_step(5)
    a, second = recipe.draw_masks(4, (8, 8), cpu), recipe.draw_masks(4, (8, 8), cpu)  # micro-batches 0 and 1
    recipe.before_step(5)
    assert same(recipe.draw_masks(4, (8, 8), cpu), a) and same(recipe.draw_masks(4, (8, 8), cpu), second)
    assert not same(a, second), "each micro-batch of a step (train.accumulate) has its own masks"
    recipe.before_step(6)
    assert not same(recipe.draw_masks(4, (8, 8), cpu), a)


def test_the_ijepa_target_is_the_layer_normalised_ema_feature_and_l2_is_an_option(tmp_path):
    recipe, batch = _ijepa(tmp_path, "ijepa.loss=l2")
    recipe.before_step(0)
    # a predictor that outputs the targets makes the loss zero
    full = recipe.target(batch["global"], is_training=True)["x_norm_patchtokens"]
    wanted = torch.nn.functional.layer_norm(full, full.shape[-1:])

    def oracle(patches, context, targets, grid):
        return wanted.gather(1, targets.flatten(1)[..., None].expand(-1, -1, wanted.shape[-1])).unflatten(
            1, targets.shape[1:]
        )

    recipe.student.predictor.forward = oracle
    loss, _ = recipe(batch)
    assert loss.item() < 1e-10


def test_gram_anchoring_on_ijepa_is_zero_when_student_equals_teacher_and_trains_otherwise(tmp_path):
    # The Gram loss at given positions: zero for the teacher's own features there, positive otherwise.
    teacher = torch.nn.Identity()
    teacher.feature_stride = 4
    anchor = GramAnchor(GramConfig(enabled=True, ema_teacher=True), teacher, None)
    full = torch.randn(4, 64, 16)
    positions = torch.stack([torch.randperm(64)[:20].sort().values for _ in range(4)])
    batch = {"global": torch.zeros(4, 3, 32, 32)}
    own = full.gather(1, positions[..., None].expand(-1, -1, 16))
    assert anchor.loss(own, batch, full, positions=positions).item() < 1e-10
    assert anchor.loss(own + 0.5 * torch.randn_like(own), batch, full, positions=positions).item() > 1e-3
    # ... and in the recipe, with a Gram teacher of its own on the larger crops
    recipe, batch = _ijepa(tmp_path, "gram.enabled=true")
    recipe.start_fresh(lambda _: None)  # the Gram teacher starts as the target encoder
    assert all(
        torch.equal(a, b) for a, b in zip(recipe.gram_teacher.parameters(), recipe.target.parameters(), strict=False)
    )
    recipe.before_step(0)
    loss, terms = recipe(batch)
    loss.backward()
    assert "gram" in terms and torch.isfinite(terms["gram"]) and terms["gram"] > 0
    assert all(p.grad is None for p in recipe.gram_teacher.parameters())


@pytest.mark.parametrize(
    "override, message",
    [
        ("ijepa.loss=l1", "ijepa.loss"),
        ("ijepa.target_scale=[0.3,0.2]", "ijepa.target_scale"),
        ("gram.tokens_used=masked", "gram.tokens_used"),
    ],
)
def test_ijepa_configuration_errors_are_clear(tmp_path, override, message):
    overrides = _overrides("ijepa", tmp_path / "run", override)
    if override.startswith("gram."):
        overrides += ["gram.img_level=false", "gram.enabled=true"]
    with pytest.raises(ConfigError, match=message):
        load_train_config(_preset("ijepa"), overrides)


# -- DINOv2 and Franca options of the SSL recipe ------------------------------------------------


@pytest.mark.parametrize("mode", ["projection", "prefix"])
def test_every_nested_level_receives_gradient_and_has_its_own_prototypes(mode):
    head = MatryoshkaHead(32, 64, levels=3, mode=mode, hidden_dim=16, bottleneck_dim=8, normalize=False)
    assert head.dims == [8, 16, 32] and head.level_sizes == [16, 32, 64]
    x = torch.randn(5, 32, requires_grad=True)
    logits = head(x)
    assert logits.shape == (5, 112)
    for level, part in enumerate(logits.split(head.level_sizes, -1)):
        x.grad = None
        head.zero_grad()
        part.square().sum().backward(retain_graph=True)
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.heads[level].parameters())
        assert all(
            p.grad is None or p.grad.abs().sum() == 0
            for i, h in enumerate(head.heads)
            if i != level
            for p in h.parameters()
        )
        if mode == "prefix":  # level i reads the first d_i features only
            d = head.dims[level]
            assert x.grad[:, :d].abs().sum() > 0 and (level == 2 or x.grad[:, d:].abs().sum() == 0)


def test_the_weight_normalised_prototype_layer_has_unit_row_norms_at_start():
    layer = WeightNormLinear(8, 6)
    layer.reset_parameters(0.3)
    weight = layer.weight_g * layer.weight_v / layer.weight_v.norm(dim=1, keepdim=True)
    assert torch.allclose(weight.norm(dim=1), torch.ones(6))
    assert torch.allclose(layer(torch.eye(8)), weight.T)
    head = DINOHead(8, 6, hidden_dim=8, bottleneck_dim=4, weight_norm=True)
    assert {"last_layer.weight_g", "last_layer.weight_v"} <= set(head.state_dict())


def test_softmax_centring_uses_the_previous_batches_centre_and_a_shared_head(tmp_path):
    cfg = load_train_config(_preset("dinov2"), _overrides("dinov2", tmp_path / "run"))
    assert cfg.loss.centering == "softmax" and cfg.loss.shared_head
    recipe = SSLRecipe.from_config(cfg)
    assert recipe.student.ibot_head is None and not any(k.startswith("student.ibot_head") for k in recipe.state_dict())
    assert "centers.dino.center" in recipe.state_dict()
    logits = torch.randn(8, cfg.dino_head.prototypes)
    before = recipe.centers["dino"].center.clone()
    probs = recipe._targets("dino", 0, logits, 0.05)
    assert torch.allclose(probs, torch.softmax((logits - before) / 0.05, -1))
    pipeline = DataPipeline(cfg.data, cfg.crops, recipe.data_needs(), 4, seed=0)
    batch = next(pipeline.batches(open_training_source(cfg.data), 0))
    recipe.before_step(0)
    loss, _ = recipe(batch)
    assert torch.isfinite(loss) and not torch.equal(recipe.centers["dino"].center, before)


def test_nested_heads_sum_one_loss_per_level(tmp_path, monkeypatch):
    cfg = load_train_config(_preset("franca"), _overrides("franca", tmp_path / "run"))
    recipe = SSLRecipe.from_config(cfg)
    assert recipe.student.dino_head.level_sizes == [64, 128, 256]
    pipeline = DataPipeline(cfg.data, cfg.crops, recipe.data_needs(), 4, seed=0)
    batch = next(pipeline.batches(open_training_source(cfg.data), 0))
    recipe.before_step(0)
    calls = []

    def counted(student, teacher, *args, **kwargs):
        calls.append(student.shape[-1])
        return dino_loss(student, teacher, *args, **kwargs)

    monkeypatch.setattr(ssl_module, "dino_loss", counted)
    loss, terms = recipe(batch)
    assert torch.isfinite(loss)
    assert sorted(calls) == [64, 64, 128, 128, 256, 256]  # local and global term of each level
    with pytest.raises(ConfigError, match="divisible"):
        load_train_config(_preset("franca"), _overrides("franca", tmp_path / "r", "dino_head.prototypes=250"))


def test_features_of_a_mean_pooled_model_are_not_the_cached_ones_of_its_cls_twin():
    from opendino.eval.features import model_fingerprint
    from opendino.models import build_model

    torch.manual_seed(0)
    token = build_model("vit_small", embed_dim=32, depth=1, num_heads=2)
    pooled = build_model("vit_small", embed_dim=32, depth=1, num_heads=2, global_pool="avg")
    pooled.load_state_dict(token.state_dict())
    assert model_fingerprint(token) != model_fingerprint(pooled)
