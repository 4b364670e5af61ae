"""ONNX export: backbones and text-aligned towers run in onnxruntime as they do in PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from opendino.cli import main  # noqa: E402
from opendino.deploy.onnx import ExportError, check_onnx, export_backbone, export_source, run_onnx  # noqa: E402
from opendino.models import build_model, save_model  # noqa: E402
from opendino.models.text import TextAlignedModel, TextTransformer, VisionHead, save_text_model  # noqa: E402


def _tiny_vit():
    torch.manual_seed(0)
    return build_model("vits16", embed_dim=48, num_heads=2, depth=2).eval()


def test_dynamic_vit_export_matches_pytorch_at_other_sizes_and_batches(tmp_path):
    model = _tiny_vit()
    exported = export_backbone(model, tmp_path / "m.onnx", 64, dynamic=True)
    assert check_onnx(exported.path, exported.module, exported.check_inputs) < 1e-4
    # a size and batch the export never saw: RoPE's tables follow the grid
    x = torch.randn(3, 3, 48, 80)
    cls, storage, patch = run_onnx(exported.path, x)
    with torch.inference_mode():
        out = model.forward_features(x)
    assert patch.shape == (3, (48 // 16) * (80 // 16), 48)
    np.testing.assert_allclose(patch, out["x_norm_patchtokens"].numpy(), atol=1e-4)
    np.testing.assert_allclose(cls, out["x_norm_clstoken"].numpy(), atol=1e-4)
    assert storage.shape[1] == model.n_storage_tokens
    assert "height" in exported.describe() and "batch" in exported.describe()
    assert not (tmp_path / "m.onnx.data").exists()  # small weights stay in one file


def test_static_export_is_fixed_and_rejects_a_bad_resolution(tmp_path):
    model = _tiny_vit()
    with pytest.raises(ExportError, match="multiple of the model's stride 16"):
        export_backbone(model, tmp_path / "bad.onnx", 60, dynamic=False)
    exported = export_backbone(model, tmp_path / "s.onnx", 32, dynamic=False)
    assert "images [1, 3, 32, 32]" in exported.describe()


def test_convnext_and_fp16_exports(tmp_path):
    torch.manual_seed(0)
    convnext = build_model("convnext_tiny", depths=(1, 1, 1, 1), dims=(16, 32, 48, 64)).eval()
    exported = export_backbone(convnext, tmp_path / "c.onnx", 64, dynamic=True)
    assert [o.name for o in __import__("onnx").load(str(exported.path)).graph.output] == ["cls", "patch"]
    assert check_onnx(exported.path, exported.module, exported.check_inputs) < 1e-4
    half = export_backbone(_tiny_vit(), tmp_path / "h.onnx", 32, dynamic=False, dtype="fp16")
    got = run_onnx(half.path, half.check_inputs[0])
    assert got[0].dtype == np.float16
    assert check_onnx(half.path, half.module, half.check_inputs) < 1e-2


def test_text_aligned_run_exports_both_towers(tmp_path):
    torch.manual_seed(0)
    backbone = build_model("vits16", embed_dim=48, num_heads=2, depth=2)
    model = TextAlignedModel(
        backbone,
        VisionHead(48, num_heads=2, blocks=1),
        TextTransformer(width=32, layers=1, heads=2, embed_dim=96, context_length=16),
    ).eval()
    run = tmp_path / "run"
    save_model(model.backbone, run / "teacher.safetensors")
    save_text_model(model, run / "text.safetensors")
    lines = export_source(str(run), tmp_path / "m.onnx", resolution=32, check=True, say=lambda _: None)
    assert len(lines) == 3 and all("max |diff|" in line for line in lines)
    assert (tmp_path / "m.image.onnx").is_file() and (tmp_path / "m.text.onnx").is_file()
    assert "text_embedding [1, 96]" in lines[2]


def test_cli_export_names_random_weights_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    code = main(["export", "nonexistent_model", "--out", str(out)])
    assert code != 0 and "neither a file" in capsys.readouterr().err
    assert main(["export", "vits16", "--out", str(tmp_path / "m.txt")]) != 0


@pytest.mark.slow
def test_cli_export_vits16_checks_in_onnxruntime(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", "vits16", "--to", "onnx", "--out", str(out), "--resolution", "224", "--check"]) == 0
    captured = capsys.readouterr()
    assert "random weights" in captured.err and "max |diff|" in captured.out and out.is_file()
