"""The training data loader: seeded, infinite, sharded across ranks, resumable at any step.

Step ``s`` of a run with ``world`` ranks and ``batch_size`` images per rank reads the global positions
``[s * world * batch_size, (s + 1) * world * batch_size)`` of an endless sequence of epoch permutations
(epoch ``e`` is ``randperm(n)`` seeded by ``(seed, e)``), and rank ``r`` takes its contiguous share. Every
sample carries its own seed derived from ``(seed, position)``, so the crops of a position do not depend on
the number of workers or ranks, and resuming at step ``s`` needs only ``s``.

With several crop-size sets (high-resolution adaptation) one set is chosen per step from the same
probabilities on every rank, seeded by ``(seed, step)``, so a step is homogeneous across the job.

A mix of sources (``opendino.data.mix``: ``source.mixture``) keeps the rule stateless. With
``u(*parts) = (_seed(*parts) + 0.5) / 2**32``, step ``s`` is homogeneous when ``u(seed, 4, s) < fraction``
(alike on every rank), and then every position reads the homogeneous source; otherwise global position
``q`` reads the first source ``j`` whose cumulative weight exceeds ``u(seed, 5, q)``. Position ``q`` of
source ``j`` (``n_j`` images from ``offset_j``) reads ``offset_j + perm_j(q // n_j)[q % n_j]``, where
``perm_j(e)`` is ``randperm(n_j)`` seeded by ``_seed(seed, 6, j, e)``: each source keeps its own epoch
permutations (no image repeats within ``n_j`` consecutive positions) and nothing depends on the steps
before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from opendino.data.augment import CropConfig, MultiCrop
from opendino.data.collate import collate_masks, stack_crop_major
from opendino.data.config import DataConfig
from opendino.data.device_decode import fit_side, fitted_size, jpeg_header
from opendino.data.masking import BlockMaskGenerator
from opendino.data.mix import Mixture
from opendino.data.sources import ImageSource

MAX_RETRIES = 64  # consecutive unreadable images tolerated before a sample fails
# Seed streams of _seed(seed, STREAM, ...) (the epoch permutations of a single source take (seed, epoch)):
# 1 sample augmentation, 2 step masks, 3 step crop set; with a mixture 4 the homogeneous steps,
# 5 the source of a position, 6 the epoch permutations of a source.
HOMOGENEOUS_STREAM, SOURCE_STREAM, SOURCE_PERM_STREAM = 4, 5, 6


def _seed(*parts: int) -> int:
    # Non-negative parts enter whole: positions past 2**32 (a 1M-step run of 4,096 images) stay distinct.
    return int(np.random.SeedSequence([p if p >= 0 else p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def _uniform(*parts: int) -> float:
    """A uniform number in (0, 1) from ``_seed(*parts)`` (32 bits): one hash, no generator to build."""
    return (_seed(*parts) + 0.5) / 2**32


@dataclasses.dataclass(frozen=True)
class SampleRef:
    index: int  # into the source
    seed: int  # of this sample's augmentation
    crop_set: int  # which (global, local, gram) size set
    mask_seed: int = 0  # of the iBOT masks of its step (the same on every rank)


class StepBatchSampler(Sampler[list[SampleRef]]):
    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        crop_set_probs: Sequence[float] = (1.0,),
        mixture: Mixture | None = None,
    ) -> None:
        if n <= 0:
            raise ValueError("cannot sample from an empty source")
        if mixture is not None and mixture.total != n:
            raise ValueError(f"the mixture holds {mixture.total} images, the source {n}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.start_step = rank, world_size, start_step
        self.crop_set_probs = np.asarray(crop_set_probs, dtype=float) / sum(crop_set_probs)
        self.mixture = mixture
        self._epoch, self._perm = -1, None
        if mixture is not None:
            self._cumulative = np.cumsum(mixture.weights)
            self._source_perms: dict[int, tuple[int, list[int]]] = {}  # source -> (epoch, its permutation)

    def _index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(_seed(self.seed, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen).tolist()
        return self._perm[offset]

    def homogeneous_at(self, step: int) -> bool:
        """Whether every image of ``step`` comes from the mixture's homogeneous source (alike on every rank)."""
        mix = self.mixture
        if mix is None or mix.homogeneous is None or mix.fraction <= 0:
            return False
        return _uniform(self.seed, HOMOGENEOUS_STREAM, step) < mix.fraction

    def source_at(self, position: int, homogeneous: bool = False) -> int:
        """The mixture's source that global ``position`` reads (the homogeneous one in a homogeneous step)."""
        if homogeneous:
            return self.mixture.homogeneous
        u = _uniform(self.seed, SOURCE_STREAM, position)
        return min(int(np.searchsorted(self._cumulative, u, side="right")), len(self._cumulative) - 1)

    def _mixed_index_at(self, position: int, homogeneous: bool) -> int:
        j = self.source_at(position, homogeneous)
        n = self.mixture.sizes[j]
        epoch, offset = divmod(position, n)
        cached = self._source_perms.get(j)
        if cached is None or cached[0] != epoch:
            gen = torch.Generator().manual_seed(_seed(self.seed, SOURCE_PERM_STREAM, j, epoch))
            cached = self._source_perms[j] = (epoch, torch.randperm(n, generator=gen).tolist())
        return self.mixture.offsets[j] + cached[1][offset]

    def crop_set_at(self, step: int) -> int:
        if len(self.crop_set_probs) == 1:
            return 0
        rng = np.random.default_rng(_seed(self.seed, 3, step))
        return int(rng.choice(len(self.crop_set_probs), p=self.crop_set_probs))

    def batch_at(self, step: int) -> list[SampleRef]:
        start = (step * self.world_size + self.rank) * self.batch_size
        crop_set, mask_seed = self.crop_set_at(step), _seed(self.seed, 2, step)
        if self.mixture is None:
            index_at = self._index_at
        else:
            homogeneous = self.homogeneous_at(step)
            index_at = lambda q: self._mixed_index_at(q, homogeneous)  # noqa: E731
        return [
            SampleRef(index_at(q), _seed(self.seed, 1, q), crop_set, mask_seed)
            for q in range(start, start + self.batch_size)
        ]

    def __iter__(self) -> Iterator[list[SampleRef]]:
        step = self.start_step
        while True:
            yield self.batch_at(step)
            step += 1

    def __len__(self) -> int:  # DataLoader asks; the sampler is endless
        return 2**62


class Loadable(Protocol):
    """What ``load_or_replace`` reads: an image source, or a source of image–caption pairs."""

    name: str

    def __len__(self) -> int: ...

    def load(self, index: int) -> Tensor | None: ...

    def path(self, index: int) -> str: ...


def load_or_replace(
    source: Loadable, index: int, skip: frozenset[int] = frozenset(), decode: bool = True
) -> tuple[Tensor | None, int, list[str]]:
    """The image at ``index`` or, if it cannot be decoded, the next readable one (wrapping around): a
    deterministic replacement, the same wherever and whenever the sample is drawn. Returns the image, the
    index actually used and the paths of the unreadable images passed over. Indices in ``skip`` are known
    to be unreadable and passed over unread; without ``decode`` only they are, and the image is None (the
    same replacements, when ``skip`` holds every unreadable image, without reading any)."""
    skipped = []
    for _ in range(MAX_RETRIES):
        if index not in skip:
            img = source.load(index) if decode else None
            if img is not None or not decode:
                return img, index, skipped
        skipped.append(source.path(index))
        index = (index + 1) % len(source)
    raise RuntimeError(f"{MAX_RETRIES} unreadable images in a row in {source.name}: {skipped[:3]} ...")


class MultiCropDataset(torch.utils.data.Dataset):
    """Decodes a source image and makes its uint8 crops (``photometric`` runs per sample or batched), or,
    with ``crops_on_device``, only draws their boxes: the image travels whole and the crops are cut batched
    on the device (``MultiCrop.geometric_collated``); with ``decode_on_device`` too, a JPEG travels as its
    file's bytes and is decoded there (data/device_decode.py)."""

    def __init__(
        self,
        source: ImageSource,
        crop_sets: Sequence[CropConfig],
        photometric_in_worker: bool = True,
        crops_on_device: bool = False,
        max_image_side: int = 1024,
        decode_on_device: bool = False,
    ):
        settings = {"crops_on_device": crops_on_device, "max_image_side": max_image_side}
        settings["decode_on_device"] = decode_on_device
        DataConfig(photometric_on_device=not photometric_in_worker, **settings).check()
        self.source = source
        self.multicrops = [MultiCrop(c) for c in crop_sets]
        self.photometric_in_worker = photometric_in_worker
        self.crops_on_device, self.max_image_side = crops_on_device, max_image_side
        self.decode_on_device = decode_on_device

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, ref: SampleRef) -> dict:
        gen = torch.Generator().manual_seed(ref.seed)
        multicrop = self.multicrops[ref.crop_set]
        common = {"crop_set": ref.crop_set, "global_size": multicrop.config.global_size, "mask_seed": ref.mask_seed}
        if self.decode_on_device:
            raw = self.source.read_bytes(ref.index)
            size = jpeg_header(raw)
            if size is not None:  # the boxes of the image as the device will hold it
                height, width = fitted_size(*size, self.max_image_side)
                return {
                    "jpeg": torch.frombuffer(bytearray(raw), dtype=torch.uint8),
                    "name": self.source.path(ref.index),
                    "boxes": multicrop.crop_boxes(height, width, gen),
                    "label": self.source.label(ref.index),
                    "skipped": [],
                    **common,
                }
        img, index, skipped = load_or_replace(self.source, ref.index)
        if self.crops_on_device:
            img = fit_side(img, self.max_image_side)
            return {
                "image": img,
                "name": self.source.path(index),
                "boxes": multicrop.crop_boxes(*img.shape[-2:], gen),
                "label": self.source.label(index),
                "skipped": skipped,
                **common,
            }
        crops = multicrop.geometric(img, gen)
        if self.photometric_in_worker:
            crops = multicrop.photometric(crops, gen)
        return {**crops, "label": self.source.label(index), "skipped": skipped, "mask_seed": ref.mask_seed}


def pad_stack(images: list[Tensor]) -> Tensor:
    """Images of different sizes ``[3, H_i, W_i]`` -> ``[B, 3, max H, max W]``, zero-padded at the bottom
    and right (crop boxes keep their coordinates)."""
    height, width = max(i.shape[-2] for i in images), max(i.shape[-1] for i in images)
    out = images[0].new_zeros(len(images), images[0].shape[0], height, width)
    for slot, img in zip(out, images, strict=True):
        slot[:, : img.shape[-2], : img.shape[-1]] = img
    return out


class SSLCollate:
    """Stacks crops crop-major (``[crop0 of all B, crop1 of all B, ...]``) and draws the iBOT masks of the
    global batch, keeping this rank's rows."""

    def __init__(
        self,
        patch_size: int,
        mask_ratio: tuple[float, float] = (0.1, 0.5),
        mask_probability: float = 0.5,
        teacher_to_student_resolution_scale: float = 1.0,
        rank: int = 0,
        world_size: int = 1,
        draw_masks: bool = True,
        pad_masks: bool = False,
    ) -> None:
        self.patch_size, self.draw_masks, self.pad_masks = patch_size, draw_masks, pad_masks
        self.mask_ratio, self.mask_probability = mask_ratio, mask_probability
        self.scale = teacher_to_student_resolution_scale
        self.rank, self.world_size = rank, world_size

    def __call__(self, samples: list[dict]) -> dict:
        if "boxes" in samples[0]:  # crops cut on the device
            batch = {"boxes": torch.stack([s["boxes"] for s in samples]), "crop_set": samples[0]["crop_set"]}
            if any("jpeg" in s for s in samples):  # decoded there too: data/device_decode.py
                batch["jpegs"] = [s.get("jpeg") for s in samples]
                batch["decoded"] = [s.get("image") for s in samples]
                batch["names"] = [s["name"] for s in samples]
            else:
                batch["images"] = pad_stack([s["image"] for s in samples])
            global_size = samples[0]["global_size"]
        else:
            batch = {
                key: stack_crop_major([s[key] for s in samples])
                for key in ("global", "local", "gram")
                if key in samples[0]
            }
            global_size = batch["global"].shape[-1]
        batch["labels"] = torch.tensor([s["label"] for s in samples])
        batch["skipped"] = [p for s in samples for p in s["skipped"]]
        if not self.draw_masks:
            return batch
        grid = int(global_size // (self.patch_size * self.scale))
        # One seeded mask stream per step: reproducible wherever and on however many ranks it is collated.
        generator = BlockMaskGenerator(grid, max_num_patches=0.5 * grid * grid, seed=samples[0]["mask_seed"])
        b, world = len(samples), self.world_size
        mine = torch.arange(self.rank * b, (self.rank + 1) * b)
        rows = torch.cat([mine, mine + world * b])  # crop 0 and crop 1 of this rank's images
        batch.update(
            collate_masks(
                2 * world * b, grid * grid, generator, self.mask_ratio, self.mask_probability, rows, self.pad_masks
            )
        )
        return batch


def build_ssl_loader(
    source: ImageSource,
    crop_sets: Sequence[CropConfig],
    *,
    batch_size: int,
    patch_size: int = 16,
    teacher_to_student_resolution_scale: float = 1.0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    crop_set_probs: Sequence[float] = (1.0,),
    num_workers: int = 0,
    photometric_in_worker: bool = True,
    crops_on_device: bool = False,
    max_image_side: int = 1024,
    decode_on_device: bool = False,
    mask_ratio: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    draw_masks: bool = True,
    pad_masks: bool = False,
) -> DataLoader:
    """An endless loader of SSL batches starting at ``start_step``: collated crops, or with
    ``crops_on_device`` whole images and crop boxes for ``MultiCrop.geometric_collated``."""
    sampler = StepBatchSampler(
        len(source),
        batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        start_step=start_step,
        crop_set_probs=crop_set_probs,
        mixture=getattr(source, "mixture", None),
    )
    return DataLoader(
        MultiCropDataset(source, crop_sets, photometric_in_worker, crops_on_device, max_image_side, decode_on_device),
        batch_sampler=sampler,
        collate_fn=SSLCollate(
            patch_size,
            mask_ratio,
            mask_probability,
            teacher_to_student_resolution_scale,
            rank=rank,
            world_size=world_size,
            draw_masks=draw_masks,
            pad_masks=pad_masks,
        ),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        # Its own generator: creating the iterator must not draw from the global stream (exact resume).
        generator=torch.Generator().manual_seed(seed),
    )
