"""The data pipeline of a training run, from an image source to batches on the device.

Workers decode, crop (uint8) and collate with the masks a recipe asks for; the device stage then cuts
the crops (``data.crops_on_device``) and distorts them (``data.photometric_on_device``) batched on the
device. A recipe reads the keys of :class:`Batch`; docs/design/data-flow.md follows one step. A recipe
that asks for image–caption pairs (``DataNeeds.captions``) gets one crop per image, tokenized captions and
the pair indices instead (opendino.data.captions), normalised on the device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import TypedDict

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from opendino.data.augment import CropConfig, MultiCrop, normalize
from opendino.data.captions import CaptionedSource, as_captioned, build_pair_loader
from opendino.data.config import CropsConfig, DataConfig
from opendino.data.device_decode import decode_batch
from opendino.data.loader import build_ssl_loader, pad_stack
from opendino.data.sources import ImageSource, open_source

# A training batch on the device, crops crop-major (crop 0 of every image, then crop 1, ...): the keys a
# recipe reads, named here once. (The functional form: ``global`` is a Python keyword.)
Batch = TypedDict(
    "Batch",
    {
        "global": Tensor,  # the 2 global crops [2B, 3, S, S]
        "local": Tensor,  # the local crops [n_local * B, 3, s, s]
        "gram": Tensor,  # the Gram-teacher crops [2B, 3, G, G] (DataNeeds.extra_crops)
        "collated_masks": Tensor,  # [2B, N] bool: the masked tokens of the global crops (DataNeeds.masks)
        "mask_indices_list": Tensor,  # their flat indices into [2B * N]
        "masks_weight": Tensor,  # per masked token, 1 / (masked tokens of its crop)
        "n_masked_patches": Tensor,  # their count (a device scalar)
        "mask_valid": Tensor,  # with MaskSpec.padded: which of the (padded) masked rows are real
        "upperbound": int,  # the most tokens the mask generator may mask in a step (the official bound)
        "labels": Tensor,  # [B] the source's labels (class folders, CSV labels, synthetic classes; else 0)
        "skipped": list,  # the paths of unreadable images replaced in this batch
        "teacher_logits": tuple,  # added by a recipe's shared pass (a frozen teacher's CLS and patch logits)
        # Image–caption pairs (DataNeeds.captions), with "labels" and "skipped" above:
        "image": Tensor,  # [B, 3, S, S] float, normalised: one random resized crop per image (DataNeeds.images)
        "tokens": Tensor,  # [B, context_length] long: the tokenized captions (opendino.data.tokenizer)
        "indices": Tensor,  # [B] long, on the host: the pairs' indices in DataPipeline.captioned(source)
    },
    total=False,
)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """iBOT-style block masks of the global crops, drawn on the token grid of ``patch_size``."""

    patch_size: int
    ratio: tuple[float, ...] = (0.1, 0.5)
    probability: float = 0.5
    padded: bool = False  # masked rows padded to a fixed bound: the same shapes every step (``mask_valid``)


@dataclasses.dataclass(frozen=True)
class DataNeeds:
    """What a recipe needs from the pipeline beyond the multi-crop views and labels."""

    masks: MaskSpec | None = None
    # Larger crops of the global crops' region (``batch["gram"]``, for a Gram teacher): at this multiple of
    # the global size (or the size of the crop-size set), distorted like them or not.
    extra_crops: bool = False
    extra_crop_scale: float = 2.0
    extra_crops_undistorted: bool = True
    # Image–caption pairs instead of the SSL views: one crop per image (crops.global_size, global_scale,
    # horizontal_flips), no multi-crop and no masks; without ``images`` nothing is decoded (a recipe with
    # precomputed image features reads ``indices``).
    captions: bool = False
    images: bool = True
    context_length: int = 77  # of the caption tokens
    # Pair indices known to be unreadable (a feature cache's): replaced by the next pair, unread, exactly
    # as an unreadable image is when decoded, so ``images=False`` draws the indices ``images=True`` would.
    skip: frozenset[int] = frozenset()
    caption_clauses: float = 0.0  # probability that a caption is replaced by one of its clauses

    def __post_init__(self) -> None:
        if self.captions and (self.masks is not None or self.extra_crops):
            raise ValueError("DataNeeds: image–caption pairs come without masks and extra crops")
        if not self.captions and (not self.images or self.skip):
            raise ValueError("DataNeeds: images=False and skip are for image–caption pairs (captions=True)")


class DataPipeline:
    """Batches ``start, start + 1, ...`` of a run on ``device``: this rank's share of each global batch."""

    def __init__(
        self,
        data: DataConfig,
        crops: CropsConfig,
        needs: DataNeeds,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | None = None,
    ) -> None:
        self.data, self.crops, self.needs = data, crops, needs
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.device = device or torch.device("cpu")
        rows = crops.size_sets(needs.extra_crop_scale)
        self.crop_sets = [
            CropConfig(
                int(row[0]),
                int(row[1]),
                crops.n_local,
                tuple(crops.global_scale),
                tuple(crops.local_scale),
                crops.horizontal_flips,
                gram_size=round(row[2]) if needs.extra_crops else None,
                gram_no_distortions=needs.extra_crops_undistorted,
                mean=tuple(crops.mean),
                std=tuple(crops.std),
            )
            for row in rows
        ]
        self.crop_odds = [float(row[3]) for row in rows]
        self._captioned: tuple[ImageSource, CaptionedSource] | None = None

    def captioned(self, source: ImageSource) -> CaptionedSource:
        """The image–caption pairs of ``source`` the loader draws from (indexed once per source), so that a
        recipe can precompute, say, image features over the same ``indices``."""
        if self._captioned is None or self._captioned[0] is not source:
            self._captioned = (source, as_captioned(source))
        return self._captioned[1]

    def _pair_loader(self, source: ImageSource, start: int) -> DataLoader:
        crops = self.crops
        return build_pair_loader(
            self.captioned(source),
            batch_size=self.batch_size,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            start_step=start,
            num_workers=self.data.num_workers,
            image_size=crops.global_size if self.needs.images else None,
            scale=tuple(crops.global_scale),
            flips=crops.horizontal_flips,
            context_length=self.needs.context_length,
            skip=self.needs.skip,
            clause_probability=self.needs.caption_clauses,
        )

    def _pair_batches(self, source: ImageSource, start: int) -> Iterator[Batch]:
        for batch in self._pair_loader(source, start):
            # the indices stay on the host: a recipe looks them up there (a feature cache) without a device read
            batch = {
                k: v.to(self.device, non_blocking=True) if isinstance(v, Tensor) and k != "indices" else v
                for k, v in batch.items()
            }
            if "images" in batch:  # normalised on the device, like the photometric stage
                batch["image"] = normalize(batch.pop("images"), self.crops.mean, self.crops.std)
            yield batch

    def loader(self, source: ImageSource, start: int) -> DataLoader:
        """The worker side: decode, crop (uint8; only draw the crop boxes with ``data.crops_on_device``),
        distort (unless ``data.photometric_on_device``) and collate with the masks; with ``needs.captions``
        image–caption pairs instead (``build_pair_loader``)."""
        if self.needs.captions:
            return self._pair_loader(source, start)
        masks = self.needs.masks
        return build_ssl_loader(
            source,
            self.crop_sets,
            crop_set_probs=self.crop_odds,
            batch_size=self.batch_size,
            patch_size=masks.patch_size if masks else 16,
            teacher_to_student_resolution_scale=self.crops.teacher_to_student_resolution_scale,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            start_step=start,
            num_workers=self.data.num_workers,
            photometric_in_worker=not self.data.photometric_on_device,
            crops_on_device=self.data.crops_on_device,
            max_image_side=self.data.max_image_side,
            decode_on_device=self.data.decode_on_device,
            mask_ratio=tuple(masks.ratio) if masks else (0.0, 0.0),
            mask_probability=masks.probability if masks else 0.0,
            draw_masks=masks is not None,
            pad_masks=masks.padded if masks else False,
        )

    def batches(self, source: ImageSource, start: int) -> Iterator[Batch]:
        """The loader's batches on the device, with the crops cut and distorted there as configured (with
        ``needs.captions``: the pairs, images normalised to ``image``)."""
        if self.needs.captions:
            yield from self._pair_batches(source, start)
            return
        multicrops = [MultiCrop(c) for c in self.crop_sets]
        for batch in self.loader(source, start):
            batch = {k: v.to(self.device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}
            if "jpegs" in batch:  # data.decode_on_device: the files' bytes, decoded here
                names = batch.pop("names")
                images, bad = decode_batch(
                    batch.pop("jpegs"), batch.pop("decoded"), names, self.data.max_image_side, self.device
                )
                batch["images"], batch["skipped"] = pad_stack(images), batch["skipped"] + bad
            if "images" in batch:
                batch = multicrops[batch.pop("crop_set")].geometric_collated(batch)
            # the photometric stage does not depend on crop sizes
            yield multicrops[0].photometric_collated(batch) if self.data.photometric_on_device else batch


def open_training_source(data: DataConfig, channels: int = 3) -> ImageSource:
    """The configured image source, decoding ``channels`` per image (the model's ``in_chans``), checked to
    hold at least one readable image of that many channels."""
    source = open_source(data.path, data.source, n=data.synthetic_n, size=data.synthetic_size)
    source.set_channels(channels)
    source.check_readable()
    return source
