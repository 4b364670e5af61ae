"""Feature extraction: images -> CLS, pooled (mean patch) and patch-grid features of a backbone."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from opendino.data.sources import ImageSource
from opendino.models.registry import input_channels
from opendino.models.vit import global_feature

OUTPUT_FORMATS = (".safetensors", ".npz", ".npy")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class Features:
    cls: Tensor  # [N, D]
    pooled: Tensor  # [N, D] mean of the patch tokens
    patch: Tensor | None  # [N, h, w, D]
    paths: list[str]
    skipped: list[str]
    seconds: float
    descriptions: list | None = None  # with ``describe``: its value for each kept image's decoded pixels

    @property
    def images_per_second(self) -> float:
        return len(self.paths) / max(self.seconds, 1e-9)


def eval_transform(resolution: int, mean: Sequence[float], std: Sequence[float], resize: str = "square"):
    """``square``: resize to ``resolution x resolution`` (the DINOv3 README's inference transform);
    ``crop``: shorter side to ``resolution * 256 / 224``, then a centre crop (the classification evals)."""
    if resize == "square":
        geometry = [v2.Resize((resolution, resolution), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)]
    elif resize == "crop":
        geometry = [
            v2.Resize(round(resolution * 256 / 224), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(resolution),
        ]
    else:
        raise ValueError(f"resize={resize!r}; valid: square, crop")
    return v2.Compose([*geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


class _ImageDataset(Dataset):
    """Transformed images of an image source (or of files), by position in ``indices`` (default: all)."""

    def __init__(
        self,
        images: Sequence[Path] | ImageSource,
        transform,
        indices: Sequence[int] | None = None,
        describe: Callable[[Tensor], object] | None = None,
    ) -> None:
        self.source = (
            images if isinstance(images, ImageSource) else ImageSource([(str(p), -1) for p in images], "images")
        )
        self.indices = list(range(len(self.source))) if indices is None else list(indices)
        self.transform, self.describe = transform, describe

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple:
        """``(image or None, i)``, with ``describe``: ``(image or None, i, description or None)``."""
        img = self.source.load(self.indices[i])
        out = (None if img is None else self.transform(img)), i
        if self.describe is None:
            return out
        return (*out, None if img is None else self.describe(img))


def _collate(batch):
    kept = [(x, i, *rest) for x, i, *rest in batch if x is not None]
    skipped = [i for x, i, *_ in batch if x is None]
    images = torch.stack([x for x, *_ in kept]) if kept else None
    if len(batch[0]) == 3:
        return images, [i for _, i, _ in kept], skipped, [h for *_, h in kept]
    return images, [i for _, i in kept], skipped


@torch.inference_mode()
def extract_features(
    model: nn.Module,
    paths: Sequence[Path] | ImageSource,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    resolution: int = 224,
    resize: str = "square",
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    dtype: str = "fp32",
    num_workers: int = 0,
    keep_patch: bool = True,
    patch_dtype: torch.dtype = torch.float32,
    progress: bool = True,
    indices: Sequence[int] | None = None,
    describe: Callable[[Tensor], object] | None = None,
    compile: bool = False,
) -> Features:
    """Runs ``model.forward_features`` over the images (files, or the records of an image source, all or
    those at ``indices``); unreadable ones are skipped and listed. ``patch_dtype=torch.float16`` halves the
    memory of the patch grids of large sets; ``describe`` (a picklable function of the decoded uint8 image,
    run where it is decoded) adds its value for each image. ``compile``: through ``torch.compile``, every
    batch padded to ``batch_size`` so that one graph serves them all."""
    device = torch.device(device)
    model = model.to(device).eval()
    forward = torch.compile(model.forward_features, dynamic=False) if compile else model.forward_features
    dataset = _ImageDataset(paths, eval_transform(resolution, mean, std, resize), indices, describe)
    dataset.source.set_channels(input_channels(model))  # an N-channel model reads N-channel images
    name = dataset.source.path
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    cls, pooled, patch, kept, skipped, descriptions = [], [], [], [], [], []
    autocast = torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32")
    start = time.perf_counter()
    for images, positions, bad, *described in tqdm(loader, desc="extract", unit="batch", disable=not progress):
        skipped += [str(name(dataset.indices[i])) for i in bad]
        descriptions += described[0] if described else []
        if images is None:
            continue
        n = len(images)
        if compile and n < batch_size:  # the last (or a short) batch: padded, not a second graph
            images = torch.cat([images, images[-1:].expand(batch_size - n, *images.shape[1:])])
        with autocast:
            out = forward(images.to(device, non_blocking=True))
        out = {k: v[:n] for k, v in out.items() if isinstance(v, Tensor)}
        images = images[:n]
        tokens = out["x_norm_patchtokens"].float()
        h, w = images.shape[-2] // model.feature_stride, images.shape[-1] // model.feature_stride
        cls.append(global_feature(model, out).float().cpu())
        pooled.append(tokens.mean(1).cpu())
        if keep_patch:
            patch.append(tokens.reshape(len(positions), h, w, -1).to(patch_dtype).cpu())
        kept += [str(name(dataset.indices[i])) for i in positions]
    seconds = time.perf_counter() - start
    if not kept:
        first = name(dataset.indices[0]) if len(dataset) else "-"
        raise RuntimeError(f"none of the {len(dataset)} images could be read (first: {first})")
    return Features(
        cls=torch.cat(cls),
        pooled=torch.cat(pooled),
        patch=torch.cat(patch) if keep_patch else None,
        paths=kept,
        skipped=skipped,
        seconds=seconds,
        descriptions=descriptions if describe is not None else None,
    )


def save_features(features: Features, out: str | Path, meta: dict) -> list[Path]:
    """``.safetensors`` / ``.npz``: one file with ``cls``, ``pooled``, ``patch`` and the metadata.
    ``.npy``: ``<stem>_cls.npy``, ``<stem>_pooled.npy``, ``<stem>_patch.npy`` and ``<stem>_meta.json``.
    The row order is the order of ``meta["paths"]``."""
    out = Path(out)
    if out.suffix not in OUTPUT_FORMATS:
        raise ValueError(f"output {out}: unknown format; use one of {', '.join(OUTPUT_FORMATS)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"cls": features.cls, "pooled": features.pooled}
    if features.patch is not None:
        arrays["patch"] = features.patch
    meta = {**meta, "paths": features.paths, "skipped": features.skipped}
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in arrays.items()}, str(out), metadata={"opendino": json.dumps(meta)})
        return [out]
    if out.suffix == ".npz":
        np.savez(out, **{k: v.numpy() for k, v in arrays.items()}, meta=np.array(json.dumps(meta)))
        return [out]
    written = []
    for key, value in arrays.items():
        written.append(out.with_name(f"{out.stem}_{key}.npy"))
        np.save(written[-1], value.numpy())
    written.append(out.with_name(f"{out.stem}_meta.json"))
    written[-1].write_text(json.dumps(meta, indent=1))
    return written


def model_fingerprint(model: nn.Module) -> str:
    """A digest of the weights and of what the global feature is: features cached for one model are never
    reused for another (two random-initialised twins share their weights, not their pooling)."""
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    if getattr(model, "global_pool", "token") != "token":  # the CLS-token models keep their earlier digests
        digest.update(f"global_pool={model.global_pool}".encode())
    return digest.hexdigest()[:16]


def cached_features(
    model: nn.Module, paths: Sequence[Path], cache_dir: str | Path, *, keep_patch: bool, **kwargs
) -> Features:
    """``extract_features`` whose result is stored in float16 safetensors under ``cache_dir``, keyed by
    the weights, the files (paths, sizes, times) and the settings; a re-run loads it instead."""
    from safetensors.torch import load_file, save_file

    key = hashlib.sha1(model_fingerprint(model).encode())
    for p in paths:
        stat = Path(p).stat()
        key.update(f"{p}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    settings = {k: v for k, v in kwargs.items() if k in ("resolution", "resize", "mean", "std")}
    key.update(json.dumps({**settings, "keep_patch": keep_patch}, sort_keys=True, default=list).encode())
    file = Path(cache_dir) / f"{key.hexdigest()[:24]}.safetensors"
    if file.exists():
        arrays = load_file(str(file))
        meta = json.loads(file.with_suffix(".json").read_text())
        return Features(
            cls=arrays["cls"].float(),
            pooled=arrays["pooled"].float(),
            patch=arrays["patch"] if "patch" in arrays else None,  # float16: dense probes cast per batch
            paths=meta["paths"],
            skipped=meta["skipped"],
            seconds=0.0,
        )
    features = extract_features(model, paths, keep_patch=keep_patch, patch_dtype=torch.float16, **kwargs)
    arrays = {"cls": features.cls, "pooled": features.pooled}
    if features.patch is not None:
        arrays["patch"] = features.patch
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in arrays.items()}, str(file))
    file.with_suffix(".json").write_text(json.dumps({"paths": features.paths, "skipped": features.skipped}))
    return features
