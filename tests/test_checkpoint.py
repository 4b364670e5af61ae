"""Loading weights: official layouts, wrappers, dtypes, and clear errors on bad files."""

from __future__ import annotations

import pickle

import pytest
import torch

from opendino.models import CheckpointError, DinoVisionTransformer, build_model, load_model, read_checkpoint, save_model
from opendino.models.checkpoint import closest_architecture, infer_model_kwargs
from opendino.models.registry import create
from tests.test_models import tiny_vit


def _same_outputs(a, b, x=None):
    x = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(0)) if x is None else x
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def test_official_pth_loads_strictly_with_weights_only(tmp_path):
    model = build_model("vits16", depth=2)
    torch.save(model.state_dict(), tmp_path / "ckpt.pth")
    loaded = load_model(tmp_path / "ckpt.pth")
    assert _same_outputs(model, loaded)


def test_named_model_with_weights(tmp_path):
    model = build_model("convnext_tiny")
    torch.save(model.state_dict(), tmp_path / "convnext.pth")
    loaded = load_model("convnext_tiny", weights=tmp_path / "convnext.pth")
    assert loaded.spec.name == "convnext_tiny" and _same_outputs(model, loaded)


def test_bfloat16_state_dict_loads_into_float32(tmp_path):
    model = tiny_vit()
    torch.save({k: v.bfloat16() for k, v in model.state_dict().items()}, tmp_path / "bf16.pth")
    loaded = load_model(tmp_path / "bf16.pth")
    assert loaded.cls_token.dtype == torch.float32
    assert torch.equal(loaded.cls_token, model.cls_token.bfloat16().float())


def test_training_teacher_checkpoint_is_unwrapped(tmp_path):
    model = tiny_vit()
    state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    state["dino_head.last_layer.weight"] = torch.zeros(8, 4)
    torch.save({"teacher": state, "iteration": 3}, tmp_path / "teacher.pth")
    sd, _ = read_checkpoint(tmp_path / "teacher.pth")
    assert set(sd) == set(model.state_dict())


def test_safetensors_round_trip_keeps_the_architecture(tmp_path):
    # eps 1e-6 and an untied cls norm cannot be read off the keys: the metadata carries them.
    kwargs = dict(
        embed_dim=64,
        depth=2,
        num_heads=4,
        ffn_layer="mlp",
        norm_layer="layernorm",
        layerscale_init=1e-5,
        n_storage_tokens=4,
        mask_k_bias=True,
        untie_cls_and_patch_norms=True,
    )
    model = create("vit", kwargs)
    save_model(model, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.blocks[0].norm1.eps == 1e-6 and _same_outputs(model, loaded)


def test_convnext_safetensors_keeps_duplicate_norm(tmp_path):
    model = build_model("convnext_tiny")
    save_model(model, tmp_path / "c.safetensors")
    sd, meta = read_checkpoint(tmp_path / "c.safetensors")
    assert meta["name"] == "convnext_tiny" and "norms.3.weight" in sd
    assert _same_outputs(model, load_model(tmp_path / "c.safetensors"))


def test_custom_vit_architecture_is_inferred_from_the_state_dict():
    model = tiny_vit(untie_global_and_local_cls_norm=True)
    family, kwargs = infer_model_kwargs(model.state_dict())
    assert family == "vit"
    assert kwargs["num_heads"] == 4 and kwargs["ffn_layer"] == "swiglu" and kwargs["n_storage_tokens"] == 4
    rebuilt = DinoVisionTransformer(**kwargs)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert _same_outputs(model, rebuilt)


def test_wrong_architecture_names_missing_keys_and_closest_model(tmp_path):
    torch.save(build_model("vitb16", depth=12).state_dict(), tmp_path / "vitb.pth")
    with pytest.raises(CheckpointError) as err:
        load_model("vits16", weights=tmp_path / "vitb.pth")
    text = str(err.value)
    assert "shape mismatch" in text and "closest known architecture: vitb16 (100%" in text


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    state = build_model("vits16").state_dict()
    state.pop("norm.weight")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): norm.weight") as err:
        load_model("vits16", weights=tmp_path / "broken.pth")
    assert "unexpected keys (1): extra.weight" in str(err.value)
    assert closest_architecture(state)[0] == "vits16"


def test_truncated_file_is_a_clear_error(tmp_path):
    torch.save(tiny_vit().state_dict(), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(tmp_path / "cut.pth")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_non_checkpoint_file_is_a_clear_error(tmp_path, suffix):
    (tmp_path / f"notes{suffix}").write_text("hello, not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        read_checkpoint(tmp_path / f"notes{suffix}")


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_objects_are_refused(tmp_path):
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": _Evil()}, f)
    torch.save({"cls_token": torch.zeros(1), "obj": _Evil()}, tmp_path / "evil2.pth")
    for name in ("evil.pth", "evil2.pth"):
        with pytest.raises(CheckpointError, match="not a readable weights-only"):
            read_checkpoint(tmp_path / name)


def test_missing_file():
    with pytest.raises(CheckpointError, match="no such file"):
        read_checkpoint("/nonexistent/model.pth")
