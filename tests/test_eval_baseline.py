"""`opendino eval --baseline MODEL|pixels`: the pixel baseline's features against a direct computation from
the image, baseline columns in results.json / report.md / the printed table, a baseline that is the
evaluated model scoring exactly what ``trained`` scores, and the refusals (unknown baseline, channels)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from opendino.cli import main
from opendino.data.sources import decode_image
from opendino.eval.features import cached_features, eval_transform, extract_features, model_fingerprint
from opendino.eval.pixels import PixelBaseline, pixel_baseline_like
from opendino.eval.report import difference
from opendino.eval.suite import evaluate
from opendino.models import build_model, save_model

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _tiny(path, **overrides):
    torch.manual_seed(0)
    model = build_model("vits16", **{"embed_dim": 64, "depth": 2, "num_heads": 2, **overrides})
    channels = overrides.get("in_chans", 3)
    if channels != 3:  # a model of other channels records the normalisation it was trained with
        model.input_normalisation = ((0.5,) * channels, (0.25,) * channels)
    save_model(model, path)
    return model


def _noise_images(folder, n=3, size=(40, 36)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        paths.append(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(paths[-1])
    return paths


def test_pixel_baseline_features_are_the_pooled_and_per_patch_pixels(tmp_path):
    paths = _noise_images(tmp_path / "images")
    pixels = PixelBaseline(patch_size=8)
    feats = extract_features(pixels, paths, mean=MEAN, std=STD, resolution=32, progress=False)
    assert feats.cls.shape == (3, 3 * 16 * 16) and feats.patch.shape == (3, 4, 4, 3 * 8 * 8)
    transform = eval_transform(32, MEAN, STD)
    for i, path in enumerate(paths):
        x = transform(decode_image(path))  # [3, 32, 32], normalised
        pooled = torch.stack(
            [x[:, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].mean((1, 2)) for r in range(16) for c in range(16)], 1
        )  # [3, 256]: channel-major like the flattened grid
        torch.testing.assert_close(feats.cls[i], pooled.flatten(), atol=1e-5, rtol=1e-5)
        for r in range(4):
            for c in range(4):
                torch.testing.assert_close(feats.patch[i, r, c], x[:, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8].flatten())
        torch.testing.assert_close(feats.pooled[i], feats.patch[i].reshape(16, -1).mean(0), atol=1e-5, rtol=1e-5)
    # Its configuration keys the feature cache: no collision with a network or another grid / stride.
    model = _tiny(tmp_path / "tiny.safetensors")
    like = pixel_baseline_like(model)
    assert (like.feature_stride, like.in_chans, like.grid) == (16, 3, 16)
    digests = {model_fingerprint(m) for m in (pixels, like, PixelBaseline(8, grid=8), PixelBaseline(8), model)}
    assert len(digests) == 4  # the two PixelBaseline(8) agree, nothing else does
    kw = {"keep_patch": True, "mean": MEAN, "std": STD, "resolution": 32, "progress": False}
    for m in (model, like, PixelBaseline(8)):
        cached_features(m, paths, tmp_path / "cache", **kw)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3


def test_evaluate_with_baselines_side_by_side(tmp_path):
    tiny = tmp_path / "tiny.safetensors"
    _tiny(tiny)
    _tiny(tmp_path / "patch8.safetensors", patch_size=8)  # another patch grid at 32 px: 4x4, not 2x2
    tasks = ("knn", "linear", "seg", "depth", "corr")
    results = evaluate(
        tiny,
        tasks=tasks,
        out=tmp_path / "r",
        resolution=32,
        n_train=24,
        n_val=8,
        progress=False,
        log=lambda _: None,
        baselines=["pixels", str(tiny), str(tmp_path / "patch8.safetensors")],
    )
    same, other = f"baseline:{tiny}", f"baseline:{tmp_path / 'patch8.safetensors'}"
    assert results["meta"]["baselines"] == ["pixels", same, other]
    assert {"trained", "random_init", "meta"} < set(results)
    for key in ("pixels", same, other):
        assert list(results[key]) == list(results["trained"]) == list(tasks)
    assert results[same] == results["trained"]  # the same weights and normalisation: the same numbers
    for task in tasks:  # pixels share the stride: every task scored, with the same metrics as trained
        assert set(results["pixels"][task]) == set(results["trained"][task])
    assert set(results[other]["knn"]) == set(results["trained"]["knn"])
    assert all("patch grid 4x4" in results[other][t]["skipped"] for t in ("seg", "depth", "corr"))
    assert results["meta"]["baseline_info"]["pixels"]["grid"] == 16

    on_disk = json.loads((tmp_path / "r" / "results.json").read_text())
    assert on_disk["meta"]["baselines"] == ["pixels", same, other] and on_disk["pixels"] == results["pixels"]
    report = (tmp_path / "r" / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| task |"))
    for column in ("trained", "random init", "pixels", "tiny", "patch8", "chance", "trained − pixels"):
        assert f"| {column} |" in header
    assert header.endswith("| trained − pixels | trained − tiny | trained − patch8 |")
    columns = [c.strip() for c in header.strip("|").split("|")]
    for line in report.splitlines():
        if not line.startswith("| knn | top1_k"):
            continue
        cells = dict(zip(columns, (c.strip() for c in line.strip("|").split("|")), strict=True))
        metric = cells["metric"]
        assert cells["trained − tiny"] == "+0 (same)"  # the evaluated model against itself
        diff, verdict = difference(results["trained"]["knn"][metric], results["pixels"]["knn"][metric], metric)
        assert cells["trained − pixels"] == f"{diff:+.4g} ({verdict})"
        assert float(cells["pixels"]) == pytest.approx(results["pixels"]["knn"][metric], abs=1e-3)
    assert difference(0.5, 0.25, "miou") == (0.25, "better") and difference(1.0, 2.0, "rmse") == (-1.0, "better")
    assert difference(0.2, 0.3, "delta1") == (pytest.approx(-0.1), "worse") and difference(0.2, None, "x") is None
    assert "- `patch8` seg, depth, corr: skipped: patch grid 4x4" in report and "the floor" in report
    assert report.count("| knn |") == 4 and (tmp_path / "r" / "pictures.png").stat().st_size > 0


def test_cli_baseline_table_and_refusals(tmp_path, capsys):
    tiny = tmp_path / "tiny.safetensors"
    _tiny(tiny)
    assert main(["eval", str(tiny), "--baseline", "no_such_model", "--out", str(tmp_path / "x")]) == 2
    assert "--baseline no_such_model: neither pixels" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    args = ["eval", str(tiny), "--out", str(tmp_path / "r"), "--resolution", "32", "--tasks", "knn"]
    assert main([*args, "--n-train", "16", "--n-val", "8", "--baseline", "pixels", "--baseline", str(tiny)]) == 0
    printed = capsys.readouterr().out
    assert "trained-pixels" in printed and "trained-tiny" in printed
    row = next(line for line in printed.splitlines() if line.startswith("knn       top1_k10"))
    assert row.endswith("+0.0000 same")  # last column: trained - the evaluated model itself
    assert f"tiny: {tiny}" in printed

    # A baseline of another number of input channels: refused before anything is written.
    _tiny(tmp_path / "gray.safetensors", in_chans=1)
    with pytest.raises(ValueError, match="1 input channels, the evaluated model has 3"):
        evaluate(tiny, tasks=("knn",), out=tmp_path / "g", resolution=32, baselines=[tmp_path / "gray.safetensors"])
    assert not (tmp_path / "g").exists()
    assert (
        main(["eval", str(tiny), "--out", str(tmp_path / "g"), "--baseline", str(tmp_path / "gray.safetensors")]) == 1
    )
    assert "input channels" in capsys.readouterr().err and not (tmp_path / "g").exists()
