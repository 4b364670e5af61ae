"""A frozen backbone's tokens of every image of a source, computed once and kept on disk.

Locked-image text alignment (LiT, dino.txt) never changes the image backbone, so its outputs can be
computed once: ``[cls, storage, patch]`` tokens of each image at the eval transform (resized square, no
augmentation), float16, in chunks of ``chunk`` images (``chunk_00000.npy`` ...). A chunk is written to a
temporary name and renamed, so a killed build loses at most the chunks being computed and the next run
computes only the missing ones. ``meta.json`` names the backbone (a digest of its weights), the source and
the transform: a cache built for anything else is refused, never silently reused. Images that cannot be
decoded are listed per chunk (``chunk_00000.bad.json``); the training pipeline never draws them.
Under torchrun each rank builds every ``world``-th chunk, then all ranks read all of them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor, nn
from torchvision.transforms import v2
from tqdm import tqdm


class FeatureCacheError(RuntimeError):
    pass


class FeatureCache:
    """Tokens ``[T, D]`` per image index of ``source`` (anything with ``__len__``, ``load(i)``, ``name``)."""

    def __init__(self, folder: str | Path, source, size: int, mean: Sequence[float], std: Sequence[float], chunk: int):
        self.folder, self.source, self.size, self.chunk = Path(folder), source, size, chunk
        self.mean, self.std = tuple(mean), tuple(std)
        self.n_chunks = -(-len(source) // chunk)
        self._arrays: list[np.ndarray] | None = None
        self.unreadable: frozenset[int] = frozenset()

    def _meta(self, fingerprint: str) -> dict:
        return {
            "backbone": fingerprint,
            "source": self.source.name,
            "images": len(self.source),
            "size": self.size,
            "mean": list(self.mean),
            "std": list(self.std),
            "chunk": self.chunk,
        }

    def _path(self, c: int, suffix: str = ".npy") -> Path:
        return self.folder / f"chunk_{c:05d}{suffix}"

    def missing(self) -> list[int]:
        return [c for c in range(self.n_chunks) if not self._path(c).exists()]

    def _check_meta(self, meta: dict) -> None:
        written = self.folder / "meta.json"
        if written.exists():
            old = json.loads(written.read_text())
            if old != meta:
                changed = sorted(k for k in meta if old.get(k) != meta[k])
                raise FeatureCacheError(
                    f"{self.folder} holds features of another {'/'.join(changed)} than this run's: delete the "
                    "folder to recompute them"
                )
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = written.with_suffix(".tmp")
            tmp.write_text(json.dumps(meta, indent=1))
            os.replace(tmp, written)

    def _image(self, index: int) -> Tensor | None:
        img = self.source.load(index)
        if img is None:
            return None
        img = TF.resize(img, [self.size, self.size], interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        return TF.normalize(img.float() / 255, self.mean, self.std)

    @torch.no_grad()
    def build(
        self,
        backbone: nn.Module,
        fingerprint: str,
        device: torch.device,
        rank: int = 0,
        world: int = 1,
        batch_size: int = 64,
        progress: bool = True,
    ) -> None:
        """Computes this rank's missing chunks (every ``world``-th) with ``backbone`` (eval mode)."""
        from opendino.losses.distributed import all_reduce_max
        from opendino.models.text import backbone_tokens

        # rank 0 checks (or writes) the description first; every rank learns whether it failed, so none
        # waits forever for a rank that stopped
        error = None
        if rank == 0:
            try:
                self._check_meta(self._meta(fingerprint))
            except FeatureCacheError as e:
                error = e
        if all_reduce_max(torch.tensor(float(error is not None), device=device)).item():
            raise error or FeatureCacheError(f"{self.folder}: rank 0 refused the cache (see its error)")
        todo = [c for c in self.missing() if c % world == rank]
        if not todo:
            return
        was_training = backbone.training
        backbone.eval()
        bar = tqdm(total=len(todo) * self.chunk, desc="caching features", unit="img", disable=not progress or None)
        for c in todo:
            indices = range(c * self.chunk, min((c + 1) * self.chunk, len(self.source)))
            images = {i: self._image(i) for i in indices}
            bad = [i for i, img in images.items() if img is None]
            good = [i for i in indices if images[i] is not None]
            parts = []
            for start in range(0, len(good), batch_size):
                batch = torch.stack([images[i] for i in good[start : start + batch_size]]).to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    parts.append(backbone_tokens(backbone, batch).to(torch.float16).cpu())
            if not parts:  # a chunk with no readable image: zeros, every index listed as unreadable
                parts = [backbone_tokens(backbone, torch.zeros(1, 3, self.size, self.size, device=device)).half().cpu()]
            tokens = torch.cat(parts)
            out = torch.zeros(len(indices), *tokens.shape[1:], dtype=torch.float16)
            if good:
                out[[i - indices.start for i in good]] = tokens
            self._path(c, ".bad.json").write_text(json.dumps(bad))
            tmp = self._path(c, ".tmp.npy")
            np.save(tmp, out.numpy())
            os.replace(tmp, self._path(c))  # complete or absent: a kill leaves at most a .tmp file
            bar.update(len(indices))
        bar.close()
        backbone.train(was_training)

    def open(self) -> FeatureCache:
        """Memory-maps every chunk (all must exist) and reads the unreadable images' indices."""
        if missing := self.missing():
            raise FeatureCacheError(f"{self.folder}: chunks {missing[:5]} are missing; build the cache first")
        self._arrays = [np.load(self._path(c), mmap_mode="r") for c in range(self.n_chunks)]
        self.unreadable = frozenset(
            i for c in range(self.n_chunks) for i in json.loads(self._path(c, ".bad.json").read_text())
        )
        return self

    def lookup(self, indices: Tensor) -> Tensor:
        """The cached tokens ``[B, T, D]`` (float16, CPU) of source indices ``[B]``."""
        if self._arrays is None:
            raise FeatureCacheError("open() the cache before lookups")
        rows = [self._arrays[i // self.chunk][i % self.chunk] for i in indices.tolist()]
        return torch.from_numpy(np.stack(rows))
