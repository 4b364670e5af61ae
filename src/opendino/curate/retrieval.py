"""Stage 5 of curation: retrieval, the pool images nearest a seed set (DINOv2's and DINOv3's second kind
of curated data). Cosine similarity of the unit embeddings, exact (faiss inner product), the pool read in
chunks and each query's best ``k`` kept across chunks."""

from __future__ import annotations

import faiss
import numpy as np
from tqdm import tqdm

from opendino.curate.embed import EmbeddingStore


def nearest_in_pool(
    store: EmbeddingStore,
    rows: np.ndarray,
    queries: np.ndarray,
    k: int,
    chunk: int = 65536,
    descriptor: str = "embedding",
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Similarities and positions (into ``rows``) ``[Q, k]`` of each query's ``k`` nearest pool rows,
    best first (by the embeddings, or another descriptor of the store)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(k, len(rows))
    best_sim = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_pos = np.full((len(queries), k), -1, dtype=np.int64)
    for start in tqdm(range(0, len(rows), chunk), desc="retrieve", unit="chunk", disable=not progress):
        block = store.take(rows[start : start + chunk], descriptor)
        sims, found = faiss.knn(queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        sim = np.concatenate([best_sim, sims], 1)
        pos = np.concatenate([best_pos, found + start], 1)
        keep = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        best_sim, best_pos = np.take_along_axis(sim, keep, 1), np.take_along_axis(pos, keep, 1)
    return best_sim, best_pos
