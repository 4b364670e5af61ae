"""Reading backbone weights safely and building the matching model.

Files are read with ``torch.load(weights_only=True)`` or safetensors, never unpickled. Accepted: bare
official backbone state dicts (DINOv3 and DINOv2 hub ``.pth``), training checkpoints (``{"teacher":
{"backbone.*", heads}}``, DINOv2's ``blocks.{chunk}.{i}`` block chunks included),
OpenDINO safetensors files (which carry their constructor arguments), and the timm / Hugging Face
layouts (converted on the fly). A file whose keys do not fit the requested architecture fails with the
missing / unexpected keys and the closest known architecture.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from opendino.models import convert
from opendino.models.registry import MODELS, build_model, create, get_spec

METADATA_KEY = "opendino_model"  # safetensors metadata: {"family": ..., "kwargs": {...}, "name": ...}
_WRAPPER_KEYS = ("teacher", "model_ema", "model", "state_dict", "student")
_PREFIXES = ("module.", "_orig_mod.", "backbone.")


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint, or weights that do not fit the architecture."""


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """Returns the official-layout backbone state dict of a file and, if stored, its model description."""
    path = Path(path)
    hf_config = None
    if path.is_dir():
        if not ((path / "config.json").is_file() and (path / "model.safetensors").is_file()):
            raise CheckpointError(f"{path}: a folder must hold a Hugging Face model (config.json, model.safetensors)")
        hf_config = json.loads((path / "config.json").read_text())
        path = path / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    meta = None
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                state = {k: f.get_tensor(k) for k in f.keys()}
                raw_meta = (f.metadata() or {}).get(METADATA_KEY)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        meta = json.loads(raw_meta) if raw_meta else None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"{path}: not a readable weights-only PyTorch checkpoint: damaged, another format, or holding "
                f"Python objects beyond tensors and plain containers (OpenDINO never unpickles arbitrary "
                f"objects): {str(e).splitlines()[0]}"
            ) from None
        except Exception as e:  # arbitrary bytes make the unpickler raise almost any exception type
            raise CheckpointError(
                f"{path}: not a readable PyTorch checkpoint (truncated or another format?): {e}"
            ) from None
        state = _unwrap(obj, path)
    try:
        return convert.to_official(state, hf_config), meta
    except (convert.ConversionError, KeyError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    while isinstance(obj, Mapping) and not _is_state_dict(obj):
        key = next((k for k in _WRAPPER_KEYS if k in obj), None)
        if key is None:
            raise CheckpointError(f"{path}: no state dict found; top-level keys: {list(obj)[:10]}")
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    state = {}
    backbone_prefixed = any(k.startswith("backbone.") for k in obj)
    for key, value in obj.items():
        if backbone_prefixed and not key.startswith("backbone."):
            continue  # heads and loss buffers of a training checkpoint
        for prefix in _PREFIXES:
            key = key.removeprefix(prefix)
        state[key] = value
    return _flatten_block_chunks(state)


def _flatten_block_chunks(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """DINOv2 training checkpoints (``block_chunks > 0``) name blocks ``blocks.{chunk}.{i}.*``: back to
    ``blocks.{i}.*``. DINOv2 pads each chunk with parameter-free identities, so ``i`` already counts from the
    first block; indices that restart in every chunk are offset by the blocks of the earlier chunks."""
    pattern = re.compile(r"blocks\.(\d+)\.(\d+)\.(.+)")
    matches = {key: pattern.fullmatch(key) for key in state}
    if not any(matches.values()):
        return state
    inner: dict[int, set[int]] = {}
    for m in filter(None, matches.values()):
        inner.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    chunks = sorted(inner)
    global_indices = sum(len(inner[c]) for c in chunks) == len(set().union(*inner.values()))
    offsets, total = {}, 0
    for c in chunks:
        offsets[c] = 0 if global_indices else total
        total += len(inner[c])
    out = {}
    for key, value in state.items():
        m = matches[key]
        if m is not None:
            key = f"blocks.{offsets[int(m.group(1))] + int(m.group(2))}.{m.group(3)}"
        out[key] = value
    return out


def _is_state_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


@functools.cache
def _signature(name: str) -> frozenset[tuple[str, tuple[int, ...]]]:
    return frozenset((k, tuple(v.shape)) for k, v in build_model(name, device="meta").state_dict().items())


def closest_architecture(state: Mapping[str, Tensor]) -> tuple[str, float]:
    """The registered architecture whose (key, shape) set overlaps most with ``state`` (Jaccard)."""
    target = {(k, tuple(v.shape)) for k, v in state.items()}
    best, best_score = "", -1.0
    for name in MODELS:
        ref = _signature(name)
        score = len(ref & target) / len(ref | target)
        if score > best_score:
            best, best_score = name, score
    return best, best_score


def infer_model_kwargs(state: Mapping[str, Tensor]) -> tuple[str, dict[str, Any]]:
    """Constructor arguments read off an official-layout state dict (custom sizes included)."""
    if "downsample_layers.0.0.weight" in state:
        dims = [state[f"downsample_layers.{i}.{0 if i == 0 else 1}.weight"].shape[0] for i in range(4)]
        depths = [len({k.split(".")[2] for k in state if k.startswith(f"stages.{s}.")}) for s in range(4)]
        return "convnext", dict(
            in_chans=state["downsample_layers.0.0.weight"].shape[1],
            depths=depths,
            dims=dims,
            layer_scale_init_value=1e-6 if "stages.0.0.gamma" in state else 0.0,
        )
    if "cls_token" not in state or "patch_embed.proj.weight" not in state:
        raise CheckpointError("not a DINOv3 ViT or ConvNeXt state dict (no cls_token / patch_embed / stages)")
    if "pos_embed" in state and "rope_embed.periods" not in state:
        return "dinov2", _infer_dinov2_kwargs(state)
    dim = state["cls_token"].shape[-1]
    if "rope_embed.periods" not in state:
        raise CheckpointError("cannot infer the number of heads: the state dict has no rope_embed.periods")
    periods = state["rope_embed.periods"].float()
    head_dim = 4 * periods.numel()
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    kwargs: dict[str, Any] = dict(
        img_size=224,
        patch_size=state["patch_embed.proj.weight"].shape[-1],
        in_chans=state["patch_embed.proj.weight"].shape[1],
        embed_dim=dim,
        depth=depth,
        num_heads=dim // head_dim,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        proj_bias="blocks.0.attn.proj.bias" in state,
        mask_k_bias="blocks.0.attn.qkv.bias_mask" in state,
        layerscale_init=1e-5 if "blocks.0.ls1.gamma" in state else None,
        n_storage_tokens=state["storage_tokens"].shape[1] if "storage_tokens" in state else 0,
        untie_cls_and_patch_norms="cls_norm.weight" in state,
        untie_global_and_local_cls_norm="local_cls_norm.weight" in state,
        # LayerNorm eps is not stored; released models use 1e-5 ("layernormbf16").
        norm_layer="layernormbf16" if "norm.bias" in state else "rmsnorm",
        pos_embed_rope_dtype="fp32",
        pos_embed_rope_normalize_coords="separate",
    )
    if "blocks.0.mlp.w1.weight" in state:
        hidden = state["blocks.0.mlp.w1.weight"].shape[0]
        kwargs.update(ffn_layer="swiglu", ffn_ratio=hidden * 1.5 / dim, ffn_bias="blocks.0.mlp.w1.bias" in state)
    else:
        hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
        kwargs.update(ffn_layer="mlp", ffn_ratio=hidden / dim, ffn_bias="blocks.0.mlp.fc1.bias" in state)
    if periods.numel() > 1 and abs(periods[0].item() - 1.0) < 1e-6:
        kwargs["pos_embed_rope_base"] = round(periods[1].item() ** (head_dim / 4), 3)
    elif periods.numel() > 1:
        kwargs.update(
            pos_embed_rope_base=None,
            pos_embed_rope_min_period=periods[0].item(),
            pos_embed_rope_max_period=periods[-1].item(),
        )
    return "vit", kwargs


def _infer_dinov2_kwargs(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """DINOv2 constructor arguments of a DINOv2-layout state dict (learned ``pos_embed``, no RoPE). The
    number of heads is not stored: every DINOv2 model has 64-dimensional heads. Register models get the
    released register-model resampling (exact size, antialiased), the others the +0.1 offset rule."""
    from opendino.models.dinov2 import packed_swiglu_hidden_dim

    dim = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    if grid * grid != state["pos_embed"].shape[1] - 1:
        raise CheckpointError(f"pos_embed {tuple(state['pos_embed'].shape)} is not a cls slot and a square grid")
    registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    kwargs: dict[str, Any] = dict(
        img_size=grid * patch,
        patch_size=patch,
        in_chans=state["patch_embed.proj.weight"].shape[1],
        embed_dim=dim,
        depth=len({k.split(".")[1] for k in state if k.startswith("blocks.")}),
        num_heads=max(dim // 64, 1),
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        proj_bias="blocks.0.attn.proj.bias" in state,
        init_values=1e-5 if "blocks.0.ls1.gamma" in state else None,
        num_register_tokens=registers,
        interpolate_offset=0.0 if registers else 0.1,
        interpolate_antialias=bool(registers),
    )
    if "blocks.0.mlp.w12.weight" in state:
        hidden = state["blocks.0.mlp.w12.weight"].shape[0] // 2
        ratio = next(
            (r for r in (4.0, hidden * 1.5 / dim) if packed_swiglu_hidden_dim(dim, r) == hidden),
            None,
        )
        if ratio is None:
            raise CheckpointError(f"no mlp_ratio gives the packed SwiGLU width {hidden} at embed_dim {dim}")
        kwargs.update(ffn_layer="swiglufused", mlp_ratio=ratio, ffn_bias="blocks.0.mlp.w12.bias" in state)
    else:
        hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
        kwargs.update(ffn_layer="mlp", mlp_ratio=hidden / dim, ffn_bias="blocks.0.mlp.fc1.bias" in state)
    return kwargs


def load_weights(model: nn.Module, state: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Strict load with a readable error: missing / unexpected / mis-shaped keys and the closest model."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mis_shaped = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mis_shaped:
        name, score = closest_architecture(state)
        lines = [f"{source} does not fit this architecture."]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mis_shaped)):
            if items:
                more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
                lines.append(f"  {title} keys ({len(items)}): {', '.join(items[:8])}{more}")
        lines.append(f"  closest known architecture: {name} ({score:.0%} of keys and shapes match)")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state, strict=True)


def load_model(
    source: str | Path, weights: str | Path | None = None, device: torch.device | str | None = None
) -> nn.Module:
    """A backbone from a registered name (random init, or ``weights``) or from a checkpoint file alone."""
    if str(source) in MODELS:
        model = build_model(str(source), device="meta" if weights else device)
        if weights is None:
            return model
        state, _ = read_checkpoint(weights)
        return _materialise(model, state, str(weights), device)
    path = Path(source)
    if weights is not None:
        raise CheckpointError(f"give weights either as the source ({path}) or with weights=, not both")
    if not path.exists():
        if "/" in str(source) or path.suffix in (".safetensors", ".pth", ".pt", ".bin"):
            raise FileNotFoundError(f"{path}: no such checkpoint file or folder")
        get_spec(str(source))  # a name: raises with the known names and close matches
    state, meta = read_checkpoint(path)
    if meta is not None:
        model = create(meta["family"], meta["kwargs"], device="meta")
        if meta.get("name") in MODELS:
            model.spec = MODELS[meta["name"]]
        if "mean" in meta:  # the normalisation it was trained with (registry.normalisation)
            model.input_normalisation = (tuple(meta["mean"]), tuple(meta["std"]))
    else:
        name, score = closest_architecture(state)
        if score == 1.0:
            model = build_model(name, device="meta")
        else:
            model = create(*infer_model_kwargs(state), device="meta")
    return _materialise(model, state, str(path), device)


def _materialise(model: nn.Module, state: Mapping[str, Tensor], source: str, device) -> nn.Module:
    model.to_empty(device=device or "cpu")
    load_weights(model, state, source)
    return model


def save_model(
    model: nn.Module, path: str | Path, state: dict[str, Tensor] | None = None, metadata: dict[str, str] | None = None
) -> None:
    """Writes a backbone as safetensors with its constructor arguments (and its ``input_normalisation``,
    when it has one) in the metadata; ``state``: its
    weights when they are not ``model.state_dict()`` (a sharded model's gathered full state); ``metadata``:
    more string entries for the file's metadata."""
    from safetensors.torch import save_file

    meta = {"family": model.family, "kwargs": model.model_kwargs, "name": getattr(model, "spec", None)}
    meta["name"] = meta["name"].name if meta["name"] is not None else None
    if (stats := getattr(model, "input_normalisation", None)) is not None:
        meta["mean"], meta["std"] = (list(v) for v in stats)
    # clone(): safetensors refuses tensors that share memory (ConvNeXt's norm / norms.3 pair).
    state = {k: v.detach().cpu().clone() for k, v in (model.state_dict() if state is None else state).items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={**(metadata or {}), METADATA_KEY: json.dumps(meta)})
    # safetensors writes 0600; a model is shared like any other file the user writes
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
