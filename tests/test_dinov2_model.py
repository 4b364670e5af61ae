"""The DINOv2 backbone variant: timm parity, the released key layout, loading, resampling, masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from opendino.models import DinoV2VisionTransformer, build_model, get_spec, load_model, save_model
from opendino.models.checkpoint import _flatten_block_chunks, infer_model_kwargs, read_checkpoint

TOL = 1e-5
DINOV2_NAMES = [f"dinov2_vit{s}14{r}" for s in "sblg" for r in ("", "_reg4")]
WIDTHS = {"s": 384, "b": 768, "l": 1024, "g": 1536}


def _perturb(model: DinoV2VisionTransformer, seed: int = 0) -> DinoV2VisionTransformer:
    """Moves every weight off its init so that LayerScale, biases, tokens and positions all matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(0.1 + 0.4 * noise.abs().clamp(max=1))
            elif "bias" in name or "norm" in name:
                p.add_(0.1 * noise)
            elif "token" in name or name == "pos_embed":
                p.copy_(0.5 * noise)
    return model.eval()


def _tokens(out: dict) -> torch.Tensor:
    return torch.cat([out["x_norm_clstoken"][:, None], out["x_storage_tokens"], out["x_norm_patchtokens"]], 1)


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))


# -- 1. timm parity -------------------------------------------------------------------------------


def _timm_pair(timm_name: str, our_name: str, img_size: int = 224, **our_overrides):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ours = _perturb(build_model(our_name, depth=2, img_size=img_size, **our_overrides))
    kwargs = dict(depth=2, img_size=img_size, dynamic_img_size=True)
    if "embed_dim" in our_overrides:
        kwargs.update(embed_dim=our_overrides["embed_dim"], num_heads=our_overrides["num_heads"])
    peer = timm.create_model(timm_name, pretrained=False, **kwargs).eval()
    # timm's own DINOv2 filter reads the released layout (drops mask_token, renames w12 / w3, and for
    # register models folds pos_embed[:, 0] into cls_token).
    state = timm.models.vision_transformer.checkpoint_filter_fn(ours.state_dict(), peer)
    peer.load_state_dict(state, strict=True)
    return ours, peer


@torch.no_grad()
def _max_diff(ours, peer, x) -> float:
    return (peer.forward_features(x) - _tokens(ours.forward_features(x))).abs().max().item()


def test_reg4_matches_timm_at_the_native_grid_and_when_resampled():
    # Register models resample to the exact size with antialiasing, as timm's dynamic_img_size path.
    ours, peer = _timm_pair("vit_small_patch14_reg4_dinov2", "dinov2_vits14_reg4")
    for h, w in ((224, 224), (168, 168), (112, 168), (294, 210)):
        assert _max_diff(ours, peer, _image(h, w)) <= TOL, (h, w)
    ours, peer = _timm_pair("vit_small_patch14_reg4_dinov2", "dinov2_vits14_reg4", img_size=518)  # released grid
    for h, w in ((518, 518), (224, 224)):
        assert _max_diff(ours, peer, _image(h, w)) <= TOL, (h, w)


def test_non_reg_matches_timm_at_the_native_grid_and_in_the_exact_size_mode():
    ours, peer = _timm_pair("vit_small_patch14_dinov2", "dinov2_vits14")
    assert _max_diff(ours, peer, _image(224, 224)) <= TOL
    # timm resamples every model with size= and antialiasing; the released non-register rule (scale
    # factor with a +0.1 offset, no antialiasing) gives other positions off the stored grid.
    assert _max_diff(ours, peer, _image(112, 168)) > 1e-3
    ours.interpolate_offset, ours.interpolate_antialias = 0.0, True
    for h, w in ((112, 168), (168, 168)):
        assert _max_diff(ours, peer, _image(h, w)) <= TOL, (h, w)


def test_packed_swiglu_giant_matches_timm():
    # D = 384: timm's width int(D * 5.33334) = 2048 is our packed 2 x 1024 (round-up rule of 4 D * 2 / 3).
    ours, peer = _timm_pair("vit_giant_patch14_dinov2", "dinov2_vitg14", embed_dim=384, num_heads=6)
    assert ours.blocks[0].mlp.w12.weight.shape == (2048, 384)
    assert _max_diff(ours, peer, _image(224, 224)) <= TOL
    ours, peer = _timm_pair("vit_giant_patch14_reg4_dinov2", "dinov2_vitg14_reg4", embed_dim=384, num_heads=6)
    for h, w in ((224, 224), (112, 168)):
        assert _max_diff(ours, peer, _image(h, w)) <= TOL


# -- 2. the released layout -----------------------------------------------------------------------


def _released_keys(depth: int, registers: bool, swiglu: bool) -> list[str]:
    keys = ["cls_token", "pos_embed", *(["register_tokens"] if registers else []), "mask_token"]
    keys += ["patch_embed.proj.weight", "patch_embed.proj.bias"]
    ffn = ("w12", "w3") if swiglu else ("fc1", "fc2")
    for i in range(depth):
        b = f"blocks.{i}"
        keys += [f"{b}.norm1.weight", f"{b}.norm1.bias", f"{b}.attn.qkv.weight", f"{b}.attn.qkv.bias"]
        keys += [f"{b}.attn.proj.weight", f"{b}.attn.proj.bias", f"{b}.ls1.gamma"]
        keys += [f"{b}.norm2.weight", f"{b}.norm2.bias"]
        keys += [f"{b}.mlp.{ffn[0]}.weight", f"{b}.mlp.{ffn[0]}.bias", f"{b}.mlp.{ffn[1]}.weight"]
        keys += [f"{b}.mlp.{ffn[1]}.bias", f"{b}.ls2.gamma"]
    return keys + ["norm.weight", "norm.bias"]


@pytest.mark.parametrize("name", DINOV2_NAMES)
def test_named_models_have_the_released_keys_and_shapes(name):
    spec = get_spec(name)
    size, reg = name[len("dinov2_vit")], name.endswith("_reg4")
    D, depth = WIDTHS[size], spec.kwargs["depth"]
    model = build_model(name, device="meta")
    state = model.state_dict()
    assert list(state) == _released_keys(depth, reg, size == "g")
    assert state["cls_token"].shape == (1, 1, D) and state["mask_token"].shape == (1, D)
    assert state["pos_embed"].shape == (1, 1370, D)
    assert state["patch_embed.proj.weight"].shape == (D, 3, 14, 14)
    assert state["blocks.0.attn.qkv.weight"].shape == (3 * D, D)
    if reg:
        assert state["register_tokens"].shape == (1, 4, D)
        assert (spec.kwargs["interpolate_offset"], spec.kwargs["interpolate_antialias"]) == (0.0, True)
    else:
        assert (spec.kwargs["interpolate_offset"], spec.kwargs["interpolate_antialias"]) == (0.1, False)
    if size == "g":
        assert state["blocks.0.mlp.w12.weight"].shape == (8192, 1536)
        assert state["blocks.0.mlp.w3.weight"].shape == (1536, 4096)
    else:
        assert state["blocks.0.mlp.fc1.weight"].shape == (4 * D, D)
    assert model.n_storage_tokens == (4 if reg else 0) and model.num_heads == D // 64
    assert spec.checkpoint == f"{name}_pretrain.pth" and spec.family == "dinov2"
    # The released models recognised from their keys alone get the registry entry's arguments.
    family, kwargs = infer_model_kwargs(state)
    assert family == "dinov2" and kwargs == {**spec.kwargs, "in_chans": 3}


def test_parameter_counts_match_the_released_sizes():
    # Computed from the released module definitions (docs/design/peers.md §1).
    expected = {"s": 22_056_576, "b": 86_580_480, "l": 304_368_640, "g": 1_136_480_768}
    for size, count in expected.items():
        assert sum(p.numel() for p in build_model(f"dinov2_vit{size}14", device="meta").parameters()) == count
        reg = build_model(f"dinov2_vit{size}14_reg4", device="meta")
        assert sum(p.numel() for p in reg.parameters()) == count + 4 * WIDTHS[size]


@pytest.mark.parametrize("global_indices", [True, False])
def test_chunked_teacher_checkpoint_loads_with_weights_only(tmp_path, global_indices):
    """A DINOv2 training checkpoint: ``{"teacher": {"backbone.blocks.{chunk}.{i}.*", heads}}``. DINOv2 pads
    its chunks with identities, so ``i`` counts from the first block; chunks that restart at 0 work too."""
    torch.manual_seed(0)
    model = _perturb(DinoV2VisionTransformer(embed_dim=128, depth=4, num_heads=2, num_register_tokens=4))
    model.interpolate_offset, model.interpolate_antialias = 0.0, True  # the register-model rule, as inferred
    teacher = {}
    for key, value in model.state_dict().items():
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            chunk, local = divmod(int(i), 2)
            key = f"blocks.{chunk}.{i if global_indices else local}.{rest}"
        teacher[f"backbone.{key}"] = value
    teacher["dino_head.mlp.0.weight"] = torch.zeros(8, 128)
    teacher["ibot_head.last_layer.weight_g"] = torch.ones(8, 1)
    torch.save({"teacher": teacher}, tmp_path / "model_final.pth")
    loaded = load_model(tmp_path / "model_final.pth").eval()
    assert isinstance(loaded, DinoV2VisionTransformer) and loaded.family == "dinov2"
    assert loaded.n_storage_tokens == 4 and loaded.img_size == 224 and loaded.num_heads == 2
    with torch.no_grad():
        for x in (_image(224, 224), _image(112, 168)):
            assert torch.equal(_tokens(model.forward_features(x)), _tokens(loaded.forward_features(x)))


def test_flat_state_dicts_are_left_as_they_are():
    state = {"blocks.0.norm1.weight": torch.ones(2), "blocks.1.attn.qkv.bias": torch.ones(6)}
    assert _flatten_block_chunks(state) is state


def test_released_pth_is_recognised_and_built(tmp_path):
    torch.manual_seed(0)
    model = _perturb(DinoV2VisionTransformer(img_size=126, embed_dim=128, depth=2, num_heads=2, init_values=1e-5))
    torch.save(model.state_dict(), tmp_path / "custom.pth")
    state, _ = read_checkpoint(tmp_path / "custom.pth")
    family, kwargs = infer_model_kwargs(state)
    assert family == "dinov2"
    assert kwargs["img_size"] == 126 and kwargs["interpolate_offset"] == 0.1 and not kwargs["interpolate_antialias"]
    loaded = load_model(tmp_path / "custom.pth").eval()
    with torch.no_grad():
        assert torch.equal(model(_image(98, 140)), loaded(_image(98, 140)))


# -- 3. resampling the position embedding ---------------------------------------------------------


def _grid_reference(model, **resize) -> torch.Tensor:
    m = model.img_size // model.patch_size
    grid = model.pos_embed[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, mode="bicubic", antialias=model.interpolate_antialias, **resize)
    return grid.flatten(2).transpose(1, 2)


@torch.no_grad()
def test_position_resampling_rules():
    torch.manual_seed(0)
    model = _perturb(DinoV2VisionTransformer(embed_dim=64, depth=1, num_heads=1))  # grid 16, offset 0.1
    assert torch.equal(model.interpolate_pos_encoding(16, 16), model.pos_embed)  # the stored grid: unchanged
    for h, w in ((8, 8), (8, 12), (16, 12)):
        pos = model.interpolate_pos_encoding(h, w)
        assert pos.shape == (1, 1 + h * w, 64) and torch.equal(pos[:, 0], model.pos_embed[:, 0])
        by_scale = _grid_reference(model, scale_factor=((h + 0.1) / 16, (w + 0.1) / 16))
        assert torch.equal(pos[:, 1:], by_scale)
        assert (pos[:, 1:] - _grid_reference(model, size=(h, w))).abs().max() > 1e-4
    for antialias in (False, True):
        model.interpolate_offset, model.interpolate_antialias = 0.0, antialias
        for h, w in ((8, 8), (8, 12), (16, 12)):
            assert torch.equal(model.interpolate_pos_encoding(h, w)[:, 1:], _grid_reference(model, size=(h, w)))


@torch.no_grad()
@pytest.mark.parametrize("registers", [0, 4])
def test_runs_at_other_and_non_square_resolutions(registers):
    torch.manual_seed(0)
    model = _perturb(DinoV2VisionTransformer(embed_dim=64, depth=2, num_heads=1, num_register_tokens=registers))
    for (H, W), (h, w) in (((112, 112), (8, 8)), ((112, 168), (8, 12)), ((113, 170), (8, 12))):
        out = model.forward_features(_image(H, W))
        assert out["x_norm_patchtokens"].shape == (2, h * w, 64)
        assert out["x_storage_tokens"].shape == (2, registers, 64)
        assert out["x_prenorm"].shape == (2, 1 + registers + h * w, 64)
        (fmap, cls, regs) = model.get_intermediate_layers(
            _image(H, W), n=1, reshape=True, return_class_token=True, return_extra_tokens=True
        )[0]
        assert fmap.shape == (2, 64, h, w) and torch.equal(cls, out["x_norm_clstoken"])
        assert torch.equal(regs, out["x_storage_tokens"])


@torch.no_grad()
def test_registers_carry_no_position_and_follow_the_cls_token():
    torch.manual_seed(0)
    model = _perturb(DinoV2VisionTransformer(embed_dim=64, depth=1, num_heads=1, num_register_tokens=4))
    tokens, h, w = model.prepare_tokens_with_masks(_image(224, 224))
    assert torch.equal(tokens[:, 0], (model.cls_token + model.pos_embed[:, :1])[:, 0].expand(2, -1))
    assert torch.equal(tokens[:, 1:5], model.register_tokens.expand(2, -1, -1))
    patches, _, _ = model.patch_embed(_image(224, 224))
    assert torch.equal(tokens[:, 5:], patches + model.pos_embed[:, 1:])


# -- 4. save / load ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vitg14_reg4"])
def test_save_model_load_model_round_trip(tmp_path, name):
    torch.manual_seed(0)
    model = _perturb(build_model(name, embed_dim=64, num_heads=2, depth=2, img_size=112, interpolate_offset=0.2))
    save_model(model, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors").eval()
    assert isinstance(loaded, DinoV2VisionTransformer) and loaded.spec.name == name
    assert loaded.model_kwargs == model.model_kwargs and loaded.interpolate_offset == 0.2
    with torch.no_grad():
        for x in (_image(112, 112), _image(98, 154)):
            assert torch.equal(_tokens(model.forward_features(x)), _tokens(loaded.forward_features(x)))


# -- 5. masks, init, training ----------------------------------------------------------------------


@torch.no_grad()
def test_masked_patches_become_the_mask_token_before_the_position_embedding():
    torch.manual_seed(0)
    model = _perturb(DinoV2VisionTransformer(embed_dim=64, depth=2, num_heads=1, num_register_tokens=4))
    x = _image(112, 168)
    none = torch.zeros(2, 96, dtype=torch.bool)
    assert torch.equal(_tokens(model.forward_features(x, masks=none)), _tokens(model.forward_features(x)))
    masks = none.clone()
    masks[0, ::5] = True
    tokens, h, w = model.prepare_tokens_with_masks(x, masks)
    pos = model.interpolate_pos_encoding(h, w)[0, 1:]
    expected = (model.mask_token + pos)[masks[0]]
    assert torch.equal(tokens[0, 5:][masks[0]], expected)
    assert torch.equal(tokens[1], model.prepare_tokens_with_masks(x)[0][1])


def test_dinov2_initialisation():
    torch.manual_seed(0)
    model = DinoV2VisionTransformer(embed_dim=256, depth=2, num_heads=4, num_register_tokens=4, init_values=1e-5)
    assert 1e-7 < model.cls_token.std() < 1e-5 and 1e-7 < model.register_tokens.std() < 1e-5
    # trunc_normal_'s default bounds are +-2 absolute, not +-2 std: at std 0.02 nothing is truncated.
    assert abs(model.pos_embed.std().item() - 0.02) < 2e-3
    assert not model.mask_token.any()
    qkv = model.blocks[0].attn.qkv
    assert abs(qkv.weight.std().item() - 0.02) < 2e-3 and not qkv.bias.any()
    assert torch.equal(model.blocks[1].ls2.gamma, torch.full((256,), 1e-5))
    assert model.blocks[0].norm1.eps == 1e-6 and model.norm.eps == 1e-6
    assert not hasattr(model, "rope_embed") and not any("rope" in k for k in model.state_dict())
    assert isinstance(DinoV2VisionTransformer(embed_dim=64, depth=1, num_heads=1).blocks[0].ls1, torch.nn.Identity)


@pytest.mark.parametrize("name", DINOV2_NAMES)
def test_every_dinov2_entry_trains_at_reduced_size(name):
    """As tests/test_models.py does for the DINOv3 entries: a masked global group and a local group in
    training mode (stochastic depth on); every parameter gets a gradient."""
    torch.manual_seed(0)
    model = build_model(name, embed_dim=64, num_heads=4, depth=2, drop_path_rate=0.2)
    R = get_spec(name).kwargs["num_register_tokens"]
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 3, 56, 42, generator=g), torch.randn(4, 3, 28, 28, generator=g)]
    masks = torch.zeros(4, 12, dtype=torch.bool)
    masks[:, ::3] = True
    outs = model.train().forward_features(xs, masks=[masks, None])
    tensors = []
    for out, n in zip(outs, (12, 4), strict=True):
        assert out["x_storage_tokens"].shape == (4, R, 64) and out["x_norm_patchtokens"].shape == (4, n, 64)
        tensors += [out["x_norm_clstoken"], out["x_storage_tokens"], out["x_norm_patchtokens"]]
    sum((t * torch.randn(t.shape, generator=g)).sum() for t in tensors).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    kept = torch.stack([torch.randperm(12, generator=g)[:6] for _ in range(4)])
    with torch.no_grad():
        assert model.eval().forward_kept(xs[0], kept)["x_norm_patchtokens"].shape == (4, 6, 64)
