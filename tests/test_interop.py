"""timm and Hugging Face transformers: our weights in their models give our outputs, and back."""

from __future__ import annotations

import pytest
import torch

from opendino.cli import main
from opendino.models import build_model, load_model
from opendino.models.convert import ConversionError, detect_layout, from_hf, from_timm, hf_config, to_hf, to_timm
from tests.conftest import fixture_dirs

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

TOL = 1e-5


def _tokens(out: dict) -> torch.Tensor:
    return torch.cat([out["x_norm_clstoken"][:, None], out["x_storage_tokens"], out["x_norm_patchtokens"]], 1)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, 224, 224, generator=g), torch.randn(2, 3, 160, 96, generator=g)]


def _perturbed_vits16(seed: int = 0):
    """ViT-S/16 with every weight moved off its init, so that every block and bias matters."""
    torch.manual_seed(seed)
    model = build_model("vits16").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.1, 0.5)
            elif "bias" in name or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif "token" in name:
                p.normal_(0, 0.5)
    return model


def _timm_model(**kwargs):
    return timm.create_model("vit_small_patch16_dinov3_qkvb", pretrained=False, dynamic_img_size=True, **kwargs)


def _hf_model(kwargs):
    cfg = {k: v for k, v in hf_config(kwargs).items() if k not in ("model_type", "architectures")}
    return transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**cfg)).eval()


@torch.no_grad()
def test_timm_official_filter_loads_our_state_dict_and_matches():
    ours = _perturbed_vits16()
    peer = _timm_model().eval()
    filtered = timm.models.eva.checkpoint_filter_fn(ours.state_dict(), peer)
    peer.load_state_dict(filtered, strict=True)
    for x in _inputs():
        assert (peer.forward_features(x) - _tokens(ours.forward_features(x))).abs().max() <= TOL
    # Our own timm converter produces exactly what timm's filter produces.
    converted = to_timm(ours.state_dict())
    assert converted.keys() == filtered.keys()
    assert all(torch.equal(converted[k], filtered[k]) for k in converted)


@torch.no_grad()
def test_timm_round_trip_gives_identical_outputs():
    ours = _perturbed_vits16()
    back = build_model("vits16")
    back.load_state_dict(from_timm(to_timm(ours.state_dict())), strict=True)
    x = _inputs()[1]
    assert torch.equal(back.eval()(x), ours(x))


@torch.no_grad()
def test_hf_model_matches_through_convert():
    ours = _perturbed_vits16()
    peer = _hf_model(ours.model_kwargs)
    peer.load_state_dict(to_hf(ours.state_dict()), strict=True)
    for x in _inputs():
        assert (peer(pixel_values=x).last_hidden_state - _tokens(ours.forward_features(x))).abs().max() <= TOL
    # Masked-token path: HF's bool_masked_pos against our masks.
    x = _inputs()[0]
    masks = torch.rand(2, 196, generator=torch.Generator().manual_seed(1)) < 0.4
    theirs = peer(pixel_values=x, bool_masked_pos=masks).last_hidden_state
    assert (theirs - _tokens(ours.forward_features(x, masks=masks))).abs().max() <= TOL


@torch.no_grad()
def test_hf_round_trip_gives_identical_outputs():
    ours = _perturbed_vits16()
    back = build_model("vits16")
    back.load_state_dict(from_hf(to_hf(ours.state_dict()), hf_config(ours.model_kwargs)), strict=True)
    x = _inputs()[1]
    assert torch.equal(back.eval()(x), ours(x))


@torch.no_grad()
def test_swiglu_fixture_model_matches_timm_and_hf():
    path = next((d / "fixture_vit_tiny.pt" for d in fixture_dirs() if (d / "fixture_vit_tiny.pt").exists()), None)
    if path is None:
        pytest.skip("fixture_vit_tiny.pt not in OPENDINO_FIXTURES")
    data = torch.load(path, weights_only=True)
    from opendino.models.registry import create

    ours = create("vit", data["model_kwargs"]).eval()
    ours.load_state_dict(data["state_dict"])
    peer = timm.create_model(
        "vit_small_plus_patch16_dinov3_qkvb",
        pretrained=False,
        dynamic_img_size=True,
        embed_dim=64,
        depth=2,
        num_heads=4,
        mlp_ratio=176 / 64,
    ).eval()
    peer.load_state_dict(to_timm(data["state_dict"]), strict=True)
    hf = _hf_model(data["model_kwargs"])
    hf.load_state_dict(to_hf(data["state_dict"]), strict=True)
    for x in data["inputs"].values():
        ref = _tokens(ours.forward_features(x))
        assert (peer.forward_features(x) - ref).abs().max() <= TOL
        assert (hf(pixel_values=x).last_hidden_state - ref).abs().max() <= TOL


def test_untied_cls_norm_cannot_be_converted():
    model = build_model("vits16", depth=1, untie_cls_and_patch_norms=True)
    with pytest.raises(ConversionError, match="cls_norm"):
        to_timm(model.state_dict())


@torch.no_grad()
def test_cli_convert_round_trips_all_layouts(tmp_path):
    ours = _perturbed_vits16()
    torch.save(ours.state_dict(), tmp_path / "official.pth")
    assert (
        main(["convert", str(tmp_path / "official.pth"), "--to", "timm", "--out", str(tmp_path / "t.safetensors")]) == 0
    )
    assert main(["convert", str(tmp_path / "t.safetensors"), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert main(["convert", str(tmp_path / "hf"), "--to", "official", "--out", str(tmp_path / "o.safetensors")]) == 0
    x = _inputs()[0]
    for path in ("t.safetensors", "hf", "o.safetensors"):
        assert torch.equal(load_model(tmp_path / path).eval()(x), ours(x)), path
    from safetensors.torch import load_file

    assert detect_layout(load_file(tmp_path / "t.safetensors")) == "timm"
    peer = transformers.DINOv3ViTModel.from_pretrained(tmp_path / "hf").eval()
    assert (peer(pixel_values=x).last_hidden_state - _tokens(ours.forward_features(x))).abs().max() <= TOL
