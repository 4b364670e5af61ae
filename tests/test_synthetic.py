"""The synthetic world: deterministic, split-disjoint, any size, with consistent dense ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from opendino.cli import main
from opendino.data.synthetic import CLASS_COLORS, CLASSES, COLORS, DEPTH_RANGE, render_pair, render_scene, scene_spec


def test_deterministic_from_seed_split_index():
    a, b = render_scene(3, size=64), render_scene(3, size=64)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.caption == b.caption
    assert not np.array_equal(np.asarray(a.image), np.asarray(render_scene(3, size=64, seed=1).image))


def test_splits_never_share_scenes():
    train = {scene_spec(i) for i in range(200)}
    val = {scene_spec(i, split="val") for i in range(200)}
    assert not train & val


def test_any_resolution_renders_the_same_scene():
    small, large = render_scene(5, size=48), render_scene(5, size=160)
    assert small.label == large.label and small.caption == large.caption
    down = np.asarray(large.image.resize((48, 48), Image.Resampling.BOX)).astype(float)
    assert np.abs(down - np.asarray(small.image)).mean() < 20


def test_dense_maps_agree_with_each_other_and_the_label():
    labels, counts_objects = [], []
    for i in range(150):
        s = render_scene(i, size=48)
        counts = np.bincount(s.semantic.ravel(), minlength=len(CLASSES) + 1)[1:]
        assert counts[s.label] == counts.max() > 0
        objects = s.instance > 0
        assert np.array_equal(objects, s.semantic > 0)
        assert (s.depth[objects] >= DEPTH_RANGE[0]).all() and (s.depth[objects] <= DEPTH_RANGE[1]).all()
        assert (s.depth[~objects] >= 6).all()  # the background plane lies behind every object
        for k, o in enumerate(s.spec.objects):  # instance k+1 has its object's class and depth
            pix = s.instance == k + 1
            assert (s.semantic[pix] == o.cls + 1).all() and np.allclose(s.depth[pix], o.depth)
        labels.append(s.label)
        counts_objects.append(len(s.spec.objects))
    assert set(labels) == set(range(len(CLASSES)))
    assert set(counts_objects) == {1, 2, 3, 4, 5}


def test_caption_names_objects_colours_sizes_and_background():
    s = render_scene(7, size=32)
    for o in s.spec.objects:
        assert CLASSES[o.cls] in s.caption and o.color in s.caption and o.size in s.caption
    assert s.spec.background in s.caption and all(c in COLORS for c in s.spec.bg_colors)


def test_pair_correspondences_are_dense_ground_truth():
    first, second, flow = render_pair(3, size=96)
    valid = ~np.isnan(flow[..., 0])
    assert valid.mean() > 0.5
    x2 = np.clip(np.round(flow[..., 0][valid]).astype(int), 0, 95)
    y2 = np.clip(np.round(flow[..., 1][valid]).astype(int), 0, 95)
    assert (first.semantic[valid] == second.semantic[y2, x2]).mean() > 0.95
    a, b = np.asarray(first.image).astype(float), np.asarray(second.image).astype(float)
    matched = np.abs(a[valid] - b[y2, x2]).mean()
    shuffled = np.abs(a[valid] - b[np.random.default_rng(0).permutation(y2), x2]).mean()
    assert matched < shuffled / 3


def test_data_synth_writes_the_labelled_folder_layout(tmp_path):
    assert main(["data", "synth", "--out", str(tmp_path), "--n", "3", "--size", "32", "--pairs"]) == 0
    images = sorted(p for p in (tmp_path / "train").rglob("*.png") if p.stem.isdigit())
    assert len(images) == 3
    for img in images:
        stem = img.with_suffix("")
        seg = np.asarray(Image.open(f"{stem}.seg.png"))
        depth = np.asarray(Image.open(f"{stem}.depth.png"))
        assert seg.shape == depth.shape == (32, 32) and depth.min() >= 1000
        assert Image.open(f"{stem}.view2.png").size == (32, 32) and np.load(f"{stem}.flow.npy").shape == (32, 32, 2)
        assert img.parent.name in CLASSES and Path(f"{stem}.txt").read_text().strip()


def test_bad_split():
    with pytest.raises(ValueError, match="valid: train, val, test"):
        render_scene(0, split="holdout")


def test_scenes_are_object_centric_with_typical_colours():
    specs = [scene_spec(i) for i in range(400)]
    mains = [max(s.objects, key=lambda o: o.r) for s in specs]  # the main object is the only large one
    assert all(o.size == "large" and 0.3 <= o.cx <= 0.7 and 0.3 <= o.cy <= 0.7 for o in mains)
    assert all(o.color not in s.bg_colors for s in specs for o in s.objects)
    typical = np.mean([o.color == CLASS_COLORS[o.cls] for s in specs for o in s.objects])
    assert 0.5 < typical < 0.8  # 0.6 by design, plus chance matches, minus background clashes
    labels = [render_scene(i, size=48).label for i in range(60)]
    assert np.mean([label == main.cls for label, main in zip(labels, mains, strict=False)]) > 0.9
