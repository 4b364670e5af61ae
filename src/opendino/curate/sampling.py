"""Stage 4 of curation: balanced sampling of the cluster tree to a target size.

The target is split over the top level's clusters, then recursively over each cluster's children, by
water-filling: every child gets an equal share, and the share a small child cannot fill (its capacity is
its number of images times ``multiplier``, the most times one image may be picked) goes to its siblings.
At a leaf (a level-1 cluster) of ``s`` images with target ``t``: all of them ``multiplier`` times if that
is at most ``t``, else the whole cluster ``t // s`` times plus ``t - (t // s) * s`` more images, the ones
nearest the centroid (``closest``) or drawn at random without replacement (``random``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

STRATEGIES = ("random", "closest")


def water_fill(capacities: Sequence[int], target: int, rng: np.random.Generator) -> np.ndarray:
    """Integer shares, none above its capacity, summing to ``min(target, sum(capacities))``: the largest
    level ``x`` with ``sum(min(x, a_i)) <= target``, then the remainder one each to children picked at
    random among those with room above ``x``."""
    a = np.asarray(capacities, dtype=np.int64)
    if a.sum() <= target:
        return a.copy()
    lo, hi = 0, int(a.max())  # sum(min(lo, a)) <= target < sum(min(hi, a))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if np.minimum(mid, a).sum() <= target else (lo, mid)
    shares = np.minimum(lo, a)
    missing = int(target - shares.sum())
    if missing:
        room = np.nonzero(a > lo)[0]
        shares[rng.choice(room, missing, replace=False)] += 1
    return shares


def balanced_sample(
    leaf_labels: np.ndarray,
    leaf_distances: np.ndarray,
    parents: Sequence[np.ndarray],
    target: int,
    *,
    n_clusters: Sequence[int] | None = None,
    multiplier: int = 1,
    strategy: str = "random",
    rng: np.random.Generator,
) -> np.ndarray:
    """Positions of the picked points (repeated when picked several times), in tree order.

    ``leaf_labels[i]`` is the level-1 cluster of point ``i`` and ``leaf_distances[i]`` its distance to that
    centroid; ``parents[j][c]`` is the level-``j + 2`` cluster of level-``j + 1`` cluster ``c``;
    ``n_clusters[j]`` the number of clusters of level ``j + 1`` (default: as the labels show; give it when
    the last clusters of a level may be empty)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    if n_clusters is None:
        n_clusters = [len(p) for p in parents] + [int((parents[-1] if parents else leaf_labels).max()) + 1]
    order = np.lexsort((np.arange(len(leaf_labels)), leaf_distances, leaf_labels))
    bounds = np.searchsorted(leaf_labels[order], np.arange(n_clusters[0] + 1))
    members = [order[bounds[c] : bounds[c + 1]] for c in range(n_clusters[0])]  # nearest first
    children = []  # children[j][c]: the level-(j + 1) clusters below level-(j + 2) cluster c
    for labels, k in zip(parents, n_clusters[1:], strict=True):
        sorted_ids = np.argsort(labels, kind="stable")
        cuts = np.searchsorted(labels[sorted_ids], np.arange(k + 1))
        children.append([sorted_ids[cuts[c] : cuts[c + 1]] for c in range(k)])
    sizes = [np.array([len(m) for m in members], dtype=np.int64)]
    for level in children:
        sizes.append(np.array([sizes[-1][kids].sum() for kids in level], dtype=np.int64))
    picked = []

    def descend(depth: int, cluster: int, share: int) -> None:
        if depth == 0:
            images = members[cluster]
            whole = min(share // max(len(images), 1), multiplier)
            picked.extend([images] * whole)
            rest = min(share - whole * len(images), len(images)) if whole < multiplier else 0
            if rest > 0:
                picked.append(images[:rest] if strategy == "closest" else np.sort(rng.choice(images, rest, False)))
            return
        kids = children[depth - 1][cluster]
        for kid, kid_share in zip(kids, water_fill(sizes[depth - 1][kids] * multiplier, share, rng), strict=True):
            if kid_share:
                descend(depth - 1, int(kid), int(kid_share))

    top = np.arange(len(sizes[-1]))
    for cluster, share in zip(top, water_fill(sizes[-1] * multiplier, target, rng), strict=True):
        if share:
            descend(len(children), int(cluster), int(share))
    return np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)
