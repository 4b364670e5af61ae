"""Data curation: the water-filling sampler, dedup and retrieval on planted data, the k-means (2 gloo ranks
equal 1 process), and the ``opendino curate`` command (resume after kill -9, errors)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from opendino.cli import main
from opendino.curate.dedup import deduplicate
from opendino.curate.descriptors import THUMBNAIL_SIDE, copy_descriptors, thumbnail_descriptor
from opendino.curate.embed import EMBEDDINGS, EmbeddingStore
from opendino.curate.kmeans import NearestCentroid, Points, hierarchical_kmeans, kmeans, kmeans_plus_plus
from opendino.curate.pipeline import CurateConfig, _Stages
from opendino.curate.retrieval import nearest_in_pool
from opendino.curate.sampling import balanced_sample, water_fill


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _write_store(folder: Path, vectors: np.ndarray, hashes: list[str], shard: int = 64) -> EmbeddingStore:
    """An embedded pool as the embed stage writes it, from given vectors (several shards); the thumbnails
    are the same vectors, zero-padded (the same cosines)."""
    (folder / EMBEDDINGS).mkdir(parents=True)
    thumbs = np.zeros((len(vectors), THUMBNAIL_SIDE**2), dtype=np.float32)
    thumbs[:, : vectors.shape[1]] = vectors
    for i, start in enumerate(range(0, len(vectors), shard)):
        rows = list(range(start, min(start + shard, len(vectors))))
        np.save(folder / EMBEDDINGS / f"{i:05d}.npy", vectors[rows].astype(np.float16))
        np.save(folder / EMBEDDINGS / f"{i:05d}.thumb.npy", thumbs[rows].astype(np.float16))
        meta = {"records": rows, "paths": [f"img{r}.png" for r in rows], "hashes": [hashes[r] for r in rows]}
        (folder / EMBEDDINGS / f"{i:05d}.json").write_text(json.dumps({**meta, "skipped": []}))
    return EmbeddingStore(folder)


# --- water-filling and balanced sampling -------------------------------------------------------------


def test_water_fill_gives_equal_shares_and_hands_the_rest_of_small_children_to_their_siblings():
    rng = np.random.default_rng(0)
    assert water_fill([1, 5, 10], 9, rng).tolist() == [1, 4, 4]
    assert water_fill([3, 3], 10, rng).tolist() == [3, 3]  # not enough: everything
    shares = water_fill([2, 10, 10], 11, rng)  # level 4 gives 10; the 11th goes to one of the big two
    assert shares.sum() == 11 and shares[0] == 2 and sorted(shares[1:].tolist()) == [4, 5]
    for _ in range(50):
        caps = rng.integers(0, 30, size=rng.integers(1, 8))
        target = int(rng.integers(0, caps.sum() + 5))
        s = water_fill(caps, target, rng)
        assert s.sum() == min(target, caps.sum()) and (s <= caps).all() and (s >= 0).all()
        # equal shares: a child below its capacity gets at least as much as any other child, minus one
        below = s < caps
        if below.any():
            assert s[below].min() >= s.max() - 1


def test_balanced_sample_takes_exact_quotas_from_a_hand_made_tree():
    # level-1 clusters: c0 has 10 images, c1 2, c2 6, c3 1; level 2: P0 = {c0, c1}, P1 = {c2, c3}
    leaf = np.array([0] * 10 + [1] * 2 + [2] * 6 + [3])
    distances = np.arange(len(leaf), dtype=np.float32)[::-1].copy()  # later images nearer their centroid
    parents = [np.array([0, 0, 1, 1])]
    picks = balanced_sample(leaf, distances, parents, 8, strategy="closest", rng=np.random.default_rng(0))
    # top: [12, 7] -> 4 + 4; P0: [10, 2] -> 2 + 2; P1: [6, 1] -> 3 + 1
    assert np.bincount(leaf[picks], minlength=4).tolist() == [2, 2, 3, 1]
    assert set(picks[leaf[picks] == 0].tolist()) == {9, 8}  # the two nearest of c0
    random_picks = balanced_sample(leaf, distances, parents, 8, rng=np.random.default_rng(1))
    assert np.bincount(leaf[random_picks], minlength=4).tolist() == [2, 2, 3, 1]
    assert len(set(random_picks.tolist())) == 8  # without replacement
    # a multiplier lets a small cluster be taken several times: m = 3, top [36, 21] -> 8 + 8;
    # P0: [30, 6] -> 4 + 4 (c1 whole twice); P1: [18, 3] -> 5 + 3 (c3's one image three times)
    picks = balanced_sample(leaf, distances, parents, 16, multiplier=3, rng=np.random.default_rng(0))
    assert np.bincount(leaf[picks], minlength=4).tolist() == [4, 4, 5, 3]
    assert sorted(picks[leaf[picks] == 1].tolist()) == [10, 10, 11, 11] and (picks[leaf[picks] == 3] == 18).all()
    # empty clusters (kept centroids) at the end of a level: they get nothing, the others their shares
    picks = balanced_sample(
        leaf,
        distances,
        [np.array([0, 0, 1, 1, 2]), np.array([0, 0, 0])],
        8,
        n_clusters=[5, 4, 2],
        rng=np.random.default_rng(0),
    )
    assert np.bincount(leaf[picks], minlength=4).tolist() == [2, 2, 3, 1]
    # one level only: the leaves are the top
    picks = balanced_sample(leaf, distances, [], 4, strategy="closest", rng=np.random.default_rng(0))
    assert np.bincount(leaf[picks], minlength=4).tolist() == [1, 1, 1, 1]


# --- dedup and retrieval on planted data ----------------------------------------------------------------


def test_dedup_removes_planted_exact_and_near_duplicates_and_keeps_one_per_group(tmp_path):
    rng = np.random.default_rng(0)
    base = _unit(rng.normal(size=(100, 32)))
    near_of = rng.choice(100, 15, replace=False)
    exact_of = rng.choice(100, 10, replace=False)
    near = _unit(base[near_of] + 0.02 * rng.normal(size=(15, 32)))
    chain = _unit(near[:1] + 0.02 * rng.normal(size=(1, 32)))  # a copy of a copy: the same group
    vectors = np.concatenate([base, near, base[exact_of], chain])
    hashes = [f"h{i}" for i in range(115)] + [f"h{i}" for i in exact_of] + ["chain"]
    store = _write_store(tmp_path, vectors, hashes)
    exact_only = deduplicate(store, None, progress=False)
    assert exact_only.exact == 10 and exact_only.near == 0 and exact_only.keep[:115].all() and exact_only.keep[125]
    assert deduplicate(store, 0.95, k=8, descriptor="embedding", progress=False).near == 16
    result = deduplicate(store, 0.95, k=8, progress=False)
    assert result.exact == 10 and result.near == 16
    assert result.keep[:100].all() and not result.keep[100:].any()
    assert (result.group[100:115] == near_of).all() and (result.group[115:125] == exact_of).all()
    assert result.group[125] == near_of[0]


def test_the_thumbnail_descriptor_tells_copies_from_other_scenes_of_the_same_class():
    import io

    from opendino.data.sources import decode_image
    from opendino.data.synthetic import render_scene

    scenes = [render_scene(i, 64) for i in range(40)]
    first = scenes[0]
    others = [s for s in scenes[1:] if s.label == first.label]
    assert others
    buffer = io.BytesIO()
    first.image.save(buffer, format="JPEG", quality=70)
    original = torch.from_numpy(np.array(first.image)).permute(2, 0, 1)
    copies = [decode_image(buffer.getvalue()), torch.roll(original, 2, dims=2)]
    d = thumbnail_descriptor(original).astype(np.float32)
    assert abs(np.linalg.norm(d) - 1) < 1e-2
    copy_sims = [float(d @ thumbnail_descriptor(c).astype(np.float32)) for c in copies]
    other_sims = [
        float(d @ thumbnail_descriptor(torch.from_numpy(np.array(o.image)).permute(2, 0, 1)).astype(np.float32))
        for o in others
    ]
    assert min(copy_sims) > 0.9 > max(other_sims)
    digest, _ = copy_descriptors(original)
    assert digest == copy_descriptors(original.clone())[0] != copy_descriptors(copies[1])[0]


def test_retrieval_finds_planted_neighbours_across_chunks(tmp_path):
    rng = np.random.default_rng(1)
    pool = _unit(rng.normal(size=(300, 16)))
    store = _write_store(tmp_path, pool, [str(i) for i in range(300)])
    rows = np.arange(5, 300)  # a subset of the pool: positions are into rows
    planted = np.array([7, 150, 299])
    queries = _unit(pool[planted] + 0.01 * rng.normal(size=(3, 16)))
    sims, found = nearest_in_pool(store, rows, queries, 3, chunk=41, progress=False)
    assert (rows[found[:, 0]] == planted).all() and (sims[:, 0] > 0.99).all()
    exact = queries @ store.take(rows).T  # the best three of the whole pool, not of one chunk
    assert np.allclose(np.sort(exact, 1)[:, ::-1][:, :3], sims, atol=1e-5)
    assert (np.diff(sims, axis=1) <= 0).all()


# --- k-means ---------------------------------------------------------------------------------------------


def _blobs(n_per: int = 60, k: int = 6, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)) * 5
    labels = np.repeat(np.arange(k), n_per)
    return (centres[labels] + rng.normal(size=(k * n_per, dim))).astype(np.float32), labels


def test_kmeans_plus_plus_and_levels_recover_separated_blobs(tmp_path):
    x, truth = _blobs()
    seeds = kmeans_plus_plus(x, 6, np.random.default_rng(0))
    assert len({int(truth[np.argmin(((x - s) ** 2).sum(1))]) for s in seeds}) == 6  # one seed per blob
    levels = hierarchical_kmeans(Points.in_memory(x), [6, 2], steps=[3, 2], sample_sizes=[10, 1], progress=False)
    labels = levels[0].labels
    for blob in range(6):  # every blob is one cluster
        assert len(set(labels[truth == blob].tolist())) == 1
    assert len(set(labels.tolist())) == 6
    assert levels[1].labels.shape == (6,) and set(levels[1].labels.tolist()) == {0, 1}
    # a rerun with the step files continues and gives the same centroids
    first = hierarchical_kmeans(Points.in_memory(x), [6, 2], steps=[3, 2], sample_sizes=[10, 1], folder=tmp_path)
    (tmp_path / "level1_step002.npy").unlink()
    for f in tmp_path.glob("level2_*"):
        f.unlink()
    again = hierarchical_kmeans(Points.in_memory(x), [6, 2], steps=[3, 2], sample_sizes=[10, 1], folder=tmp_path)
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a.centroids, b.centroids) and np.array_equal(a.labels, b.labels)


def test_nearest_centroid_on_a_torch_device_matches_faiss():
    x, _ = _blobs(n_per=40, k=5, dim=12, seed=4)
    centroids = x[::37].copy()
    d_faiss, i_faiss = NearestCentroid(centroids)(x)
    d_torch, i_torch = NearestCentroid(centroids, device="cpu")(x)
    assert np.array_equal(i_faiss, i_torch) and np.allclose(d_faiss, d_torch, atol=1e-3)
    exact = ((x[:, None] - centroids[None]) ** 2).sum(-1)
    assert np.array_equal(i_faiss, exact.argmin(1))
    big = kmeans(Points.in_memory(x), 7, 3, np.random.default_rng(0))  # the uniform seeding above the limit
    with pytest.MonkeyPatch.context() as m:
        m.setattr("opendino.curate.kmeans.KMEANS_PP_MAX_K", 4)
        uniform = kmeans(Points.in_memory(x), 7, 3, np.random.default_rng(0))
    assert big.shape == uniform.shape == (7, 12) and not np.allclose(big, uniform)


def _kmeans_rank(rank: int, world: int, port: int, x: np.ndarray, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        points = Points(len(x), x.shape[1], lambda pos: x[pos], sharded=True)
        assert points.hi - points.lo < len(x)  # each rank holds a share
        levels = hierarchical_kmeans(points, [12, 3], steps=[4, 3], sample_sizes=[8, 2], iterations=8, progress=False)
        if rank == 0:
            np.savez(out, **{f"c{i}": lv.centroids for i, lv in enumerate(levels)}, l0=levels[0].labels)
    finally:
        dist.destroy_process_group()
    os._exit(0)  # gloo's threads can crash interpreter teardown (tests/abort_at_exit.py)


def test_two_gloo_ranks_give_the_centroids_of_one_process(tmp_path):
    x, _ = _blobs(n_per=50, k=10, dim=6, seed=3)
    x = x[np.random.default_rng(0).permutation(len(x))]  # blobs spread over both ranks' shares
    single = hierarchical_kmeans(Points.in_memory(x), [12, 3], steps=[4, 3], sample_sizes=[8, 2], iterations=8)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two.npz"
    mp.start_processes(_kmeans_rank, args=(2, port, x, str(out)), nprocs=2, start_method="spawn")
    two = np.load(out)
    for i, level in enumerate(single):
        assert np.abs(two[f"c{i}"] - level.centroids).max() < 1e-5
    assert np.array_equal(two["l0"], single[0].labels)


# --- the command ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    """120 small images: coloured shapes on noise, with exact copies, and a seed set."""
    root = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    (root / "seeds").mkdir()
    colours = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (220, 220, 30)]
    for i in range(120):
        img = rng.integers(0, 60, size=(32, 32, 3), dtype=np.uint8)
        img[8:24, 8:24] = colours[i % 4]
        Image.fromarray(img).save(root / "images" / f"{i:03d}.png")
    for i in range(6):  # exact copies
        (root / "images" / f"copy{i}.png").write_bytes((root / "images" / f"{i:03d}.png").read_bytes())
    for i in range(2):
        img = np.zeros((32, 32, 3), dtype=np.uint8)
        img[8:24, 8:24] = colours[i]
        Image.fromarray(img).save(root / "seeds" / f"seed{i}.png")
    (root / "images" / "broken.png").write_bytes(b"not an image")
    return root


def _args(pool: Path, out: Path) -> list[str]:
    return [
        "curate",
        str(pool / "images"),
        "--out",
        str(out),
        "--size",
        "40",
        "--backbone",
        "vits16",
        "--resolution",
        "32",
        "--levels",
        "12,3",
        "--iterations",
        "5",
        "--chunk",
        "16",
        "--batch-size",
        "8",
        "--seed-set",
        str(pool / "seeds"),
        "--per-seed",
        "3",
    ]


def _kill_when(args: list[str], marker: Path, timeout: float = 120.0) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(
        [sys.executable, "-m", "opendino", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + timeout
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists()


def test_curate_writes_a_selection_and_resumes_after_kill_9_to_the_same_selection(pool, tmp_path):
    clean = tmp_path / "clean"
    assert main(_args(pool, clean)) == 0
    selection = (clean / "selection.txt").read_text().splitlines()
    clustered = (clean / "clustered.txt").read_text().splitlines()
    assert len(clustered) == 40 and len(set(clustered)) == 40
    assert len(selection) >= 40 and all(Path(p).exists() for p in selection)
    assert json.loads((clean / "dedup.json").read_text())["exact"] == 6
    duplicates = (clean / "duplicates.csv").read_text()
    assert duplicates.count(",exact") == 6 and "copy0.png" in duplicates
    assert "broken.png" in " ".join(EmbeddingStore(clean).skipped)
    report = (clean / "report.md").read_text()
    assert "| exact duplicates removed | 6 |" in report and (clean / "clusters.png").stat().st_size > 1000
    assert len(np.load(clean / "nn_similarity.npy")) == 120 and "nn_similarity.png" in report
    assert (clean / "retrieved.txt").read_text().strip() and (clean / "mix.yaml").exists()

    killed = tmp_path / "killed"
    _kill_when(_args(pool, killed), killed / EMBEDDINGS / "00002.json")  # during the embedding
    assert not (killed / "selection.txt").exists()
    _kill_when([*_args(pool, killed), "--resume"], killed / "kmeans" / "level2_step001.npy")  # in the k-means
    assert main([*_args(pool, killed), "--resume"]) == 0
    assert (killed / "selection.txt").read_text().splitlines() == selection
    # a new sampling size redoes the sampling only
    assert main([*_args(pool, killed)[:5], "30", *_args(pool, killed)[6:], "--resume"]) == 0
    assert len((killed / "clustered.txt").read_text().splitlines()) == 30
    # a redo with other settings that died half-way (its first file rewritten), then the first settings
    # again: every stage built on what it touched is redone, and the selection is the first one
    _Stages(CurateConfig(pool=str(pool), out=str(killed))).invalidate("dedup")
    np.save(killed / "keep.npy", np.zeros(126, dtype=bool))
    assert main([*_args(pool, killed), "--resume"]) == 0
    assert (killed / "selection.txt").read_text().splitlines() == selection


def test_curate_errors_are_clear(pool, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["curate", str(empty), "--out", str(tmp_path / "e"), "--size", "4", "--backbone", "vits16"]) == 2
    assert "no images" in capsys.readouterr().err
    args = _args(pool, tmp_path / "big")
    assert main([*args[:4], "--size", "5000", *args[6:]]) == 2
    assert "more than the 120 images left after deduplication" in capsys.readouterr().err
    args = _args(pool, tmp_path / "bad_backbone")
    assert main([*args[:7], "no_such_model", *args[8:]]) == 2
    assert "cannot be loaded" in capsys.readouterr().err
    assert main([*args[:4], "--size", "0"]) == 2
    assert "nothing to select" in capsys.readouterr().err
    assert main([*args, "--levels", "3,12"]) == 2
    assert "decreasing" in capsys.readouterr().err
    assert main([*args, "--mix", "clustered:abc"]) == 2
    assert "NAME=PATH:WEIGHT" in capsys.readouterr().err
    assert main([*args, "--mix", "x=/a:nan"]) == 2  # weights must be finite
    assert main([*args, "--mix", "clustered:1", "--mix", "clustered:2"]) == 2
    assert "given twice" in capsys.readouterr().err
    no_seeds = args[: args.index("--seed-set")] + args[args.index("--per-seed") :]
    assert main([*no_seeds, "--homogeneous", "retrieved:0.1"]) == 2  # no retrieval part without --seed-set
    assert "retrieved:0.1" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert main([*args[:3], str(tmp_path / "full"), *args[4:]]) == 2
    assert "--resume" in capsys.readouterr().err


def test_curate_under_torchrun_shares_the_embedding_and_the_k_means(pool, tmp_path):
    """2 gloo ranks: each embeds its chunks, both hold a share of level 1, rank 0 writes the rest; every
    rank exits 0 without interpreter teardown (tests/abort_at_exit.py)."""
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += [str(Path(__file__).parent / "abort_at_exit.py"), *_args(pool, out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((out / EMBEDDINGS).glob("[0-9]*.json"))) == 8  # 127 images in chunks of 16
    assert len((out / "clustered.txt").read_text().splitlines()) == 40
    levels = [np.load(out / "kmeans" / f"level{d}.npz") for d in (1, 2)]
    assert levels[0]["labels"].shape == (120,) and levels[1]["centroids"].shape == (3, 384)


def test_a_pool_of_tar_shards_gives_a_selection_training_can_read(pool, tmp_path):
    import tarfile

    from opendino.data.sources import open_source

    shards = tmp_path / "shards"
    shards.mkdir()
    images = sorted((pool / "images").glob("*.png"))
    for s in range(2):
        with tarfile.open(shards / f"pool-{s:04d}.tar", "w") as tar:
            for path in images[s::2]:
                tar.add(path, arcname=f"{path.stem}.png")
    out = tmp_path / "tar-curation"
    args = _args(pool, out)
    assert main([args[0], str(shards), *args[2:5], "20", *args[6:]]) == 0
    selection = open_source(out / "selection.txt")
    assert len(selection) >= 20 and all(".tar:" in selection.path(i) for i in range(len(selection)))
    assert all(selection.load(i) is not None for i in range(len(selection)))
    mix = open_source(out / "mix.yaml")
    assert len(mix) == len((out / "clustered.txt").read_text().splitlines()) + len(
        (out / "retrieved.txt").read_text().splitlines()
    )
