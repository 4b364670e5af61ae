"""The configuration sections of the data pipeline: where images come from (``data``) and how they are
cropped (``crops``). Each checks its own values."""

from __future__ import annotations

import dataclasses

from opendino.config import ConfigError, check_choice, check_minima
from opendino.data.normalization import IMAGENET_MEAN, IMAGENET_STD


@dataclasses.dataclass
class DataConfig:
    source: str | None = None  # folder | list | tar | synthetic | mix; None: detected from `path` (none: synthetic)
    # An image folder, a file list (txt/csv/tsv), tar shards (a file, a glob or a folder of them) or a mix
    # manifest (.yaml/.yml: weighted sources, docs/data.md).
    path: str | None = None
    synthetic_n: int = 100_000  # scenes in the synthetic training set
    synthetic_size: int = 128  # their rendering size in pixels
    num_workers: int = 0  # data-loading processes (decode, crops, masks); 0 = in the training process
    photometric_on_device: bool = False  # collate uint8 crops, distort them batched on the device
    # Workers only decode and draw crop boxes; the crops are cut batched on the device (needs
    # photometric_on_device).
    crops_on_device: bool = False
    max_image_side: int = 1024  # with crops_on_device: larger images are reduced to it first (>= the largest crop)
    # With crops_on_device: JPEGs travel as their files' bytes and are decoded batched on the device (nvJPEG on
    # CUDA); other formats are decoded in the workers (data/device_decode.py)
    decode_on_device: bool = False

    def check(self) -> None:
        from opendino.data.sources import SOURCES

        check_minima("data", self, {"num_workers": 0, "synthetic_n": 1, "max_image_side": 1})
        if self.source is not None:
            check_choice("data.source", self.source, SOURCES)
        if self.source == "synthetic" and self.path is not None:
            raise ConfigError(
                f"data.path={self.path} with data.source=synthetic: give one "
                "(data.source=null takes the kind from the path)"
            )
        if self.source not in (None, "synthetic") and self.path is None:
            raise ConfigError(f"data.source={self.source} needs data.path")
        manifest = self.path is not None and self.path.lower().endswith((".yaml", ".yml"))
        if self.source == "mix" and not manifest:
            raise ConfigError(f"data.source=mix needs a .yaml/.yml mix manifest as data.path, not {self.path}")
        if manifest and self.source not in (None, "mix"):
            raise ConfigError(f"data.path={self.path} is a mix manifest: data.source=mix or null (not {self.source})")
        if self.decode_on_device and not self.crops_on_device:
            raise ConfigError("data.decode_on_device needs data.crops_on_device=true (the crops are cut where decoded)")
        if self.crops_on_device and not self.photometric_on_device:
            raise ConfigError(
                "data.crops_on_device needs data.photometric_on_device=true (crops are distorted where they are cut)"
            )


@dataclasses.dataclass
class CropsConfig:
    global_size: int = 224  # pixels
    local_size: int = 96  # pixels
    n_local: int = 8  # local crops per image (2 global crops always)
    global_scale: tuple[float, ...] = (0.32, 1.0)  # RandomResizedCrop area range
    local_scale: tuple[float, ...] = (0.05, 0.32)  # RandomResizedCrop area range
    horizontal_flips: bool = True  # random horizontal flips of every crop (p = 0.5)
    mean: tuple[float, ...] = IMAGENET_MEAN  # normalisation (satellite models use their own)
    std: tuple[float, ...] = IMAGENET_STD  # normalisation, with mean
    # High-resolution adaptation (docs/design/recipe.md §4.4): rows of [global, local, Gram teacher,
    # probability]; one row is drawn per step (the same on every rank). Empty: the single set above.
    resolution_sets: list[list[float]] = dataclasses.field(default_factory=list)
    # Distillation into a coarser student (stride-32 ConvNeXt from a patch-16 teacher: 2.0): the teacher
    # sees the global crops downscaled by this factor, so its token grid (and the iBOT mask grid) is the
    # student's output grid.
    teacher_to_student_resolution_scale: float = 1.0

    def check(self) -> None:
        if any(not v > 0 for v in self.std):
            raise ConfigError(f"crops.std={list(self.std)}: every value must be > 0 (a constant channel has std 0)")
        for row in self.resolution_sets:
            if len(row) != 4 or any(not isinstance(v, (int, float)) or v < 0 for v in row):
                raise ConfigError(
                    f"crops.resolution_sets row {row}: need [global, local, Gram teacher, probability], none negative"
                )
        if self.resolution_sets and not sum(row[3] for row in self.resolution_sets) > 0:
            raise ConfigError("crops.resolution_sets: the probabilities (4th column) sum to 0")

    def size_sets(self, extra_scale: float) -> list[list[float]]:
        """``[global, local, extra (Gram teacher), probability]`` per crop-size set: ``resolution_sets``, else
        the crop sizes as one set, the extra crops at ``extra_scale`` times the global size."""
        return self.resolution_sets or [[self.global_size, self.local_size, self.global_size * extra_scale, 1.0]]
