"""Stage 2 of curation: exact and near-duplicate removal, one image kept per group.

Exact duplicates share the digest of their decoded pixels. Near-duplicates are pairs whose descriptors'
cosine similarity is above a threshold among each image's ``k`` nearest neighbours (faiss, exact inner
product, in chunks of queries). The descriptor is the copy-detection thumbnail by default
(``opendino.curate.descriptors``) or the curation embedding. The pairs form a graph whose connected
components are the duplicate groups (as DINOv2 does with its copy-detection embeddings), and the first
image of each group in pool order is kept. A group can thus chain images that are not all similar to each
other, which is the point: a series of re-encoded copies of copies goes as one.
"""

from __future__ import annotations

import dataclasses

import faiss
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm import tqdm

from opendino.curate.embed import EmbeddingStore
from opendino.curate.retrieval import nearest_in_pool


@dataclasses.dataclass
class Dedup:
    keep: np.ndarray  # bool [N]: rows that survive
    group: np.ndarray  # int [N]: the row each row's group kept (itself if kept)
    exact: int  # rows removed as exact copies
    near: int  # further rows removed as near-duplicates
    distinct: np.ndarray  # bool [N]: rows that survive the exact copies alone

    @property
    def removed(self) -> int:
        return int((~self.keep).sum())


def _first_of_group(labels: np.ndarray) -> np.ndarray:
    """For each row, the smallest row index with the same label."""
    first = np.full(labels.max() + 1, len(labels), dtype=np.int64)
    np.minimum.at(first, labels, np.arange(len(labels)))
    return first[labels]


DESCRIPTORS = ("thumbnail", "embedding")


def near_duplicate_pairs(
    store: EmbeddingStore,
    rows: np.ndarray,
    threshold: float,
    k: int = 16,
    chunk: int = 8192,
    descriptor: str = "thumbnail",
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(i, j)`` of positions in ``rows`` (``i != j``) whose descriptors' cosine similarity is above
    ``threshold`` among the ``k`` nearest neighbours of each."""
    take = lambda r: store.take(r, descriptor)  # noqa: E731
    index = faiss.IndexFlatIP(take(rows[:1]).shape[1])
    for start in range(0, len(rows), chunk):
        index.add(take(rows[start : start + chunk]))
    k = min(k + 1, len(rows))  # every image is its own nearest neighbour
    left, right = [], []
    for start in tqdm(range(0, len(rows), chunk), desc="dedup", unit="chunk", disable=not progress):
        sims, neighbours = index.search(take(rows[start : start + chunk]), k)
        query = np.arange(start, start + len(sims))[:, None].repeat(k, 1)
        hit = (sims > threshold) & (neighbours != query) & (neighbours >= 0)
        left.append(query[hit])
        right.append(neighbours[hit])
    return np.concatenate(left), np.concatenate(right)


def deduplicate(
    store: EmbeddingStore,
    threshold: float | None,
    k: int = 16,
    descriptor: str = "thumbnail",
    progress: bool = True,
) -> Dedup:
    """Exact copies (same pixels) first, then, with a ``threshold``, near-duplicates among the rest."""
    n = len(store)
    _, exact_labels = np.unique(np.asarray(store.hashes), return_inverse=True)
    group = _first_of_group(exact_labels.reshape(-1))
    keep = group == np.arange(n)
    distinct, exact = keep.copy(), int(n - keep.sum())
    if threshold is not None and keep.sum() > 1:
        rows = np.nonzero(keep)[0]
        i, j = near_duplicate_pairs(store, rows, threshold, k, descriptor=descriptor, progress=progress)
        graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(len(rows), len(rows)))
        _, labels = connected_components(graph, directed=False)
        first = rows[_first_of_group(labels)]
        group[rows] = first
        group = group[group]  # exact copies follow their representative into its near-duplicate group
        keep = group == np.arange(n)
    return Dedup(keep=keep, group=group, exact=exact, near=int(n - keep.sum()) - exact, distinct=distinct)


def nearest_neighbour_similarities(
    store: EmbeddingStore,
    rows: np.ndarray,
    sample: int = 2000,
    seed: int = 0,
    descriptor: str = "thumbnail",
    progress: bool = True,
) -> np.ndarray:
    """The cosine similarity of up to ``sample`` images (drawn uniformly from ``rows``) to their nearest
    other image among ``rows``: its histogram shows where copies end and distinct images begin, which is
    how to choose ``--dedup`` for an embedder."""
    picked = np.sort(np.random.default_rng(seed).choice(len(rows), min(sample, len(rows)), replace=False))
    queries = store.take(rows[picked], descriptor)
    sims, found = nearest_in_pool(store, rows, queries, 2, descriptor=descriptor, progress=progress)
    own = found == picked[:, None]  # the image itself (or an identical vector ranked first)
    return np.where(own[:, 0], sims[:, 1], sims[:, 0])
