"""benchmarks/curation_pool.py: the long-tailed pool with near-duplicates and junk, and the balanced eval."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import pytest

from opendino.data.sources import FolderSource, open_source
from opendino.data.synthetic import CLASSES, SEG_CLASSES_FILE, render_scene
from opendino.eval.data import open_labelled

REPO = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("curation_pool", REPO / "benchmarks" / "curation_pool.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("curation_pool", module)
    spec.loader.exec_module(module)
    return module


cp = _load()


def test_default_quotas_are_long_tailed_at_3000():
    quotas = cp.class_quotas(3000, cp.DEFAULT_ZIPF)
    assert len(quotas) == len(CLASSES) and sum(quotas) == 3000
    assert quotas == sorted(quotas, reverse=True)
    assert quotas[0] / quotas[-1] >= 50 and quotas[-1] >= 10


@pytest.mark.parametrize("n,zipf", [(10, 1.8), (11, 5.0), (37, 3.0), (300, 1.8), (1001, 0.0)])
def test_quotas_sum_and_never_drop_a_class(n, zipf):
    quotas = cp.class_quotas(n, zipf)
    assert sum(quotas) == n and min(quotas) >= 1 and quotas == sorted(quotas, reverse=True)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    out = tmp_path_factory.mktemp("pool")
    manifest = cp.write_skewed_pool(out, 300, size=32, seed=3, progress=False)
    return out, manifest, cp.read_pool(manifest)


def test_pool_composition(pool):
    out, manifest, rows = pool
    assert manifest == out / "pool.csv"
    kinds = Counter(r["kind"] for r in rows)
    total = len(rows)
    assert kinds["original"] == 300
    assert abs(kinds["duplicate"] - 0.2 * total) <= 1 and abs(kinds["junk"] - 0.05 * total) <= 1
    originals = Counter(int(r["label"]) for r in rows if r["kind"] == "original")
    ranks = cp.class_ranks(3)
    assert [originals[c] for c in ranks] == cp.class_quotas(300, cp.DEFAULT_ZIPF)
    variants = Counter(r["variant"] for r in rows)
    assert all(variants[v] for v in cp.DUPLICATE_VARIANTS)


def test_manifest_rows_are_consistent(pool):
    out, _, rows = pool
    for i, r in enumerate(rows):
        path = out / r["path"]
        assert path.is_file() and path.stem == f"img_{i:06d}"
        group, label = int(r["group"]), int(r["label"])
        if r["kind"] == "original":
            assert group == i and 0 <= label < len(CLASSES) and path.suffix == ".png"
        elif r["kind"] == "duplicate":
            source = rows[group]
            assert source["kind"] == "original" and int(source["label"]) == label
            assert path.suffix == (".jpg" if r["variant"] == "jpeg" else ".png")
            if r["variant"] == "exact":
                assert path.read_bytes() == (out / source["path"]).read_bytes()
            else:
                assert path.read_bytes() != (out / source["path"]).read_bytes()
        else:
            assert r["kind"] == "junk" and label == -1 and group == -1 and r["variant"] in cp.JUNK_VARIANTS


def test_pool_folder_holds_only_the_images(pool):
    out, manifest, rows = pool
    source = FolderSource(out / "images")
    assert len(source) == len(rows) == len(list((out / "images").iterdir()))
    assert {Path(p).name for p, _ in source.records} == {Path(r["path"]).name for r in rows}
    assert source.load(0) is not None and tuple(source.load(0).shape) == (3, 32, 32)
    listed = open_source(manifest)  # the manifest is also a labelled list
    assert len(listed) == len(rows) and [listed.label(i) for i in range(len(rows))] == [int(r["label"]) for r in rows]


def test_balanced_eval_reads_with_the_eval_loader(tmp_path):
    for split in ("train", "val"):
        root = cp.write_balanced_eval(tmp_path, 3, size=32, seed=0, split=split)
        assert root == tmp_path / split
    assert (tmp_path / SEG_CLASSES_FILE).read_text().split() == list(CLASSES)
    splits = open_labelled(tmp_path)
    for split in splits.values():
        assert split.classes == sorted(CLASSES)
        assert Counter(split.labels.tolist()) == dict.fromkeys(range(len(CLASSES)), 3)
        assert split.has(".seg.png") and split.has(".depth.png") and split.has(".inst.png")
    path = splits["val"].paths[0]
    assert CLASSES[render_scene(int(path.stem), 32, "val").label] == path.parent.name
