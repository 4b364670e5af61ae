"""Backbone behaviour beyond the fixtures: sizes, registry, initialisation, API and training paths."""

from __future__ import annotations

import math

import pytest
import torch

from opendino.models import MODELS, ConvNeXt, DinoVisionTransformer, build_model, get_spec, load_model
from opendino.models.registry import UnknownModelError
from opendino.models.vit import drop_path_subsets, swiglu_hidden_dim

# Parameter counts computed analytically from the official module definitions (docs/design/recipe.md §1.9, §1.11).
OFFICIAL_PARAMS = {
    "vits16": 21_601_152,
    "vits16plus": 28_697_472,
    "vitb16": 85_669_632,
    "vitl16": 303_154_176,
    "vitl16_sat493m": 303_156_224,
    "vitl16plus": 403_915_776,
    "vith16plus": 840_633_600,
    "vit7b16": 6_716_043_264,
    "convnext_tiny": 27_820_128,
    "convnext_small": 49_454_688,
    "convnext_base": 87_566_464,
    "convnext_large": 196_230_336,
}


def tiny_vit(**overrides) -> DinoVisionTransformer:
    kwargs = dict(
        embed_dim=64,
        depth=2,
        num_heads=4,
        ffn_layer="swiglu",
        norm_layer="layernormbf16",
        layerscale_init=1e-5,
        n_storage_tokens=4,
        mask_k_bias=True,
        pos_embed_rope_dtype="fp32",
    )
    return DinoVisionTransformer(**{**kwargs, **overrides})


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_named_models_have_official_parameter_counts(name):
    model = build_model(name, device="meta")
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[name]


def reduced_size(family: str, kwargs) -> dict:
    """Constructor overrides that shrink a named architecture to a few blocks of small width and keep all
    else (RoPE settings, storage tokens, FFN type and ratio, biases, masked-key bias, norms, untied norms)."""
    if family in ("vit", "dinov2"):
        return dict(embed_dim=64, num_heads=4, depth=2)
    assert family == "convnext", f"no reduced size for family {family!r}"
    # Relative widths and the deeper third stage of the larger ConvNeXts stay.
    return dict(dims=[d // 8 for d in kwargs["dims"]], depths=[max(1, d // 9) for d in kwargs["depths"]])


@pytest.mark.parametrize("name", list(MODELS))
def test_every_named_architecture_builds_runs_two_resolutions_and_trains(name):
    """timm-style registry test, at reduced width and depth. In training mode with the student's list call
    (a masked global crop group, a local one) every parameter gets a gradient: mask_token only through the
    masked crops, local_cls_norm only through the local group in training; none is left out."""
    spec = get_spec(name)
    overrides = reduced_size(spec.family, spec.kwargs)
    torch.manual_seed(0)
    model = build_model(name, **overrides)
    assert {k: v for k, v in model.model_kwargs.items() if k not in overrides} == {
        k: v for k, v in spec.kwargs.items() if k not in overrides
    }
    g = torch.Generator().manual_seed(1)
    model.train()
    if spec.family in ("vit", "dinov2"):
        D = overrides["embed_dim"]
        R = spec.kwargs.get("n_storage_tokens", spec.kwargs.get("num_register_tokens", 0))
        grids = [(4, 3), (2, 2)]  # 64x48 global crops, 32x32 local crops
        xs = [torch.randn(2, 3, 16 * h, 16 * w, generator=g) for h, w in grids]
        masks = torch.zeros(2, 12, dtype=torch.bool)
        masks[:, ::3] = True
        outs = model.forward_features(xs, masks=[masks, None])
        for out, (h, w) in zip(outs, grids, strict=True):
            assert out["x_norm_clstoken"].shape == (2, D)
            assert out["x_storage_tokens"].shape == (2, R, D)
            assert out["x_norm_patchtokens"].shape == (2, h * w, D)
            assert out["x_prenorm"].shape == (2, 1 + R + h * w, D)
        parts = ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens")
        tensors = [out[k] for out in outs for k in parts]
    else:
        D = overrides["dims"][-1]
        grids = [(2, 2), (3, 2)]  # 64x64 and 96x64 at stride 32
        xs = [torch.randn(2, 3, 32 * h, 32 * w, generator=g) for h, w in grids]
        tensors = []
        for x, (h, w) in zip(xs, grids, strict=True):
            out = model.forward_features(x)
            (fmap,) = model.get_intermediate_layers(x, n=1, reshape=True)
            assert fmap.shape == (2, D, h, w)
            assert out["x_norm_clstoken"].shape == (2, D)
            assert out["x_norm_patchtokens"].shape == (2, h * w, D)
            tensors += [out["x_norm_clstoken"], out["x_norm_patchtokens"], fmap]
    assert all(torch.isfinite(t).all() for t in tensors)
    loss = sum((t.float() * torch.randn(t.shape, generator=g)).sum() for t in tensors)
    loss.backward()
    params = dict(model.named_parameters())
    assert params and all(p.requires_grad for p in params.values())
    missing = [n for n, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for p in params.values())
    model.eval()
    with torch.no_grad():
        for x in xs:
            assert model(x).shape == (2, D)


def test_swiglu_hidden_examples_from_the_recipe():
    assert swiglu_hidden_dim(int(384 * 6), 8) == 1536  # S+
    assert swiglu_hidden_dim(int(4096 * 3), 64) == 8192  # 7B
    assert swiglu_hidden_dim(int(1024 * 4), 64) == 2752  # dino.txt vision head
    assert swiglu_hidden_dim(int(64 * 4), 8) == 176  # the tiny fixture model


def test_every_named_model_knows_its_normalisation():
    assert get_spec("vitl16_sat493m").mean == (0.430, 0.411, 0.296)
    assert get_spec("vitb16").std == (0.229, 0.224, 0.225)
    assert all(len(spec.mean) == 3 and len(spec.std) == 3 for spec in MODELS.values())


def test_unknown_model_name_suggests_close_names(tmp_path):
    with pytest.raises(UnknownModelError, match="vits16"):
        build_model("vit16s")
    with pytest.raises(UnknownModelError, match="vits16"):
        load_model("vit16s")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):  # a path, not a name
        load_model(tmp_path / "teacher.safetensors")


def test_custom_size_overrides():
    model = build_model("vits16", embed_dim=96, num_heads=2, depth=3)
    assert model.embed_dim == 96 and len(model.blocks) == 3
    assert model.rope_embed.periods.numel() == 96 // 2 // 4


def test_official_initialisation():
    torch.manual_seed(0)
    model = tiny_vit()
    assert torch.all(model.mask_token == 0)
    mask = model.blocks[0].attn.qkv.bias_mask
    assert torch.equal(mask, torch.tensor([1.0] * 64 + [0.0] * 64 + [1.0] * 64))
    assert torch.allclose(model.blocks[0].ls1.gamma, torch.full((64,), 1e-5))
    assert torch.allclose(model.rope_embed.periods, 100 ** (torch.arange(4) / 4))
    bound = 1 / math.sqrt(3 * 16 * 16)
    assert model.patch_embed.proj.weight.abs().max() <= bound
    assert 0.015 < model.blocks[0].attn.qkv.weight.std() < 0.025


def test_key_bias_is_masked():
    model = tiny_vit().eval()
    x = torch.randn(1, 3, 32, 32)
    before = model(x)
    with torch.no_grad():
        model.blocks[0].attn.qkv.bias[64:128] += 5.0  # the K third: must have no effect
    assert torch.equal(model(x), before)
    with torch.no_grad():
        model.blocks[0].attn.qkv.bias[:64] += 5.0  # the Q third: must change the output
    assert not torch.allclose(model(x), before)


@pytest.mark.parametrize("hw", [(64, 64), (48, 80), (70, 37)])
def test_any_input_size_floor_crops_to_patches(hw):
    model = tiny_vit().eval()
    x = torch.randn(2, 3, *hw)
    out = model.forward_features(x)
    h, w = hw[0] // 16, hw[1] // 16
    assert out["x_norm_patchtokens"].shape == (2, h * w, 64)
    # The remainder rows/columns are ignored: cropping them away gives the same result.
    cropped = model.forward_features(x[..., : h * 16, : w * 16])
    assert torch.equal(out["x_norm_patchtokens"], cropped["x_norm_patchtokens"])
    (fmap,) = model.get_intermediate_layers(x, n=1, reshape=True)
    assert fmap.shape == (2, 64, h, w)


def test_list_forward_matches_separate_forwards_in_eval():
    model = tiny_vit(untie_global_and_local_cls_norm=True).eval()
    xg, xl = torch.randn(2, 3, 64, 64), torch.randn(3, 3, 32, 32)
    g, loc = model.forward_features([xg, xl])
    assert torch.allclose(g["x_norm_patchtokens"], model.forward_features(xg)["x_norm_patchtokens"], atol=1e-6)
    # In eval the local-crop norm is unused: the local list entry equals a plain forward.
    assert torch.allclose(loc["x_norm_clstoken"], model.forward_features(xl)["x_norm_clstoken"], atol=1e-6)


def test_local_cls_norm_is_used_for_local_crops_in_training_only():
    model = tiny_vit(untie_global_and_local_cls_norm=True, pos_embed_rope_rescale_coords=None).train()
    with torch.no_grad():
        model.local_cls_norm.weight.mul_(3.0)
    xg, xl = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 32, 32)
    _, loc = model.forward_features([xg, xl])
    single = model.forward_features(xl)
    assert torch.allclose(loc["x_norm_patchtokens"], single["x_norm_patchtokens"], atol=1e-6)
    assert torch.allclose(loc["x_norm_clstoken"], 3 * single["x_norm_clstoken"] - 2 * model.norm.bias, atol=1e-5)


def test_rope_rescale_is_drawn_per_block_and_crop_group_in_training():
    model = tiny_vit(pos_embed_rope_rescale_coords=2.0).train()
    seen = []  # the sine table each block receives, per crop group
    for block in model.blocks:
        block.register_forward_pre_hook(lambda _, args: seen.append([sin for sin, _ in args[1]]))
    model.forward_features([torch.randn(1, 3, 64, 64), torch.randn(1, 3, 32, 32)])  # grids 4x4, 2x2
    tables = [t for per_group in seen for t in per_group]
    assert len(tables) == 2 * len(model.blocks)
    assert all(not torch.equal(a, b) for i, a in enumerate(tables) for b in tables[i + 1 :] if a.shape == b.shape)
    model.eval()
    seen.clear()
    calls = []
    original = model.rope_embed.draw_augmentations
    model.rope_embed.draw_augmentations = lambda n: calls.append(n) or original(n)
    model.forward_features(torch.randn(1, 3, 32, 32))
    assert not calls  # the teacher (eval mode) never gets the augmentation
    assert all(torch.equal(per_group[0], seen[0][0]) for per_group in seen)


def test_batched_rope_draws_equal_successive_single_draws():
    model = tiny_vit(pos_embed_rope_rescale_coords=2.0, pos_embed_rope_jitter_coords=1.5).train()
    rope = model.rope_embed
    torch.manual_seed(3)
    shift, scale = rope.draw_augmentations(4)
    sin, cos = rope(4, 4, shift, scale)
    torch.manual_seed(3)
    singles = [rope(4, 4) for _ in range(4)]
    assert torch.allclose(sin, torch.stack([s for s, _ in singles]), atol=1e-6)
    assert torch.allclose(cos, torch.stack([c for _, c in singles]), atol=1e-6)
    assert not torch.allclose(sin[0], sin[1])


def test_masked_tokens_are_replaced_by_the_mask_token():
    model = tiny_vit().eval()
    with torch.no_grad():
        model.mask_token.normal_()
    x = torch.randn(2, 3, 32, 32)
    masks = torch.tensor([[True, False, False, False], [False] * 4])
    a = model.forward_features(x, masks=masks)
    b = model.forward_features(x)
    assert not torch.allclose(a["x_norm_clstoken"][0], b["x_norm_clstoken"][0])
    assert torch.allclose(a["x_norm_clstoken"][1], b["x_norm_clstoken"][1], atol=1e-6)


def test_stochastic_depth_uses_a_batch_subset_and_rescales():
    torch.manual_seed(0)
    model = tiny_vit(drop_path_rate=0.5).train()
    block = model.blocks[0]
    x = torch.randn(8, 5, 64)
    seen = []
    subsets = drop_path_subsets([8], 0.5, 1, x.device)[0]
    out = block._residual([x], lambda xs: seen.append(xs[0].shape[0]) or [torch.ones_like(xs[0])], subsets)
    assert seen == [4]  # max(int(8 * (1 - 0.5)), 1) samples get the branch
    changed = (out[0] - x).abs().amax(dim=(1, 2))
    assert sorted(changed.tolist()) == pytest.approx([0.0] * 4 + [2.0] * 4)  # scaled by 8 / 4


def test_drop_path_subsets_are_uniform_distinct_rows_drawn_per_branch_and_group():
    torch.manual_seed(0)
    draws = drop_path_subsets([10, 40], 0.3, 2000, torch.device("cpu"))
    assert len(draws) == 2000 and all(len(d) == 2 for d in draws)
    assert {len(d[0]) for d in draws} == {7} and {len(d[1]) for d in draws} == {28}  # int(B * 0.7)
    assert all(len(set(d[1].tolist())) == 28 for d in draws)  # distinct rows
    assert len({tuple(d[0].tolist()) for d in draws}) > 1900  # a fresh draw for every branch
    # every row is kept with probability 0.7, for every position of the batch
    counts = torch.bincount(torch.cat([d[0] for d in draws]), minlength=10) / 2000
    assert torch.allclose(counts, torch.full((10,), 0.7), atol=0.04)


def test_training_forward_applies_stochastic_depth_and_eval_does_not():
    model = tiny_vit(drop_path_rate=0.5, layerscale_init=1.0)  # no RoPE augmentation: only drop path draws
    x = torch.randn(4, 3, 32, 32)
    model.train()
    a, b = (model.forward_features(x)["x_norm_clstoken"] for _ in range(2))
    assert not torch.allclose(a, b)  # different subsets skip the branches
    model.eval()
    c, d = (model.forward_features(x)["x_norm_clstoken"] for _ in range(2))
    assert torch.equal(c, d)


def test_rmsnorm_and_min_max_periods_build_and_run():
    model = tiny_vit(
        norm_layer="rmsnorm", pos_embed_rope_base=None, pos_embed_rope_min_period=0.5, pos_embed_rope_max_period=50.0
    ).eval()
    assert model.rope_embed.periods[0].item() == pytest.approx(0.5)
    assert model.rope_embed.periods[-1].item() == pytest.approx(50.0)
    assert torch.isfinite(model(torch.randn(1, 3, 32, 32))).all()


@pytest.mark.parametrize(
    "bad", [dict(norm_layer="batchnorm"), dict(ffn_layer="moe"), dict(pos_embed_rope_dtype="fp8"), dict(num_heads=3)]
)
def test_bad_constructor_arguments_are_clear_errors(bad):
    with pytest.raises(ValueError):
        tiny_vit(**bad)


def test_intermediate_layers_bad_indices():
    with pytest.raises(ValueError, match="out of range"):
        tiny_vit().get_intermediate_layers(torch.randn(1, 3, 32, 32), n=[5])


def test_convnext_duplicate_final_norm_and_patch_grid():
    model = ConvNeXt(depths=[1, 1, 1, 1], dims=[8, 16, 24, 32], patch_size=16).eval()
    keys = model.state_dict().keys()
    assert {"norm.weight", "norms.3.weight"} <= set(keys)
    x = torch.randn(1, 3, 96, 64)
    outs = model.get_intermediate_layers(x, n=4, reshape=True)
    assert [o.shape[-2:] for o in outs] == [(6, 4)] * 4
    assert model.forward_features(x)["x_norm_patchtokens"].shape == (1, 3 * 2, 32)
