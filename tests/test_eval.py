"""Evaluation: every metric against hand-computed values, the probes on separable toy problems, the
feature cache, and `opendino eval` / `opendino visualize` end to end on a tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from opendino.cli import main
from opendino.eval.correspondence import correspondence_metrics, match_errors
from opendino.eval.dense import (
    class_weights,
    depth_metrics,
    linear_depth,
    linear_segmentation,
    sig_loss,
)
from opendino.eval.features import cached_features
from opendino.eval.linear import linear_probe, logistic_regression
from opendino.eval.visualize import Row, pca_rgb, save_figure, sheet, similarity_map
from opendino.models import build_model, save_model
from opendino.probes import knn_accuracy, mean_iou, nearest_neighbour_segmentation, patch_majority


def _blobs(n: int, dim: int = 16, classes: int = 3, seed: int = 0):
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)) * 4  # shared by all splits
    y = torch.arange(n) % classes
    return centres[y] + torch.randn(n, dim, generator=torch.Generator().manual_seed(seed + 1)), y


def test_mean_iou_and_pixel_accuracy_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [0, 255, 2, 2]])
    predicted = torch.tensor([[0, 1, 1, 1], [0, 0, 2, 0]])
    # class 0: tp 2, fp 1 (a 2 predicted 0), fn 1 -> 2/4; class 1: tp 2, fp 1 -> 2/3; class 2: tp 1, fn 1 -> 1/2
    result = mean_iou(predicted, target, 3)
    assert math.isclose(result["miou"], (2 / 4 + 2 / 3 + 1 / 2) / 3, rel_tol=1e-6)
    assert math.isclose(result["pixel_accuracy"], 5 / 7, rel_tol=1e-6)


def test_patch_majority_and_nearest_neighbour_segmentation():
    maps = torch.tensor([[[1, 1, 0, 0], [1, 2, 0, 255], [3, 3, 255, 255], [3, 0, 255, 255]]])
    assert patch_majority(maps, 2, 4).tolist() == [[[1, 0], [3, 255]]]
    # Features that equal the patch label one-hot transfer labels exactly; a shuffled copy does not.
    labels = torch.randint(0, 3, (6, 4, 4), generator=torch.Generator().manual_seed(0))
    maps = labels.repeat_interleave(2, 1).repeat_interleave(2, 2).to(torch.uint8)
    features = torch.nn.functional.one_hot(labels, 3).float()
    assert nearest_neighbour_segmentation(features[:4], maps[:4], features[4:], maps[4:], n_classes=3)["miou"] == 1.0
    noise = torch.randn(6, 4, 4, 3, generator=torch.Generator().manual_seed(1))
    assert nearest_neighbour_segmentation(noise[:4], maps[:4], noise[4:], maps[4:], n_classes=3)["miou"] < 0.6


def test_depth_metrics_and_sig_loss_by_hand():
    target = torch.tensor([1.0, 2.0, 4.0, 0.0])  # the 0 has no depth and is ignored
    predicted = torch.tensor([1.0, 3.0, 4.0, 9.0])
    m = depth_metrics(predicted, target)
    assert math.isclose(m["rmse"], math.sqrt(1 / 3), rel_tol=1e-6)
    assert math.isclose(m["abs_rel"], (0 + 0.5 + 0) / 3, rel_tol=1e-6)
    assert math.isclose(m["delta1"], 2 / 3, rel_tol=1e-6)
    assert sig_loss(target[:3] * 2, target[:3]) > 0 and sig_loss(target[:3], target[:3]) < 1e-6


def test_knn_linear_and_logistic_regression_solve_separable_blobs():
    x, y = _blobs(300)
    vx, vy = _blobs(150, seed=1)
    assert knn_accuracy(x, y, vx, vy, ks=(10,))[10] > 0.95
    assert linear_probe(x, y, vx, vy, epochs=20)["top1"] > 0.95
    assert logistic_regression(x, y, vx, vy)["top1"] > 0.95
    shuffled = vy[torch.randperm(len(vy), generator=torch.Generator().manual_seed(0))]
    assert linear_probe(x, y, vx, shuffled, epochs=20)["top1"] < 0.6  # labels that carry no signal


def test_dense_probes_learn_a_feature_that_encodes_the_label():
    g = torch.Generator().manual_seed(0)
    maps = torch.randint(0, 3, (64, 4, 4), generator=g).to(torch.uint8)
    features = torch.nn.functional.one_hot(maps.long(), 8).float() + 0.1 * torch.randn(64, 4, 4, 8, generator=g)
    upsampled = maps.repeat_interleave(4, 1).repeat_interleave(4, 2)  # labels at 16x16
    seg = linear_segmentation(features[:48], upsampled[:48], features[48:], upsampled[48:], n_classes=3, steps=150)
    assert seg["miou"] > 0.7  # below 1 only where bilinear upsampling blends neighbouring patches
    noise = torch.randn(64, 4, 4, 8, generator=g)
    assert (
        linear_segmentation(noise[:48], upsampled[:48], noise[48:], upsampled[48:], n_classes=3, steps=150)["miou"]
        < 0.45
    )
    depth = 1.0 + upsampled.float()  # 1, 2 or 3 metres
    result = linear_depth(features[:48], depth[:48], features[48:], depth[48:], max_depth=4.0, steps=300)
    floor = linear_depth(noise[:48], depth[:48], noise[48:], depth[48:], max_depth=4.0, steps=300)
    assert result["delta1"] > 0.7 and result["delta1"] > floor["delta1"] + 0.15 and result["rmse"] < floor["rmse"]


def test_class_weights_are_inverse_square_root_frequencies():
    maps = torch.tensor([[0] * 75 + [1] * 25 + [255] * 10], dtype=torch.uint8)
    w = class_weights(maps, 3)  # class 2 is absent: it gets the rarest present class's weight
    expected = torch.tensor([75**-0.5, 25**-0.5, 25**-0.5])
    assert torch.allclose(w, expected / expected.mean(), atol=1e-6)


def test_correspondence_recovers_a_known_shift():
    g = torch.Generator().manual_seed(0)
    first = torch.randn(6, 6, 8, generator=g)
    second = torch.roll(first, shifts=1, dims=1)  # every patch moved one column to the right
    stride = 4
    ys, xs = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
    flow = torch.stack([xs + stride, ys], -1)
    flow[:, -stride:] = float("nan")  # the last column leaves the second view
    errors = match_errors(first, second, flow, stride)
    assert errors.numel() == 30 and errors.max() < 1e-5
    assert correspondence_metrics(errors, stride)["recall_1patch"] == 1.0
    assert match_errors(first, torch.randn(6, 6, 8, generator=g), flow, stride).mean() > stride


def test_pca_and_similarity_pictures():
    patch = torch.zeros(4, 4, 6)
    patch[1:3, 1:3, 0] = 5.0  # an object in the middle
    patch += 0.01 * torch.randn(4, 4, 6, generator=torch.Generator().manual_seed(0))
    rgb = pca_rgb(patch, foreground=True)
    assert rgb.shape == (4, 4, 3) and rgb.dtype.name == "uint8"
    assert (rgb[0, 0] == 0).all() and rgb[1:3, 1:3].any()  # background black, object coloured
    sim = similarity_map(patch, 1, 1)
    assert sim[1, 1] > 0.99 and sim[2, 2] > 0.9 and sim[0, 0] < 0.5


def test_picture_sheets_say_what_they_show(tmp_path):
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8, generator=g)
    rows = [
        Row("trained: run-a", image, torch.randn(4, 4, 8, generator=g), (1, 2)),
        Row("random init", image, torch.randn(4, 4, 8, generator=g)),
    ]
    fig = sheet(rows, "cat.png, 32 px")
    grid = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert [ax.get_ylabel() for ax in grid[::3]] == ["trained: run-a", "random init"]
    assert grid[0].get_title() == "input" and "PCA" in grid[1].get_title()
    assert "row 1, col 2" in grid[2].get_title() and "row 2, col 2" in grid[5].get_title()  # the query patches
    assert fig.get_suptitle() == "cat.png, 32 px"
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1 and bars[0].get_ylabel() == "cosine similarity"
    assert all(len(ax.patches) == 1 for ax in grid)  # the query patch outlined on each picture
    save_figure(fig, tmp_path / "sheet.png")
    assert (tmp_path / "sheet.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="outside the 4 x 4 patch grid"):
        sheet([Row("x", image, torch.randn(4, 4, 8), (4, 0))])


def _tiny_model(tmp_path):
    torch.manual_seed(0)
    model = build_model("vit_small", embed_dim=32, depth=2, num_heads=2)
    save_model(model, tmp_path / "tiny.safetensors")
    return model


def test_features_are_cached_in_float16_and_reused(tmp_path, monkeypatch):
    from PIL import Image

    from opendino.eval import features as features_module

    model = _tiny_model(tmp_path)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (40, 40), (60 * i, 10, 200)).save(paths[-1])
    kw = {"keep_patch": True, "mean": (0.5,) * 3, "std": (0.2,) * 3, "resolution": 32, "progress": False}
    first = cached_features(model, paths, tmp_path / "cache", **kw)
    files = list((tmp_path / "cache").glob("*.safetensors"))
    assert len(files) == 1
    from safetensors.torch import load_file

    assert all(v.dtype == torch.float16 for v in load_file(str(files[0])).values())
    monkeypatch.setattr(features_module, "extract_features", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    again = cached_features(model, paths, tmp_path / "cache", **kw)
    torch.testing.assert_close(again.cls, first.cls, atol=1e-2, rtol=1e-2)
    with torch.no_grad():
        model.cls_token.add_(1.0)  # other weights: a new entry, not a stale one
    monkeypatch.undo()
    cached_features(model, paths, tmp_path / "cache", **kw)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2


def test_eval_and_visualize_commands_end_to_end(tmp_path, capsys):
    _tiny_model(tmp_path)
    out = tmp_path / "report"
    args = ["eval", str(tmp_path / "tiny.safetensors"), "--out", str(out), "--resolution", "32"]
    assert main([*args, "--n-train", "30", "--n-val", "12", "--tasks", "knn,linear,seg,depth,corr"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"trained", "random_init", "meta"}
    assert set(results["trained"]) == {"knn", "linear", "seg", "depth", "corr"}
    assert 0 <= results["random_init"]["seg"]["miou"] <= 1 and 0 <= results["trained"]["seg"]["nn_miou"] <= 1
    assert (out / "report.md").read_text().count("| knn |") == 4
    assert (out / "results.png").stat().st_size > 0 and (out / "pictures.png").stat().st_size > 0
    images = next((out / "cache").glob("synthetic-*")) / "val"
    assert (
        main(
            [
                "visualize",
                str(tmp_path / "tiny.safetensors"),
                str(images),
                "--out",
                str(tmp_path / "pics"),
                "--resolution",
                "32",
                "--foreground",
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "pics").glob("*.png"))) >= 10
    assert main(["eval", str(tmp_path / "tiny.safetensors"), "--tasks", "knn,typo"]) == 2
    assert "valid: knn,linear" in capsys.readouterr().err


def test_a_users_folder_without_dense_labels_keeps_cls_only(tmp_path):
    from PIL import Image
    from safetensors.torch import load_file

    from opendino.eval.suite import evaluate

    _tiny_model(tmp_path)
    for split in ("train", "val"):
        for k, name in enumerate(("cats", "dogs")):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (48, 40), (200 * k, 30 * i, 90)).save(tmp_path / "data" / split / name / f"{i}.jpg")
    results = evaluate(
        tmp_path / "tiny.safetensors",
        data=str(tmp_path / "data"),
        tasks=("knn", "seg"),
        out=tmp_path / "r",
        resolution=32,
        progress=False,
        log=lambda _: None,
    )
    assert results["meta"]["classes"] == ["cats", "dogs"] and results["meta"]["n_val"] == 8
    assert "skipped" in results["trained"]["seg"] and 0 <= results["trained"]["knn"]["top1_k10"] <= 1
    cached = list((tmp_path / "r" / "cache" / "features").glob("*.safetensors"))
    assert cached and all("patch" not in load_file(str(f)) for f in cached)
