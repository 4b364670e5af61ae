"""Stage 1 of curation: a pool of images -> unit-length fp16 embeddings in shards, memory-mapped.

The pool (any image source) is cut into chunks of ``chunk`` records; chunk ``i`` becomes
``embeddings/{i:05d}.npy`` (``[n_i, D]`` float16, L2-normalised global features: every later stage
compares images by cosine, and the hierarchical k-means' squared L2 on unit vectors is ``2 - 2 cos``)
``embeddings/{i:05d}.thumb.npy`` (the rows' copy-detection thumbnails, ``opendino.curate.descriptors``)
and ``embeddings/{i:05d}.json`` (the record index, path and pixel digest of each kept row, the unreadable
paths). Both are written to temporary names and renamed, the json last, so a killed run loses at most the
chunk it was on; a chunk whose json exists is done. Extraction is ``opendino extract``'s code path
(``extract_features``). With several ranks, rank ``r`` embeds chunks ``r, r + world, ...``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from opendino.curate.descriptors import THUMBNAIL_SIDE, copy_descriptors
from opendino.data.sources import ImageSource
from opendino.eval.features import extract_features
from opendino.runs import write_atomic

EMBEDDINGS = "embeddings"


def _save(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would add ".npy" to the temporary name
        np.save(f, array)


def embed_pool(
    source: ImageSource,
    model: nn.Module,
    out: Path,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    chunk: int = 4096,
    resolution: int = 224,
    batch_size: int = 64,
    device: str = "cpu",
    dtype: str = "fp32",
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> int:
    """Embeds the chunks of ``source`` this rank owns that are not done yet; returns how many it embedded."""
    folder = Path(out) / EMBEDDINGS
    folder.mkdir(parents=True, exist_ok=True)
    n_chunks = -(-len(source) // chunk)
    todo = [i for i in range(rank, n_chunks, world_size) if not (folder / f"{i:05d}.json").exists()]
    for number, i in enumerate(todo):
        indices = list(range(i * chunk, min((i + 1) * chunk, len(source))))
        if progress:
            print(f"embed: chunk {number + 1}/{len(todo)} ({len(indices)} images)", flush=True)
        try:
            feats = extract_features(
                model,
                source,
                indices=indices,
                mean=mean,
                std=std,
                resolution=resolution,
                batch_size=batch_size,
                device=device,
                dtype=dtype,
                num_workers=num_workers,
                keep_patch=False,
                progress=progress,
                describe=copy_descriptors,
            )
            vectors = torch.nn.functional.normalize(feats.cls.float(), dim=-1).half().numpy()
            thumbs = np.stack([t for _, t in feats.descriptions])
            readable = set(feats.paths)
            kept = [q for q in indices if source.path(q) in readable]
        except RuntimeError as e:  # a chunk with no readable image at all
            if "could be read" not in str(e):
                raise
            vectors, feats, kept = np.zeros((0, 0), np.float16), None, []
            thumbs = np.zeros((0, THUMBNAIL_SIDE**2), np.float16)
        write_atomic(folder / f"{i:05d}.npy", lambda p, v=vectors: _save(p, v))
        write_atomic(folder / f"{i:05d}.thumb.npy", lambda p, v=thumbs: _save(p, v))
        meta = {
            "records": kept,
            "paths": [source.path(q) for q in kept],
            "hashes": [h for h, _ in feats.descriptions] if feats is not None else [],
            "skipped": feats.skipped if feats is not None else [source.path(q) for q in indices],
        }
        write_atomic(folder / f"{i:05d}.json", lambda p, m=meta: p.write_text(json.dumps(m)))
    return len(todo)


class EmbeddingStore:
    """The embedded pool, read back: memory-mapped shards behind one row index (nothing is copied)."""

    def __init__(self, out: Path) -> None:
        folder = Path(out) / EMBEDDINGS
        metas = sorted(folder.glob("[0-9]*.json"))
        if not metas:
            raise FileNotFoundError(f"{folder}: no embedded chunks (run the embed stage first)")
        self.shards = [np.load(m.with_suffix(".npy"), mmap_mode="r") for m in metas]
        self.thumb_shards = [np.load(m.with_suffix(".thumb.npy"), mmap_mode="r") for m in metas]
        self.paths, self.records, self.hashes, self.skipped = [], [], [], []
        for m in metas:
            meta = json.loads(m.read_text())
            self.paths += meta["paths"]
            self.records += meta["records"]
            self.hashes += meta["hashes"]
            self.skipped += meta["skipped"]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.dim = max(int(s.shape[1]) for s in self.shards)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def take(self, rows: np.ndarray, descriptor: str = "embedding") -> np.ndarray:
        """float32 ``[len(rows), D]`` of the given rows (sorted or not), read shard by shard: the embeddings,
        or with ``descriptor="thumbnail"`` the copy-detection thumbnails."""
        shards = self.shards if descriptor == "embedding" else self.thumb_shards
        rows = np.asarray(rows, dtype=np.int64)
        dim = self.dim if descriptor == "embedding" else THUMBNAIL_SIDE**2
        out = np.empty((len(rows), dim), dtype=np.float32)
        shard_of = np.searchsorted(self.starts, rows, side="right") - 1
        for s in np.unique(shard_of).tolist():
            where = np.nonzero(shard_of == s)[0]
            out[where] = shards[s][rows[where] - self.starts[s]]
        return out
