"""Image–caption pairs over the image sources, and their seeded, resumable loader (docs/data.md,
"Image–text pairs").

``as_captioned(source)`` finds each image's caption by the convention of its kind of source:

- the synthetic world: the scene's caption (``synthetic.caption`` of its spec: nothing is rendered);
- a folder, a ``.txt`` list (or a CSV list without a caption column): ``<name>.txt`` beside ``<name>.<ext>``;
- a ``.tsv`` list (``path<TAB>caption``) or a CSV whose header names a ``caption``/``text``/``title`` column;
- tar shards: the ``<key>.txt`` member beside ``<key>.<ext>`` (webdataset).

Images without a usable caption are dropped when the pairs are indexed and listed with their reason in
``CaptionedSource.skipped``; ``summary()`` counts them for the caller to report. ``build_pair_loader`` draws
batches with the SSL loader's ``StepBatchSampler``, so the batch of step ``s`` depends only on ``(seed, s,
rank, world_size)`` and a run resumes exactly; unreadable images are replaced like in SSL training
(``load_or_replace``).
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from opendino.data.augment import _apply_box, _crop_box
from opendino.data.loader import SampleRef, StepBatchSampler, load_or_replace
from opendino.data.sources import ImageSource, SyntheticSource
from opendino.data.tokenizer import Tokenizer

# Where a caption splits into clauses for sub-caption sampling: commas, semicolons and the joining words.
CLAUSE_BREAKS = re.compile(r"\s*[,;]\s*|\s+(?:and|with|on)\s+")
NO_CAPTION, EMPTY_CAPTION, UNDECODABLE_CAPTION = "no caption", "empty caption", "undecodable caption"
CONVENTIONS = (
    "a <name>.txt file beside each image (folders, .txt lists), a caption/text/title column named in the header "
    "of a .csv list, a .tsv list (path<TAB>caption), <key>.txt members beside the images of tar shards, or the "
    "synthetic world"
)


def caption_problem(text: str | None) -> str | None:
    """Why ``text`` is no usable caption (``NO_CAPTION``, ``EMPTY_CAPTION``, ``UNDECODABLE_CAPTION``), or None.
    Sources keep bytes that are not UTF-8 as surrogates (``errors="surrogateescape"``); they show here."""
    if text is None:
        return NO_CAPTION
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return UNDECODABLE_CAPTION
    return None if text.strip() else EMPTY_CAPTION


@dataclasses.dataclass(frozen=True)
class _SyntheticCaptions:
    """The caption of a synthetic scene from its spec alone (a class, not a lambda: workers may pickle it)."""

    split: str
    seed: int

    def __call__(self, index: int) -> str:
        from opendino.data.synthetic import caption, scene_spec

        return caption(scene_spec(index, self.split, self.seed))


class CaptionedSource(torch.utils.data.Dataset):
    """The records of an image source that have a usable caption, renumbered ``0 .. len - 1``.

    ``captions`` is either one entry per record of ``source`` (a str, or None for none; the unusable ones are
    dropped now and listed in ``skipped`` as ``(path, reason)``), or a function of the record index for a
    source whose every record has a caption (the synthetic world), called only when a caption is read."""

    def __init__(self, source: ImageSource, captions: Sequence[str | None] | Callable[[int], str]) -> None:
        self.source = source
        self.name, self.classes = source.name, source.classes
        self.skipped: list[tuple[str, str]] = []
        self._caption_of: Callable[[int], str] | None = None
        self._captions: list[str] | None = None
        if callable(captions):
            self._caption_of = captions
            self.indices: Sequence[int] = range(len(source))  # into the wrapped source
            return
        if len(captions) != len(source):
            raise ValueError(f"{source.name}: {len(captions)} captions for {len(source)} images")
        self.indices, self._captions = [], []
        for i, text in enumerate(captions):
            problem = caption_problem(text)
            if problem:
                self.skipped.append((source.path(i), problem))
            else:
                self.indices.append(i)
                self._captions.append(text.strip())

    def __len__(self) -> int:
        return len(self.indices)

    def path(self, index: int) -> str:
        return self.source.path(self.indices[index])

    def label(self, index: int) -> int:
        return self.source.label(self.indices[index])

    def load(self, index: int) -> Tensor | None:
        return self.source.load(self.indices[index])

    def caption(self, index: int) -> str:
        if self._captions is not None:
            return self._captions[index]
        return self._caption_of(self.indices[index]).strip()

    def __getitem__(self, index: int) -> tuple[Tensor | None, str]:
        return self.load(index), self.caption(index)

    def summary(self) -> str:
        """``"N pairs; M images skipped: a without caption, b empty, c undecodable; first: PATH (REASON)"``."""
        if not self.skipped:
            return f"{len(self)} pairs; no image skipped"
        counts = Counter(reason for _, reason in self.skipped)
        path, reason = self.skipped[0]
        return (
            f"{len(self)} pairs; {len(self.skipped)} images skipped: {counts[NO_CAPTION]} without caption, "
            f"{counts[EMPTY_CAPTION]} empty, {counts[UNDECODABLE_CAPTION]} undecodable; first: {path} ({reason})"
        )

    def __repr__(self) -> str:
        return f"CaptionedSource({self.name}: {self.summary()})"


def _sidecar_captions(source: ImageSource) -> list[str | None]:
    """``<name>.txt`` beside each image (None where there is none); read whole now: captions are small."""
    captions: list[str | None] = []
    for i in range(len(source)):
        try:
            raw = Path(source.path(i)).with_suffix(".txt").read_bytes()
        except OSError:
            captions.append(None)
        else:
            captions.append(raw.decode("utf-8", errors="surrogateescape"))
    return captions


def as_captioned(source: ImageSource) -> CaptionedSource:
    """The image–caption pairs of ``source``, by its kind's convention (module docstring). Raises a
    ``ValueError`` naming the source and the conventions when no image has a usable caption."""
    if isinstance(source, CaptionedSource):
        return source
    if isinstance(source, SyntheticSource):
        captions: Sequence[str | None] | Callable[[int], str] = _SyntheticCaptions(source.split, source.seed)
    elif source.captions is not None:  # carried by the source: a captioned CSV/TSV list, tar shards
        captions = source.captions
    else:
        captions = _sidecar_captions(source)
    pairs = CaptionedSource(source, captions)
    if not len(pairs):
        summary = pairs.summary()
        raise ValueError(f"{source.name}: no image has a usable caption ({summary}); captions come from {CONVENTIONS}")
    return pairs


class PairDataset(torch.utils.data.Dataset):
    """One sample per :class:`SampleRef`: a uint8 random resized crop of the image (unless ``image_size`` is
    None: then nothing is decoded) and its caption, index and label. Pairs in ``skip`` (known unreadable,
    e.g. by a feature cache) are replaced like unreadable images, unread."""

    def __init__(
        self,
        source: CaptionedSource,
        image_size: int | None = 224,
        scale: Sequence[float] = (0.08, 1.0),
        flips: bool = True,
        skip: frozenset[int] = frozenset(),
        clause_probability: float = 0.0,
    ) -> None:
        self.source, self.image_size, self.scale, self.flips = source, image_size, tuple(scale), flips
        self.skip, self.clause_probability = frozenset(skip), clause_probability

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, ref: SampleRef) -> dict:
        decode = self.image_size is not None
        img, index, skipped = load_or_replace(self.source, ref.index, self.skip, decode)
        sample = {}
        # As MultiCrop.crop_boxes: one Python stream per sample, seeded from the sample's torch generator.
        gen = torch.Generator().manual_seed(ref.seed)
        rng = random.Random(int(torch.randint(2**62, (1,), generator=gen)))
        if decode:
            box = _crop_box(*img.shape[-2:], self.scale, self.flips, rng)
            sample["image"] = _apply_box(img, box, self.image_size)
        # label after load: the synthetic world renders a scene once for both; without decoding, a
        # synthetic label would cost a render, and a recipe that reads no images reads no labels either
        label = self.source.label(index) if decode else -1
        caption = self.source.caption(index)
        if self.clause_probability and rng.random() < self.clause_probability:
            caption = sample_clause(caption, rng)
        return {**sample, "index": index, "caption": caption, "label": label, "skipped": skipped}


def sample_clause(caption: str, rng: random.Random) -> str:
    """One clause of a caption, drawn uniformly (sub-caption sampling, as in DreamLIP, Zheng et al. 2024): a
    long caption is matched by its easiest cue; a single clause makes every part of it count."""
    clauses = [c for c in CLAUSE_BREAKS.split(caption) if c.strip()]
    return rng.choice(clauses) if clauses else caption


class PairCollate:
    """Stacks the images and tokenizes the captions of a batch (in the workers, with the images)."""

    def __init__(self, context_length: int = 77) -> None:
        self.tokenizer = Tokenizer(context_length)

    def __call__(self, samples: list[dict]) -> dict:
        batch = {}
        if "image" in samples[0]:
            batch["images"] = torch.stack([s["image"] for s in samples])
        batch["tokens"] = self.tokenizer([s["caption"] for s in samples])
        batch["indices"] = torch.tensor([s["index"] for s in samples], dtype=torch.long)
        batch["labels"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
        batch["skipped"] = [p for s in samples for p in s["skipped"]]
        return batch


def build_pair_loader(
    source: CaptionedSource,
    *,
    batch_size: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    num_workers: int = 0,
    image_size: int | None = 224,
    scale: Sequence[float] = (0.08, 1.0),
    flips: bool = True,
    context_length: int = 77,
    skip: frozenset[int] = frozenset(),
    clause_probability: float = 0.0,
) -> DataLoader:
    """An endless loader of image–caption batches from ``start_step``: ``images`` uint8 ``[B, 3, S, S]``
    (absent with ``image_size=None``), ``tokens`` long ``[B, context_length]``, ``indices`` (into ``source``,
    after replacement of unreadable images and of those in ``skip``), ``labels`` long ``[B]``, ``skipped``
    (the paths of the images replaced)."""
    sampler = StepBatchSampler(
        len(source), batch_size, seed=seed, rank=rank, world_size=world_size, start_step=start_step
    )
    return DataLoader(
        PairDataset(source, image_size, scale, flips, skip, clause_probability),
        batch_sampler=sampler,
        collate_fn=PairCollate(context_length),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        # Its own generator: creating the iterator must not draw from the global stream (exact resume).
        generator=torch.Generator().manual_seed(seed),
    )
