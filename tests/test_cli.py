"""The command line: extract, models, data; exit codes 0 / 1 / 2 and messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open

from opendino.cli import main
from opendino.data.synthetic import write_image_folder
from opendino.models import build_model, load_model


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    write_image_folder(root, n=6, size=64)
    (root / "train" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "train" / "empty.jpg").write_bytes(b"")
    Image.new("CMYK", (40, 50), (10, 20, 30, 0)).save(root / "train" / "cmyk.jpg")
    Image.new("P", (33, 20)).save(root / "train" / "palette.png")
    return root


def test_extract_safetensors_with_bad_files_skipped(image_folder, tmp_path, capsys):
    out = tmp_path / "f.safetensors"
    code = main(["extract", "vits16", str(image_folder), "--out", str(out), "--resolution", "64", "--batch-size", "4"])
    assert code == 0
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "empty.jpg" in captured.err and "random weights" in captured.err
    with safe_open(str(out), framework="pt") as f:
        meta = json.loads(f.metadata()["opendino"])
        cls, patch, pooled = f.get_tensor("cls"), f.get_tensor("patch"), f.get_tensor("pooled")
    assert len(meta["paths"]) == 8 and len(meta["skipped"]) == 2  # 6 scenes + CMYK + palette
    assert cls.shape == (8, 384) and patch.shape == (8, 4, 4, 384)
    assert torch.allclose(pooled, patch.flatten(1, 2).mean(1), atol=1e-5)


def test_extract_features_equal_a_direct_forward(tmp_path):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8))
    img.save(tmp_path / "a.png")
    model = build_model("convnext_tiny")
    torch.save(model.state_dict(), tmp_path / "w.pth")
    out = tmp_path / "f.npy"
    assert (
        main(
            [
                "extract",
                str(tmp_path / "w.pth"),
                str(tmp_path / "a.png"),
                "--out",
                str(out),
                "--resolution",
                "64",
                "--resize",
                "square",
            ]
        )
        == 0
    )
    cls = np.load(tmp_path / "f_cls.npy")
    from opendino.eval.features import eval_transform
    from opendino.models.registry import LVD_MEAN, LVD_STD

    x = eval_transform(64, LVD_MEAN, LVD_STD)(torch.from_numpy(np.array(img)).permute(2, 0, 1))[None]
    with torch.no_grad():
        ref = load_model(tmp_path / "w.pth").eval()(x)
    assert np.allclose(cls, ref.numpy(), atol=1e-5)
    assert json.loads((tmp_path / "f_meta.json").read_text())["paths"] == [str(tmp_path / "a.png")]


def test_extract_from_a_file_list(image_folder, tmp_path):
    files = sorted((image_folder / "train").rglob("0*.png"))[:2]
    (tmp_path / "list.txt").write_text("\n".join(str(f) for f in files))
    out = tmp_path / "f.npz"
    assert (
        main(["extract", "vits16", str(tmp_path / "list.txt"), "--out", str(out), "--resolution", "32", "--no-patch"])
        == 0
    )
    data = np.load(out)
    assert data["cls"].shape == (2, 384) and "patch" not in data.files


@pytest.mark.parametrize(
    "argv,message",
    [
        (["extract", "vit_nope", ".", "--out", "x.npz"], "neither a file nor a known model"),
        (["extract", "vits16", ".", "--out", "x.txt"], "unknown format"),
        (["extract", "vits16", ".", "--out", "x.npz", "--resolution", "100"], "not a multiple"),
        (["extract", "vits16", "/nonexistent", "--out", "x.npz"], "no such file"),
        (["data", "synth", "--out", "x", "--n", "0"], "need n >= 1"),
    ],
)
def test_bad_usage_exits_2_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_argparse_errors_exit_2():
    with pytest.raises(SystemExit) as err:
        main(["extract", "vits16"])
    assert err.value.code == 2


def test_runtime_failure_exits_1(tmp_path, capsys):
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    assert main(["extract", str(tmp_path / "bad.pth"), str(tmp_path), "--out", str(tmp_path / "x.npz")]) == 1
    assert "not a readable" in capsys.readouterr().err
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "x.png").write_bytes(b"not an image")
    assert main(["extract", "vits16", str(tmp_path / "imgs"), "--out", str(tmp_path / "x.npz")]) == 1
    assert "could be read" in capsys.readouterr().err


def test_console_script_help_and_models():
    out = subprocess.run([sys.executable, "-m", "opendino", "models"], capture_output=True, text=True, check=True)
    assert "vit7b16" in out.stdout and "6,716,043,264" in out.stdout
    out = subprocess.run([sys.executable, "-m", "opendino", "extract", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--resolution" in out.stdout


def test_data_synth_writes_class_folders(tmp_path):
    assert main(["data", "synth", "--out", str(tmp_path), "--n", "5", "--size", "32", "--split", "val"]) == 0
    files = [p for p in (tmp_path / "val").rglob("*.png") if p.stem.isdigit()]
    assert len(files) == 5 and all(Image.open(f).size == (32, 32) for f in files)


def test_knn_on_a_separable_toy_problem_and_by_hand():
    from opendino.probes import knn_accuracy

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 5
    labels = torch.arange(3).repeat_interleave(20)
    feats = centres[labels] + 0.1 * torch.randn(60, 8, generator=g)
    acc = knn_accuracy(feats[::2], labels[::2], feats[1::2], labels[1::2], ks=(1, 5))
    assert acc == {1: 1.0, 5: 1.0}
    # By hand: one query, neighbours with similarities 1.0 (class 0) and 0.6, 0.6 (class 1), T = 1:
    # k=1 picks class 0; k=3 compares e^1 against 2 e^0.6 (= 3.64 > 2.72) and picks class 1.
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    acc = knn_accuracy(
        train, torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0.0]]), torch.tensor([1]), ks=(1, 3), temperature=1.0
    )
    assert acc == {1: 0.0, 3: 1.0}


def test_the_configuration_reference_is_current_and_config_prints_overrides(capsys):
    from tests.conftest import REPO

    assert main(["config", "--reference"]) == 0
    generated = capsys.readouterr().out
    assert generated == (REPO / "docs" / "configuration.md").read_text(), "regenerate docs/configuration.md"
    assert "`distill.teacher`" in generated and "`parallel.data_parallel`" in generated
    assert main(["config", str(REPO / "configs" / "demo" / "pretrain.yaml"), "train.steps=7"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["train"]["steps"] == 7 and resolved["model"]["kwargs"]["embed_dim"] == 192
    assert main(["config", str(REPO / "configs" / "demo" / "pretrain.yaml"), "tran.steps=1"]) == 2


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.steps=-1", "train.steps=-1: must be 1 or more"),
        ("train.batch_size=0", "train.batch_size=0: must be 1 or more"),
        ("log.every=0", "log.every=0: must be 1 or more"),
        ("checkpoint.every=0", "checkpoint.every=0: must be 1 or more"),
        ("data.num_workers=-1", "data.num_workers=-1: must be 0 or more"),
        ("data.source=foo", "valid: folder, list, tar, synthetic"),
        ("data.source=folder", "data.source=folder needs data.path"),
        ("train.batch_size=[1", "expected int, got '[1'"),  # not YAML: taken as text, then type-checked
        ("train=3", "train is a section, not a value"),
        ("data.crops_on_device=true", "needs data.photometric_on_device=true"),
        ("monitor.every=3", "must be a multiple of log.every"),
        ("crops.resolution_sets=[[64, 32, 128]]", "need [global, local, Gram teacher, probability]"),
        ("crops.resolution_sets=[[64, 32, 128, 0]]", "the probabilities (4th column) sum to 0"),
        ("optim.scaling_rule=sqrt", "valid: sqrt_wrt_1024, linear_wrt_256, none"),
        ("model.arch=vit_smal", "Did you mean: vit_small"),
        ("init.from_mode=resume", "valid: continue, teacher"),
        (
            "data={crops_on_device: true, photometric_on_device: true, max_image_side: 32}",
            "data.max_image_side=32 is below the largest crop (64 px)",
        ),
    ],
)
def test_values_no_run_can_use_exit_2_before_anything_is_written(override, message, tmp_path, capsys):
    from tests.conftest import REPO

    run = tmp_path / "run"
    assert main(["train", str(REPO / "configs" / "demo" / "pretrain.yaml"), f"run.dir={run}", override]) == 2
    assert message in capsys.readouterr().err
    assert not run.exists()


def test_a_mapping_override_updates_its_section_and_a_list_replaces(capsys):
    from tests.conftest import REPO

    preset = str(REPO / "configs" / "demo" / "pretrain.yaml")
    convnext = {"arch": "convnext_tiny", "kwargs": {"depths": [1, 1, 1, 1]}}
    assert main(["config", preset, f"model={convnext}", "crops.global_scale=[0.5,1.0]"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    model = yaml.safe_load(Path(preset).read_text())["model"]
    assert resolved["model"]["drop_path_rate"] == model["drop_path_rate"]  # the preset's, not the default
    # the constructor arguments belong to the arch: replaced whole, not merged with the ViT's
    assert resolved["model"]["arch"] == "convnext_tiny" and resolved["model"]["kwargs"] == convnext["kwargs"]
    assert resolved["crops"]["global_scale"] == [0.5, 1.0]
    assert main(["config", preset, 'model={"kwrgs": {}}']) == 2
    assert "model.kwargs" in capsys.readouterr().err
    # constructor arguments are free-form: a dotted override adds one and keeps the preset's others
    assert main(["config", preset, "model.kwargs.mask_k_bias=true"]) == 0
    kwargs = yaml.safe_load(capsys.readouterr().out)["model"]["kwargs"]
    assert kwargs == {**model["kwargs"], "mask_k_bias": True}
