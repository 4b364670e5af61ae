"""The synthetic world: deterministic, split-disjoint, labelled by the largest visible object."""

from __future__ import annotations

import numpy as np
import pytest

from opendino.data.synthetic import CLASSES, render_scene


def test_deterministic_from_seed_split_index():
    a, b = render_scene(3, size=64), render_scene(3, size=64)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.label == b.label
    assert not np.array_equal(np.asarray(a.image), np.asarray(render_scene(3, size=64, seed=1).image))


def test_splits_never_share_scenes():
    train = {np.asarray(render_scene(i, 32).image).tobytes() for i in range(20)}
    val = {np.asarray(render_scene(i, 32, split="val").image).tobytes() for i in range(20)}
    assert not train & val


def test_label_is_the_largest_visible_object_and_all_classes_occur():
    labels = []
    for i in range(200):
        scene = render_scene(i, size=48)
        counts = np.bincount(scene.semantic.ravel(), minlength=len(CLASSES) + 1)[1:]
        assert counts[scene.label] == counts.max() > 0
        labels.append(scene.label)
    assert set(labels) == set(range(len(CLASSES)))


def test_bad_split():
    with pytest.raises(ValueError, match="valid: train, val, test"):
        render_scene(0, split="holdout")
