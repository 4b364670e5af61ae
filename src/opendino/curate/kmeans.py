"""Stage 3 of curation: hierarchical k-means with resampling (Vo et al., 2024), on faiss, over ranks.

Level 1 clusters the embeddings; level ``l > 1`` clusters the centroids of level ``l - 1``. A level runs
``steps`` k-means: step 0 on all its points; each later step takes from every cluster the ``sample_size``
points nearest its centroid, runs a fresh k-means (new k-means++ seeding) on those samples only, and
re-assigns every point of the level to the new centroids. Each k-means is k-means++ (greedy: the best of
``2 + ln k`` candidates drawn by squared distance) followed by a fixed number of Lloyd updates in float64;
a cluster left empty keeps its centroid. Distances are squared L2 (on the unit embeddings, ``2 - 2 cos``).

Scale: the points of level 1 stay memory-mapped and are read in chunks, so memory is the chunk plus
O(k·d). k-means++ seeds from a uniform sample of at most ``INIT_SAMPLE_PER_CLUSTER · k`` points (all of
them at the upper levels and in the resampled runs, which are small), and above ``KMEANS_PP_MAX_K``
clusters from ``k`` uniform points. Nearest-centroid search is faiss's exact L2 ``knn`` on the CPU, or the
same distance as one matrix product on a torch device (a GPU).

Several ranks (``torch.distributed``, any backend that sums float64: gloo on CPUs): each rank holds a
contiguous share of level 1's points; centroid sums and counts are all-reduced, the k-means++ sample and
the resampling candidates are gathered, so every rank computes the same centroids as one process would
(to the rounding of the summation order). The upper levels are small and computed on every rank alike.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

INIT_SAMPLE_PER_CLUSTER = 64
# k-means++ costs O(k^2 · INIT_SAMPLE_PER_CLUSTER · d): above this many clusters the seeds are a uniform
# sample of the points instead (faiss's own initialisation).
KMEANS_PP_MAX_K = 16384
CHUNK_ELEMENTS = 2**25  # distances per assignment chunk (rows x clusters): 128 MiB of float32


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Points:
    """The points one level clusters: global positions ``[0, n)``, of which this rank holds ``[lo, hi)``
    (all of them unless ``sharded``), read as float32 through ``take(positions)``."""

    def __init__(
        self,
        n: int,
        dim: int,
        take: Callable[[np.ndarray], np.ndarray],
        sharded: bool = False,
        device: str = "faiss",
    ) -> None:
        self.n, self.dim, self.take = n, dim, take
        self.device = device  # "faiss": faiss on the CPU; else the torch device nearest-centroid search runs on
        self.sharded = sharded and _distributed()
        rank, world = (dist.get_rank(), dist.get_world_size()) if self.sharded else (0, 1)
        self.lo, self.hi = n * rank // world, n * (rank + 1) // world

    @classmethod
    def in_memory(cls, x: np.ndarray, device: str = "faiss") -> Points:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return cls(len(x), x.shape[1], lambda positions: x[positions], device=device)

    def chunks(self, rows: int):
        for a in range(self.lo, self.hi, rows):
            yield a, np.ascontiguousarray(self.take(np.arange(a, min(a + rows, self.hi))))

    def gather(self, positions: np.ndarray) -> np.ndarray:
        """The vectors at the global ``positions``, on every rank: each rank fills those it holds."""
        out = np.zeros((len(positions), self.dim), dtype=np.float32)
        mine = np.nonzero((positions >= self.lo) & (positions < self.hi))[0]
        if len(mine):
            out[mine] = self.take(positions[mine])
        if self.sharded:
            t = torch.from_numpy(out)
            dist.all_reduce(t)  # owners are disjoint: the sum is the vector, exactly
        return out

    def all_positions(self, local: np.ndarray) -> np.ndarray:
        """Per-point values of this rank's share, concatenated in position order on every rank."""
        if not self.sharded:
            return local
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
        return np.concatenate(parts)


def _chunk_rows(k: int) -> int:
    return max(256, CHUNK_ELEMENTS // max(k, 1))


class NearestCentroid:
    """Squared L2 distance to the nearest of fixed centroids and its index, with faiss (exact) or on a torch
    device (``||x||^2 - 2 x·c + ||c||^2``, one matrix product, as faiss computes it); the centroids go to
    the device once, not once per chunk."""

    def __init__(self, centroids: np.ndarray, device: str = "faiss") -> None:
        self.centroids, self.device = np.ascontiguousarray(centroids, dtype=np.float32), device
        if device != "faiss":
            self.on_device = torch.from_numpy(self.centroids).to(device)
            self.norms = (self.on_device * self.on_device).sum(1)

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.device == "faiss":
            d, i = faiss.knn(np.ascontiguousarray(x), self.centroids, 1)
            return d[:, 0], i[:, 0]
        xt = torch.from_numpy(x).to(self.device)
        best, index = ((xt * xt).sum(1, keepdim=True) - 2.0 * xt @ self.on_device.T + self.norms[None]).min(1)
        return best.clamp_min(0).cpu().numpy(), index.cpu().numpy()


def assign(points: Points, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid and its squared L2 distance for this rank's points."""
    search = NearestCentroid(centroids, points.device)
    labels, dists = [], []
    for _, x in points.chunks(_chunk_rows(len(centroids))):
        d, i = search(x)
        labels.append(i)
        dists.append(d)
    if not labels:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(labels), np.concatenate(dists)


def _squared_distances(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1)[None, :] - 2.0 * (c @ x.T) + (c * c).sum(1)[:, None]
    return np.maximum(d, 0.0)


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeds ``[k, D]`` from the rows of ``x``."""
    x = x.astype(np.float64)
    n_candidates = 2 + int(math.log(k))
    centres = [x[rng.integers(len(x))]]
    closest = _squared_distances(x, centres[0][None])[0]
    for _ in range(1, k):
        cumulative = np.cumsum(closest)
        draws = rng.random(n_candidates) * cumulative[-1]
        candidates = np.minimum(np.searchsorted(cumulative, draws), len(x) - 1)
        trial = np.minimum(closest[None, :], _squared_distances(x, x[candidates]))
        best = int(trial.sum(1).argmin())
        centres.append(x[candidates[best]])
        closest = trial[best]
    return np.stack(centres).astype(np.float32)


def lloyd(points: Points, centroids: np.ndarray, iterations: int, progress: bool = False) -> np.ndarray:
    """``iterations`` Lloyd updates (no early stop), means accumulated in float64 and summed over ranks."""
    centroids = centroids.astype(np.float32).copy()
    k = len(centroids)
    for _ in tqdm(range(iterations), desc=f"k-means k={k}", unit="it", disable=not progress, leave=False):
        sums = torch.zeros(k, points.dim, dtype=torch.float64)
        counts = torch.zeros(k, dtype=torch.float64)
        search = NearestCentroid(centroids, points.device)
        for _, x in points.chunks(_chunk_rows(k)):
            _, nearest = search(x)
            index = torch.from_numpy(nearest)
            sums.index_add_(0, index, torch.from_numpy(x).double())
            counts.index_add_(0, index, torch.ones(len(index), dtype=torch.float64))
        if points.sharded:
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        filled = counts > 0  # an empty cluster keeps its centroid
        centroids[filled.numpy()] = (sums[filled] / counts[filled, None]).float().numpy()
    return centroids


def kmeans(points: Points, k: int, iterations: int, rng: np.random.Generator, progress: bool = False) -> np.ndarray:
    """k-means++ seeding (on a uniform sample of at most ``INIT_SAMPLE_PER_CLUSTER · k`` points; above
    ``KMEANS_PP_MAX_K`` clusters: ``k`` points drawn uniformly), then Lloyd."""
    if k > KMEANS_PP_MAX_K:
        seeds = points.gather(np.sort(rng.choice(points.n, k, replace=False)))
        return lloyd(points, seeds, iterations, progress)
    m = min(points.n, INIT_SAMPLE_PER_CLUSTER * k)
    sample = np.arange(points.n) if m == points.n else np.sort(rng.choice(points.n, m, replace=False))
    seeds = kmeans_plus_plus(points.gather(sample), k, rng)
    return lloyd(points, seeds, iterations, progress)


def closest_per_cluster(points: Points, labels: np.ndarray, dists: np.ndarray, size: int) -> np.ndarray:
    """Sorted global positions of the ``size`` points nearest each centroid (ties: lower position)."""
    positions = np.arange(points.lo, points.lo + len(labels))

    def nearest(lab, d, pos):
        order = np.lexsort((pos, d, lab))
        lab, pos = lab[order], pos[order]
        starts = np.searchsorted(lab, lab, side="left")
        take = np.arange(len(lab)) - starts < size
        return lab[take], d[order][take], pos[take]

    candidates = nearest(labels, dists, positions)
    if points.sharded:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, candidates)
        candidates = nearest(*(np.concatenate([p[i] for p in parts]) for i in range(3)))
    return np.sort(candidates[2])


@dataclasses.dataclass
class Level:
    centroids: np.ndarray  # [k, D] float32
    labels: np.ndarray  # [n] the cluster of each point of the level (all ranks' points)
    distances: np.ndarray  # [n] squared L2 to that centroid


def cluster_level(
    points: Points,
    k: int,
    *,
    steps: int,
    sample_size: int,
    iterations: int,
    seed: int,
    checkpoint: Path | None = None,
    progress: bool = True,
) -> Level:
    """One level of the hierarchy. With ``checkpoint`` (a path prefix), the centroids of every finished
    step are saved there (``{prefix}_step{t}.npy``) and a rerun starts after the last saved step."""
    if points.n < k:
        raise ValueError(f"cannot make {k} clusters of {points.n} points: lower the number of clusters")
    start, centroids = 0, None
    if checkpoint is not None:
        pattern = re.compile(rf"{re.escape(checkpoint.name)}_step(\d+)\.npy")
        done = {int(m[1]): f for f in checkpoint.parent.iterdir() if (m := pattern.fullmatch(f.name))}
        if done:
            start = max(done) + 1
            centroids = np.load(done[start - 1])
    labels = dists = None
    if centroids is not None:
        labels, dists = assign(points, centroids)
    for step in tqdm(range(start, steps), desc=f"level k={k}", unit="step", disable=not progress):
        rng = np.random.default_rng(np.random.SeedSequence([seed, k, step]))
        if step == 0:
            centroids = kmeans(points, k, iterations, rng, progress)
        else:
            samples = closest_per_cluster(points, labels, dists, sample_size)
            centroids = kmeans(Points.in_memory(points.gather(samples), points.device), k, iterations, rng)
        labels, dists = assign(points, centroids)
        if checkpoint is not None and (not _distributed() or dist.get_rank() == 0):
            final = checkpoint.with_name(f"{checkpoint.name}_step{step:03d}.npy")
            tmp = final.with_name(final.name + ".tmp")  # never matched as a finished step
            with open(tmp, "wb") as f:
                np.save(f, centroids)
            os.replace(tmp, final)
        if points.sharded:
            dist.barrier()
    return Level(centroids, points.all_positions(labels), points.all_positions(dists))


def hierarchical_kmeans(
    level1: Points,
    sizes: list[int],
    *,
    steps: list[int],
    sample_sizes: list[int],
    iterations: int = 50,
    seed: int = 0,
    folder: Path | None = None,
    progress: bool = True,
) -> list[Level]:
    """All levels; ``sizes[l]`` clusters at level ``l + 1`` (decreasing). With ``folder`` every finished
    step is kept there and a rerun resumes after it."""
    levels = []
    points = level1
    for depth, (k, n_steps, size) in enumerate(zip(sizes, steps, sample_sizes, strict=True)):
        prefix = None if folder is None else Path(folder) / f"level{depth + 1}"
        levels.append(
            cluster_level(
                points,
                k,
                steps=n_steps,
                sample_size=size,
                iterations=iterations,
                seed=seed + depth,
                checkpoint=prefix,
                progress=progress,
            )
        )
        points = Points.in_memory(levels[-1].centroids, level1.device)
    return levels


def default_sample_sizes(n: int, sizes: list[int]) -> list[int]:
    """Roughly half the average cluster size of each level (its points: the level below's clusters)."""
    counts = [n, *sizes[:-1]]
    return [max(1, c // k // 2) for c, k in zip(counts, sizes, strict=True)]
