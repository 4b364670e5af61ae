"""Named architectures: every released DINOv3 and DINOv2 backbone, the official training geometries, custom
sizes.

Each entry knows its constructor arguments (official names), its normalisation constants and the file
name of its official checkpoint. ``build_model("vitb16")`` gives the architecture with the official random
initialisation; ``opendino.models.checkpoint.load_model`` adds weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from opendino.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from opendino.models.convnext import CONVNEXT_SIZES, ConvNeXt
from opendino.models.dinov2 import DinoV2VisionTransformer
from opendino.models.vit import DinoVisionTransformer

LVD_MEAN, LVD_STD = IMAGENET_MEAN, IMAGENET_STD  # the LVD-1689M models normalise as ImageNet
SAT_MEAN, SAT_STD = (0.430, 0.411, 0.296), (0.213, 0.156, 0.143)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "vit", "dinov2" or "convnext"
    kwargs: Mapping[str, Any]
    mean: tuple[float, float, float] = LVD_MEAN
    std: tuple[float, float, float] = LVD_STD
    checkpoint: str | None = None  # official file name; the files are distributed on request
    summary: str = ""


# Shared by every released ViT (docs/design/recipe.md §1.9, hub constructors).
_RELEASED_VIT = dict(
    img_size=224,
    patch_size=16,
    pos_embed_rope_base=100.0,
    pos_embed_rope_normalize_coords="separate",
    pos_embed_rope_rescale_coords=2.0,
    pos_embed_rope_dtype="fp32",
    layerscale_init=1e-5,
    norm_layer="layernormbf16",
    qkv_bias=True,
    proj_bias=True,
    ffn_bias=True,
    n_storage_tokens=4,
    mask_k_bias=True,
    untie_cls_and_patch_norms=False,
    untie_global_and_local_cls_norm=False,
)
# The official training default (`ssl_default_config.yaml`, student.*) for the training architectures.
_TRAINING_VIT = dict(
    img_size=224,
    patch_size=16,
    pos_embed_rope_base=100.0,
    pos_embed_rope_normalize_coords="separate",
    pos_embed_rope_dtype="bf16",
    layerscale_init=1e-5,
    norm_layer="layernorm",
    qkv_bias=True,
    proj_bias=True,
    ffn_bias=True,
    n_storage_tokens=0,
    mask_k_bias=False,
)


# The released DINOv2 backbones (hub constructors): a 37 x 37 position grid (518 px at patch 14). Non-register
# models resample it by scale factor with a +0.1 offset, register models to the exact size with antialiasing.
_RELEASED_DINOV2 = dict(
    img_size=518,
    patch_size=14,
    mlp_ratio=4.0,
    init_values=1e-5,
    qkv_bias=True,
    proj_bias=True,
    ffn_bias=True,
    num_register_tokens=0,
    interpolate_offset=0.1,
    interpolate_antialias=False,
)
_DINOV2_REG4 = dict(num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True)
# size letter: (embed_dim, depth, num_heads, ffn_layer, parameters without registers; the registers add 4 D)
_DINOV2_SIZES = {
    "s": (384, 12, 6, "mlp", "22.06M"),
    "b": (768, 12, 12, "mlp", "86.58M"),
    "l": (1024, 24, 16, "mlp", "304.37M"),
    "g": (1536, 40, 24, "swiglufused", "1136.48M"),
}


def _dinov2_summary(size: str, ffn: str, params: str, suffix: str) -> str:
    name = f"ViT-{size if size == 'g' else size.upper()}/14" + (" SwiGLU" if ffn != "mlp" else "")
    regs = " + 4 registers" if suffix else ""
    role = ", the teacher" if size == "g" else "" if suffix else ", distilled from ViT-g"
    return f"DINOv2 {name}{regs}, {params}{role} (LVD-142M)"


def _geometry(dim: int, depth: int, heads: int, ffn: str, ratio: float) -> dict[str, Any]:
    return dict(embed_dim=dim, depth=depth, num_heads=heads, ffn_layer=ffn, ffn_ratio=ratio)


def _pth(arch: str, hash_: str, data: str = "lvd1689m") -> str:
    return f"dinov3_{arch}_pretrain_{data}-{hash_}.pth"


_SPECS: list[ModelSpec] = [
    ModelSpec(
        "vits16",
        "vit",
        {**_RELEASED_VIT, **_geometry(384, 12, 6, "mlp", 4)},
        checkpoint=_pth("vits16", "08c60483"),
        summary="ViT-S/16, 21.6M, distilled (LVD-1689M)",
    ),
    ModelSpec(
        "vits16plus",
        "vit",
        {**_RELEASED_VIT, **_geometry(384, 12, 6, "swiglu", 6)},
        checkpoint=_pth("vits16plus", "4057cbaa"),
        summary="ViT-S+/16 SwiGLU, 28.7M, distilled",
    ),
    ModelSpec(
        "vitb16",
        "vit",
        {**_RELEASED_VIT, **_geometry(768, 12, 12, "mlp", 4)},
        checkpoint=_pth("vitb16", "73cec8be"),
        summary="ViT-B/16, 85.7M, distilled",
    ),
    ModelSpec(
        "vitl16",
        "vit",
        {**_RELEASED_VIT, **_geometry(1024, 24, 16, "mlp", 4)},
        checkpoint=_pth("vitl16", "8aa4cbdd"),
        summary="ViT-L/16, 303M, distilled",
    ),
    ModelSpec(
        "vitl16plus",
        "vit",
        {**_RELEASED_VIT, **_geometry(1024, 24, 16, "swiglu", 6)},
        checkpoint=_pth("vitl16plus", "46503df0"),
        summary="ViT-L+/16 SwiGLU, 404M, distilled",
    ),
    ModelSpec(
        "vith16plus",
        "vit",
        {**_RELEASED_VIT, **_geometry(1280, 32, 20, "swiglu", 6)},
        checkpoint=_pth("vith16plus", "7c1da9a5"),
        summary="ViT-H+/16 SwiGLU, 841M, distilled",
    ),
    ModelSpec(
        "vit7b16",
        "vit",
        {
            **_RELEASED_VIT,
            **_geometry(4096, 40, 32, "swiglu64", 3),
            "qkv_bias": False,
            "untie_global_and_local_cls_norm": True,
        },
        checkpoint=_pth("vit7b16", "a955f4ea"),
        summary="ViT-7B/16, 6.7B, the teacher (LVD-1689M)",
    ),
    ModelSpec(
        "vitl16_sat493m",
        "vit",
        {**_RELEASED_VIT, **_geometry(1024, 24, 16, "mlp", 4), "untie_global_and_local_cls_norm": True},
        mean=SAT_MEAN,
        std=SAT_STD,
        checkpoint=_pth("vitl16", "eadcf0ff", "sat493m"),
        summary="ViT-L/16 satellite (SAT-493M), distilled",
    ),
    ModelSpec(
        "vit7b16_sat493m",
        "vit",
        {
            **_RELEASED_VIT,
            **_geometry(4096, 40, 32, "swiglu64", 3),
            "qkv_bias": False,
            "untie_global_and_local_cls_norm": True,
        },
        mean=SAT_MEAN,
        std=SAT_STD,
        checkpoint=_pth("vit7b16", "a6675841", "sat493m"),
        summary="ViT-7B/16 satellite (SAT-493M)",
    ),
    *(
        ModelSpec(
            f"convnext_{size}",
            "convnext",
            dict(depths=depths, dims=dims),
            checkpoint=_pth(f"convnext_{size}", hash_),
            summary=f"ConvNeXt-{size.capitalize()}, distilled",
        )
        for (size, (depths, dims)), hash_ in zip(
            CONVNEXT_SIZES.items(), ("21b726bb", "296db49d", "801f2ba9", "61fa432d"), strict=True
        )
    ),
    *(
        ModelSpec(
            f"dinov2_vit{size}14{suffix}",
            "dinov2",
            {
                **_RELEASED_DINOV2,
                **(_DINOV2_REG4 if suffix else {}),
                "embed_dim": dim,
                "depth": depth,
                "num_heads": heads,
                "ffn_layer": ffn,
            },
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            checkpoint=f"dinov2_vit{size}14{suffix}_pretrain.pth",
            summary=_dinov2_summary(size, ffn, params, suffix),
        )
        for size, (dim, depth, heads, ffn, params) in _DINOV2_SIZES.items()
        for suffix in ("", "_reg4")
    ),
    # Geometries of the official training constructors (`student.arch`), with the training defaults.
    *(
        ModelSpec(
            name,
            "vit",
            {**_TRAINING_VIT, **_geometry(dim, depth, heads, "mlp", ratio)},
            summary=f"training geometry {name} (official default config)",
        )
        for name, dim, depth, heads, ratio in (
            ("vit_small", 384, 12, 6, 4.0),
            ("vit_base", 768, 12, 12, 4.0),
            ("vit_large", 1024, 24, 16, 4.0),
            ("vit_so400m", 1152, 27, 18, 3.777777778),
            ("vit_huge2", 1280, 32, 20, 4.0),
            ("vit_giant2", 1536, 40, 24, 4.0),
            ("vit_7b", 4096, 40, 32, 3.0),
        )
    ),
]
MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}


class UnknownModelError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, MODELS, n=3, cutoff=0.4)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownModelError(f"unknown model {name!r}.{hint} Known: {', '.join(MODELS)}") from None


def input_channels(model: nn.Module) -> int:
    """The number of input channels of a backbone (3 for models built without ``in_chans``)."""
    return int(getattr(model, "model_kwargs", {}).get("in_chans", 3))


def normalisation(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input mean and std a model was trained with: those its file records (``input_normalisation``),
    else its registered spec's, else the LVD-1689M ones, which only an RGB model can take."""
    stored = getattr(model, "input_normalisation", None)
    if stored is not None:
        return stored
    channels = input_channels(model)
    if channels != 3:  # a registered architecture's statistics are those of its RGB weights
        raise ValueError(
            f"the model takes {channels} input channels and records no normalisation; models exported by "
            "`opendino train` record theirs (crops.mean / crops.std), or evaluate the run folder"
        )
    spec = getattr(model, "spec", None)
    return (spec.mean, spec.std) if spec else (LVD_MEAN, LVD_STD)


def create(family: str, kwargs: Mapping[str, Any], device: torch.device | str | None = None) -> nn.Module:
    """Builds a backbone from a family name and official constructor arguments."""
    cls = {"vit": DinoVisionTransformer, "dinov2": DinoV2VisionTransformer, "convnext": ConvNeXt}[family]
    model = cls(**kwargs, device=device)
    model.family, model.model_kwargs = family, dict(kwargs)
    return model


def build_model(name: str, device: torch.device | str | None = None, **overrides: Any) -> nn.Module:
    """A named architecture with the official random initialisation; ``overrides`` give custom sizes
    (e.g. ``build_model("vits16", embed_dim=192, num_heads=3, depth=6)``)."""
    spec = get_spec(name)
    model = create(spec.family, {**spec.kwargs, **overrides}, device=device)
    model.spec = spec
    return model
