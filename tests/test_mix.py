"""Data mixes: the manifest and its errors, the weighted and homogeneous sampler, tar-member lists."""

from __future__ import annotations

import io
import math
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from opendino.cli import main
from opendino.config import ConfigError
from opendino.data.augment import CropConfig
from opendino.data.config import DataConfig
from opendino.data.loader import StepBatchSampler, _seed, build_ssl_loader
from opendino.data.mix import MixedSource, Mixture, open_mix, read_manifest, write_manifest
from opendino.data.sources import FolderSource, ListSource, TarShardSource, decode_image, open_source
from opendino.data.synthetic import write_image_folder
from tests.conftest import REPO


def _rgb(seed: int, w: int = 24, h: int = 20) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _folder(root: Path, n: int, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        _rgb(seed * 1000 + i).save(root / f"{i:03d}.png")
    return root


def _shard(path: Path, n: int, seed: int = 0, prefix: str = "") -> Path:
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            _rgb(seed * 1000 + i).save(buf, "JPEG" if i % 2 else "PNG")
            data = buf.getvalue()
            info = tarfile.TarInfo(f"{prefix}sample{i:03d}.{'jpg' if i % 2 else 'png'}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            label = str(i % 3).encode()
            info = tarfile.TarInfo(f"{prefix}sample{i:03d}.cls")
            info.size = len(label)
            tar.addfile(info, io.BytesIO(label))
    return path


def _sigma_ok(count: int, total: int, p: float) -> bool:
    return abs(count - total * p) <= 3 * math.sqrt(total * p * (1 - p))


# --- the manifest ------------------------------------------------------------------------------------------


def test_a_manifest_is_read_with_paths_relative_to_its_folder(tmp_path):
    (tmp_path / "mix").mkdir()
    manifest = tmp_path / "mix" / "mix.yaml"
    manifest.write_text(
        "# opendino data mix\n"
        "sources:\n"
        "  - {name: clustered, path: clustered.txt, weight: 0.6}   # a comment\n"
        "  - {name: retrieved, path: sub/retrieved.txt, weight: 0.2}\n"
        "  - {name: in1k, path: /data/imagenet/train, weight: 0.2}\n"
        "homogeneous: {source: in1k, fraction: 0.1}\n"
    )
    entries, homogeneous = read_manifest(manifest)
    assert entries == [
        ("clustered", str(tmp_path / "mix" / "clustered.txt"), 0.6),
        ("retrieved", str(tmp_path / "mix" / "sub" / "retrieved.txt"), 0.2),
        ("in1k", "/data/imagenet/train", 0.2),
    ]
    assert homogeneous == ("in1k", 0.1)
    manifest.write_text("sources:\n  - {name: only, path: a.txt}\n")  # weight 1 by default, no homogeneous
    assert read_manifest(manifest) == ([("only", str(tmp_path / "mix" / "a.txt"), 1.0)], None)


def test_write_manifest_round_trips_and_writes_inner_paths_relative(tmp_path):
    out = tmp_path / "curated" / "mix.yml"
    sources = [("a", tmp_path / "curated" / "a.txt", 3), ("b", "b.txt", 1.5), ("c", "/elsewhere/shards-*.tar", 0.5)]
    write_manifest(out, sources, ("b", 0.25))
    text = out.read_text()
    assert text.startswith("# opendino data mix")
    raw = yaml.safe_load(text)
    assert [s["path"] for s in raw["sources"]] == ["a.txt", "b.txt", "/elsewhere/shards-*.tar"]
    entries, homogeneous = read_manifest(out)
    assert entries == [
        ("a", str(tmp_path / "curated" / "a.txt"), 3.0),
        ("b", str(tmp_path / "curated" / "b.txt"), 1.5),
        ("c", "/elsewhere/shards-*.tar", 0.5),
    ]
    assert homogeneous == ("b", 0.25)
    with pytest.raises(ConfigError, match="duplicate name"):  # the same rules as reading
        write_manifest(out, [("a", "x.txt", 1), ("a", "y.txt", 1)])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("sources: []\n", "no sources"),
        ("homogeneous: {source: a, fraction: 0.1}\n", "no sources"),
        ("sources:\n  - {path: a.txt, weight: 1}\n", r"sources\[0\].*missing name"),
        ("sources:\n  - {name: a, weight: 1}\n", r"sources\[0\].*missing path"),
        ("sources:\n  - {name: a, path: a.txt}\n  - {name: a, path: b.txt}\n", r"sources\[1\].*duplicate name 'a'"),
        ("sources:\n  - {name: a, path: a.txt, weight: 0}\n", r"sources\[0\].*weight=0: must be a number > 0"),
        ("sources:\n  - {name: a, path: a.txt, weight: -2}\n", r"weight=-2: must be a number > 0"),
        ("sources:\n  - {name: a, path: a.txt, weight: lots}\n", r"weight='lots': must be a number > 0"),
        ("sources:\n  - {name: a, path: a.txt, wieght: 1}\n", r"unknown key\(s\) wieght; valid: name, path, weight"),
        ("sources:\n  - {name: a, path: other.yaml}\n", r"sources\[0\].*cannot name another manifest"),
        (
            "sources:\n  - {name: a, path: a.txt}\n  - {name: b, path: b.txt}\n"
            "homogeneous: {source: c, fraction: 0.1}\n",
            "unknown source 'c'; valid: a, b",
        ),
        ("sources:\n  - {name: a, path: a.txt}\nhomogeneous: {source: a, fraction: 1.5}\n", r"fraction=1.5.*\[0, 1\]"),
        ("sources:\n  - {name: a, path: a.txt}\nhomogeneous: {source: a, fraction: -0.1}\n", r"fraction=-0.1"),
        ("sources:\n  - {name: a, path: a.txt}\nweights: [1]\n", r"unknown key\(s\) weights"),
        ("- just a list\n", "a mapping with a sources list"),
    ],
)
def test_manifest_errors_name_the_file_the_entry_and_what_is_valid(tmp_path, body, message):
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(body)
    with pytest.raises(ConfigError, match=message) as err:
        read_manifest(manifest)
    assert str(manifest) in str(err.value)
    with pytest.raises(ValueError, match=message):  # through open_source (ConfigError is a ValueError)
        open_source(manifest)


def test_an_empty_or_missing_source_is_an_error_naming_the_entry(tmp_path):
    _folder(tmp_path / "full", 3)
    (tmp_path / "empty").mkdir()
    manifest = write_manifest(tmp_path / "m.yaml", [("full", "full", 1), ("nothing", "empty", 1)])
    with pytest.raises(ConfigError, match=rf"{manifest}: source 'nothing' .*holds no images"):
        open_source(manifest)
    write_manifest(manifest, [("full", "full", 1), ("gone", "missing.txt", 1)])
    with pytest.raises(FileNotFoundError, match=rf"{manifest}: source 'gone'"):
        open_source(manifest)


def test_data_config_knows_the_mix_source():
    DataConfig(source="mix", path="m.yaml").check()
    DataConfig(path="m.yml").check()
    with pytest.raises(ConfigError, match="data.source=mix needs a .yaml/.yml mix manifest"):
        DataConfig(source="mix", path="images/").check()
    with pytest.raises(ConfigError, match="is a mix manifest: data.source=mix or null"):
        DataConfig(source="folder", path="m.yaml").check()
    with pytest.raises(ConfigError, match="data.source=mix needs data.path"):
        DataConfig(source="mix").check()


# --- the mixed source ----------------------------------------------------------------------------------------


def test_open_source_of_a_manifest_concatenates_its_sources(tmp_path):
    write_image_folder(tmp_path / "world", 4, size=32)
    folder = FolderSource(tmp_path / "world" / "train")
    _folder(tmp_path / "listed", 3, seed=1)
    (tmp_path / "listed.txt").write_text("".join(f"listed/{i:03d}.png\n" for i in range(3)))
    _shard(tmp_path / "shard-000.tar", 5, seed=2)
    manifest = write_manifest(
        tmp_path / "mix.yaml",
        [("world", "world/train", 2), ("listed", "listed.txt", 1), ("shards", "shard-*.tar", 1)],
        ("shards", 0.5),
    )
    mix = open_source(manifest)
    assert isinstance(mix, MixedSource) and isinstance(open_source(manifest, "mix"), MixedSource)
    assert len(mix) == 4 + 3 + 5 == len(mix.records)
    assert mix.mixture == Mixture(("world", "listed", "shards"), (0, 4, 7), (4, 3, 5), (0.5, 0.25, 0.25), 2, 0.5)
    shards = TarShardSource([tmp_path / "shard-000.tar"])
    subs = [folder, ListSource(tmp_path / "listed.txt"), shards]
    for j, sub in enumerate(subs):
        for i in range(len(sub)):
            k = mix.mixture.offsets[j] + i
            assert mix.source_of(k) == (j, i)
            assert mix.path(k) == sub.path(i) and mix.label(k) == sub.label(i)
            assert torch.equal(mix.load(k), sub.load(i))
    assert mix.label(7 + 4) == 1  # a tar shard's .cls label is kept
    assert mix.classes == []  # the folder's class names are not the other sources'
    mix.check_readable()
    same = open_mix(write_manifest(tmp_path / "twice.yaml", [("a", "world/train", 1), ("b", "world/train", 1)]))
    assert same.classes == folder.classes and len(same) == 8


def test_the_loader_follows_the_mixture_of_its_source(tmp_path):
    _folder(tmp_path / "a", 4)
    _folder(tmp_path / "b", 6, seed=1)
    mix = open_source(write_manifest(tmp_path / "m.yaml", [("a", "a", 1), ("b", "b", 3)]))
    loader = build_ssl_loader(mix, [CropConfig(16, 8, 1)], batch_size=4, seed=5)
    assert loader.batch_sampler.mixture is mix.mixture
    expected = StepBatchSampler(len(mix), 4, seed=5, mixture=mix.mixture).batch_at(0)
    assert next(iter(loader.batch_sampler)) == expected
    assert next(iter(loader))["global"].shape == (2 * 4, 3, 16, 16)


def test_a_nested_mix_is_refused(tmp_path):
    _folder(tmp_path / "a", 2)
    inner = open_mix(write_manifest(tmp_path / "inner.yaml", [("a", "a", 1)]))
    with pytest.raises(ConfigError, match="mixes do not nest"):
        MixedSource([("inner", inner, 1.0)])


# --- the sampler -----------------------------------------------------------------------------------------------


def _expected_plain(n, batch, seed, step, rank=0, world=1):
    """The documented rule without a mixture: epoch e of positions is randperm(n) seeded by (seed, e)."""
    start = (step * world + rank) * batch
    out = []
    for q in range(start, start + batch):
        epoch, offset = divmod(q, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(seed, epoch)))
        out.append((int(perm[offset]), _seed(seed, 1, q), _seed(seed, 2, step)))
    return out


def test_without_a_mixture_the_batches_follow_the_single_source_rule():
    for rank, world in [(0, 1), (1, 2)]:
        sampler = StepBatchSampler(13, 5, seed=4, rank=rank, world_size=world, mixture=None)
        for step in [0, 1, 2, 7]:
            got = [(r.index, r.seed, r.mask_seed) for r in sampler.batch_at(step)]
            assert got == _expected_plain(13, 5, 4, step, rank, world)


def test_mixed_positions_follow_the_documented_rule():
    mix = Mixture.of(["a", "b", "c"], [7, 11, 3], [2, 1, 1], ("c", 0.3))
    sampler = StepBatchSampler(21, 6, seed=9, mixture=mix)
    cumulative = np.cumsum(mix.weights)
    uniform = lambda *parts: (_seed(*parts) + 0.5) / 2**32  # noqa: E731
    for step in range(40):
        homogeneous = uniform(9, 4, step) < 0.3
        for q, ref in zip(range(step * 6, step * 6 + 6), sampler.batch_at(step), strict=True):
            j = 2 if homogeneous else int(np.searchsorted(cumulative, uniform(9, 5, q), side="right"))
            epoch, offset = divmod(q, mix.sizes[j])
            gen = torch.Generator().manual_seed(_seed(9, 6, j, epoch))
            assert ref.index == mix.offsets[j] + int(torch.randperm(mix.sizes[j], generator=gen)[offset])
            assert ref.seed == _seed(9, 1, q)  # sample seeds and masks as without a mixture
            assert ref.mask_seed == _seed(9, 2, step)


def test_each_source_gets_its_weight_of_the_images():
    mix = Mixture.of(["big", "mid", "small"], [500, 300, 40], [6, 3, 1])
    sampler = StepBatchSampler(840, 32, seed=1, mixture=mix)
    refs = [r for step in range(200) for r in sampler.batch_at(step)]
    counts = Counter(mix.source_of(r.index) for r in refs)
    assert mix.weights == pytest.approx((0.6, 0.3, 0.1))
    for j, p in enumerate(mix.weights):
        assert _sigma_ok(counts[j], len(refs), p), (j, counts[j], len(refs) * p)
    # within a source, no image repeats inside a window of n_j consecutive positions
    small = [(i, r.index) for i, r in enumerate(refs) if mix.source_of(r.index) == 2]
    for window in range(len(refs) // 40):
        seen = [k for i, k in small if i // 40 == window]
        assert len(seen) == len(set(seen)) and all(800 <= k < 840 for k in seen)


def test_a_fraction_of_the_steps_is_homogeneous_and_holds_only_that_source():
    mix = Mixture.of(["curated", "in1k"], [400, 100], [0.8, 0.2], ("in1k", 0.25))
    ranks = [StepBatchSampler(500, 8, seed=3, rank=r, world_size=2, mixture=mix) for r in range(2)]
    steps = range(400)
    homogeneous = [s for s in steps if ranks[0].homogeneous_at(s)]
    assert homogeneous == [s for s in steps if ranks[1].homogeneous_at(s)]  # the same on every rank
    assert _sigma_ok(len(homogeneous), len(steps), 0.25)
    for step in steps:
        sources = {mix.source_of(r.index) for rank in ranks for r in rank.batch_at(step)}
        if step in homogeneous:
            assert sources == {1}
        else:
            assert 0 in sources  # 16 draws at 0.8: a mixed step without the curated source is vanishingly rare
    mixed = [mix.source_of(r.index) for s in steps if s not in homogeneous for r in ranks[0].batch_at(s)]
    assert _sigma_ok(mixed.count(1), len(mixed), 0.2)  # the homogeneous source keeps its weight in mixed steps
    never = StepBatchSampler(500, 8, seed=3, mixture=Mixture.of(["a", "b"], [400, 100], [1, 1], ("b", 0.0)))
    always = StepBatchSampler(500, 8, seed=3, mixture=Mixture.of(["a", "b"], [400, 100], [1, 1], ("b", 1.0)))
    assert not any(never.homogeneous_at(s) for s in steps) and all(always.homogeneous_at(s) for s in steps)


def test_a_mixed_sampler_resumes_exactly_and_shards_like_one_big_batch():
    mix = Mixture.of(["a", "b", "c"], [9, 25, 4], [1, 2, 1], ("a", 0.2))
    running = iter(StepBatchSampler(38, 6, seed=2, mixture=mix))
    batches = [next(running) for _ in range(30)]
    for step in [0, 5, 17, 29]:
        assert StepBatchSampler(38, 6, seed=2, mixture=mix).batch_at(step) == batches[step]
    resumed = iter(StepBatchSampler(38, 6, seed=2, start_step=17, mixture=mix))
    assert [next(resumed) for _ in range(13)] == batches[17:]
    halves = [StepBatchSampler(38, 3, seed=2, rank=r, world_size=2, mixture=mix) for r in range(2)]
    for step in range(30):
        assert halves[0].batch_at(step) + halves[1].batch_at(step) == batches[step]
    other = StepBatchSampler(38, 6, seed=3, mixture=mix)
    assert [other.batch_at(s) for s in range(30)] != batches
    with pytest.raises(ValueError, match="the mixture holds 38 images, the source 40"):
        StepBatchSampler(40, 6, mixture=mix)


# --- lists of tar members -------------------------------------------------------------------------------------


def test_a_list_of_tar_members_loads_the_shards_pixels(tmp_path):
    (tmp_path / "shards").mkdir()
    paths = [_shard(tmp_path / "shards" / f"pool-{k}.tar", 4, seed=k, prefix="./" if k else "") for k in range(2)]
    shards = TarShardSource(paths)
    assert shards.path(5).endswith("pool-1.tar:./sample001.jpg")
    (tmp_path / "pool.txt").write_text("".join(shards.path(i) + "\n" for i in range(len(shards))))
    listed = open_source(tmp_path / "pool.txt")
    assert isinstance(listed, ListSource) and len(listed) == len(shards) == 8
    for i in range(len(shards)):
        img = listed.load(i)
        assert img is not None and torch.equal(img, shards.load(i))
    # relative paths (relative to the list) and a CSV with labels; a missing member is an unreadable image
    rel = [f"shards/pool-0.tar:sample00{i}.{'jpg' if i % 2 else 'png'},{i}" for i in range(4)]
    (tmp_path / "pool.csv").write_text("\n".join([*rel, "shards/pool-0.tar:nope.png,0"]) + "\n")
    csv = open_source(tmp_path / "pool.csv")
    assert [csv.label(i) for i in range(4)] == [0, 1, 2, 3]
    assert all(torch.equal(csv.load(i), shards.load(i)) for i in range(4)) and csv.load(4) is None
    # an ordinary file is still decoded as before, even with ".tar:" in its name
    _rgb(7).save(tmp_path / "odd.tar:name.png")
    (tmp_path / "odd.txt").write_text("odd.tar:name.png\n")
    assert torch.equal(open_source(tmp_path / "odd.txt").load(0), decode_image(tmp_path / "odd.tar:name.png"))


# --- the trainer ------------------------------------------------------------------------------------------------


def test_the_demo_preset_trains_on_a_mix_manifest(tmp_path):
    _folder(tmp_path / "data" / "a", 5)
    _shard(tmp_path / "data" / "b.tar", 4, seed=1)
    manifest = write_manifest(tmp_path / "data" / "mix.yaml", [("a", "a", 1), ("b", "b.tar", 1)], ("b", 0.5))
    run = tmp_path / "run"
    small = ["train.batch_size=4", "train.steps=2", "log.every=1", "log.progress=false", "log.tensorboard=false"]
    preset = REPO / "configs" / "demo" / "pretrain.yaml"
    assert main(["train", str(preset), f"run.dir={run}", f"data.path={manifest}", *small]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["path"] == str(manifest)
    assert (run / "teacher.safetensors").exists()
