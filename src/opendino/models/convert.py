"""State-dict layouts of DINOv3 ViTs: official (our own) <-> timm ``Eva`` <-> Hugging Face ``DINOv3ViTModel``.

Key mapping facts (shared/fixtures/README.md, "Interop facts"): timm renames storage tokens to
``reg_token``, LayerScale to ``gamma_{1,2}``, SwiGLU to ``fc1_g / fc1_x / fc2`` and keeps the q and v
thirds of the qkv bias; Hugging Face splits qkv into ``q/k/v_proj``, renames the rest, and recomputes the
RoPE periods from ``rope_theta``. Neither layout has the untied ``cls_norm``; ``local_cls_norm`` (training
only) and the RoPE ``periods`` / ``bias_mask`` buffers are dropped and rebuilt on the way back.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

LAYOUTS = ("official", "timm", "hf")

# (official pattern, timm replacement) and (official pattern, hf replacement); anchored regexes.
_TIMM_RULES = [
    (r"storage_tokens", "reg_token"),
    (r"blocks\.(\d+)\.ls1\.gamma", r"blocks.\1.gamma_1"),
    (r"blocks\.(\d+)\.ls2\.gamma", r"blocks.\1.gamma_2"),
    (r"blocks\.(\d+)\.mlp\.w1\.(weight|bias)", r"blocks.\1.mlp.fc1_g.\2"),
    (r"blocks\.(\d+)\.mlp\.w2\.(weight|bias)", r"blocks.\1.mlp.fc1_x.\2"),
]
# timm names both the MLP's second layer and SwiGLU's output layer `fc2`: only SwiGLU models map it to w3.
_TIMM_SWIGLU_OUT = (r"blocks\.(\d+)\.mlp\.w3\.(weight|bias)", r"blocks.\1.mlp.fc2.\2")
_HF_RULES = [
    (r"cls_token", "embeddings.cls_token"),
    (r"mask_token", "embeddings.mask_token"),
    (r"storage_tokens", "embeddings.register_tokens"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embeddings.\1"),
    (r"blocks\.(\d+)\.norm([12])\.(weight|bias)", r"model.layer.\1.norm\2.\3"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"model.layer.\1.attention.o_proj.\2"),
    (r"blocks\.(\d+)\.ls([12])\.gamma", r"model.layer.\1.layer_scale\2.lambda1"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"model.layer.\1.mlp.up_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", r"model.layer.\1.mlp.down_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.w1\.(weight|bias)", r"model.layer.\1.mlp.gate_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.w2\.(weight|bias)", r"model.layer.\1.mlp.up_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.w3\.(weight|bias)", r"model.layer.\1.mlp.down_proj.\2"),
    (r"norm\.(weight|bias)", r"norm.\1"),
]
_DROPPED = re.compile(r"rope_embed\.periods|.*\.bias_mask|local_cls_norm\..*")


class ConversionError(ValueError):
    pass


def detect_layout(state: Mapping[str, Tensor]) -> str:
    if "embeddings.cls_token" in state:
        return "hf"
    if "reg_token" in state or "blocks.0.gamma_1" in state or "blocks.0.attn.q_bias" in state:
        return "timm"
    return "official"


def _rename(key: str, rules: list[tuple[str, str]], inverse: bool = False) -> str | None:
    for official, other in rules:
        if inverse:
            pattern, template = _template_to_regex(other), _regex_to_template(official)
        else:
            pattern, template = official, other
        if re.fullmatch(pattern, key):
            return re.sub(pattern, template, key)
    return None


def _template_to_regex(template: str) -> str:
    # Inverse rules: the replacement with \1, \2 ... becomes a pattern with capture groups.
    return re.sub(r"\\(\d)", r"([^.]+)", template.replace(".", r"\."))


def _regex_to_template(pattern: str) -> str:
    groups = iter(range(1, 10))
    return re.sub(r"\([^)]*\)", lambda _: f"\\{next(groups)}", pattern).replace(r"\.", ".")


def _check_representable(state: Mapping[str, Tensor], layout: str) -> None:
    if "cls_norm.weight" in state:
        raise ConversionError(f"the {layout} layout has no untied cls_norm; this model cannot be converted")
    if "pos_embed" in state:
        raise ConversionError(
            f"a DINOv2 model (learned position embeddings) has no {layout} conversion here; timm's DINOv2 "
            "models load its released layout with timm's own checkpoint filter"
        )
    if "downsample_layers.0.0.weight" in state:
        raise ConversionError(f"only ViTs convert to the {layout} layout; ConvNeXt keeps the official layout")
    bias = next((v for k, v in state.items() if k.endswith("attn.qkv.bias")), None)
    if bias is not None and "blocks.0.attn.qkv.bias_mask" not in state:
        if bias.view(3, -1)[1].abs().max() > 0:
            raise ConversionError(
                f"the {layout} layout has no key bias, and this model's key bias is not zero (trained without "
                "the masked key bias, as the official training default; train with "
                "model.kwargs.mask_k_bias=true to export to timm or transformers)"
            )


def to_timm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official -> timm ``Eva`` (``vit_*_patch16_dinov3_qkvb`` for models with a qkv bias)."""
    _check_representable(state, "timm")
    out = {}
    for key, value in state.items():
        if _DROPPED.fullmatch(key) or key == "mask_token":
            continue
        if key.endswith("attn.qkv.bias"):
            q, _, v = value.chunk(3)
            out[key.replace("qkv.bias", "q_bias")], out[key.replace("qkv.bias", "v_bias")] = q, v
            continue
        out[_rename(key, [*_TIMM_RULES, _TIMM_SWIGLU_OUT]) or key] = value
    return out


def to_hf(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official -> Hugging Face ``DINOv3ViTModel`` (see :func:`hf_config` for its config)."""
    _check_representable(state, "Hugging Face")
    out = {}
    for key, value in state.items():
        if _DROPPED.fullmatch(key):
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", key)
        if m:
            i, kind = m.groups()
            q, k, v = value.chunk(3)
            for name, part in (("q", q), ("k", k), ("v", v)):
                if kind == "bias" and name == "k":
                    continue  # key_bias=False: the masked K bias is zero
                out[f"model.layer.{i}.attention.{name}_proj.{kind}"] = part
            continue
        new = _rename(key, _HF_RULES)
        if new is None:
            raise ConversionError(f"no Hugging Face name for {key!r}")
        out[new] = value.reshape(1, 1, -1) if key == "mask_token" else value
    return out


def hf_config(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A ``DINOv3ViTConfig`` dict for a ViT built with these official constructor arguments."""
    from opendino.models.vit import SWIGLU_ALIGN, swiglu_hidden_dim

    dim = kwargs["embed_dim"]
    hidden = int(dim * kwargs.get("ffn_ratio", 4.0))
    gated = kwargs.get("ffn_layer", "mlp") != "mlp"
    if gated:
        hidden = swiglu_hidden_dim(hidden, SWIGLU_ALIGN[kwargs["ffn_layer"]])
    norm = kwargs.get("norm_layer", "layernorm")
    if norm == "rmsnorm":
        raise ConversionError("the Hugging Face DINOv3 ViT has no RMSNorm")
    return {
        "model_type": "dinov3_vit",
        "architectures": ["DINOv3ViTModel"],
        "hidden_size": dim,
        "num_hidden_layers": kwargs["depth"],
        "num_attention_heads": kwargs["num_heads"],
        "intermediate_size": hidden,
        "use_gated_mlp": gated,
        "hidden_act": "silu" if gated else "gelu",
        "layer_norm_eps": 1e-5 if norm == "layernormbf16" else 1e-6,
        "rope_theta": kwargs.get("pos_embed_rope_base") or 100.0,
        "num_register_tokens": kwargs.get("n_storage_tokens", 0),
        "patch_size": kwargs.get("patch_size", 16),
        "image_size": kwargs.get("img_size", 224),
        "num_channels": kwargs.get("in_chans", 3),
        "query_bias": kwargs.get("qkv_bias", True),
        "key_bias": False,
        "value_bias": kwargs.get("qkv_bias", True),
        "proj_bias": kwargs.get("proj_bias", True),
        "mlp_bias": kwargs.get("ffn_bias", True),
        "layerscale_value": kwargs.get("layerscale_init") or 1.0,
        "pos_embed_rescale": kwargs.get("pos_embed_rope_rescale_coords"),
    }


def _periods(dim: int, num_heads: int, base: float) -> Tensor:
    head_dim = dim // num_heads
    return base ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))


def _add_official_buffers(out: dict[str, Tensor], num_heads: int, base: float) -> dict[str, Tensor]:
    dim = out["cls_token"].shape[-1]
    out.setdefault("mask_token", torch.zeros(1, dim, dtype=out["cls_token"].dtype))
    out["rope_embed.periods"] = _periods(dim, num_heads, base)
    return dict(sorted(out.items(), key=lambda kv: _official_order(kv[0])))


def _official_order(key: str) -> tuple:
    head = ("cls_token", "storage_tokens", "mask_token", "patch_embed", "rope_embed", "blocks")
    first = key.split(".")[0]
    block = int(key.split(".")[1]) if first == "blocks" else -1
    return (head.index(first) if first in head else len(head), block)


def _merge_qkv_bias(out: dict[str, Tensor], prefix: str, q: Tensor, k: Tensor | None, v: Tensor) -> None:
    k = torch.zeros_like(q) if k is None else k
    out[f"{prefix}.qkv.bias"] = torch.cat([q, k, v])
    mask = torch.ones(3 * q.numel(), dtype=q.dtype)
    mask[q.numel() : 2 * q.numel()] = 0
    out[f"{prefix}.qkv.bias_mask"] = mask


def from_timm(state: Mapping[str, Tensor], num_heads: int | None = None, base: float = 100.0) -> dict[str, Tensor]:
    """timm ``Eva`` (DINOv3) -> official. ``num_heads`` defaults to a head dim of 64 (128 at width 4096,
    as in every released model)."""
    out: dict[str, Tensor] = {}
    rules = [*_TIMM_RULES, _TIMM_SWIGLU_OUT] if "blocks.0.mlp.fc1_g.weight" in state else _TIMM_RULES
    for key, value in state.items():
        m = re.fullmatch(r"(blocks\.\d+\.attn)\.q_bias", key)
        if m:
            _merge_qkv_bias(out, m.group(1), value, state.get(f"{m.group(1)}.k_bias"), state[f"{m.group(1)}.v_bias"])
            continue
        if key.endswith((".v_bias", ".k_bias")) or key.startswith("rope."):
            continue
        out[_rename(key, rules, inverse=True) or key] = value
    dim = out["cls_token"].shape[-1]
    return _add_official_buffers(out, num_heads or dim // (128 if dim == 4096 else 64), base)


def from_hf(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """Hugging Face ``DINOv3ViTModel`` -> official (``config`` is the model's ``config.json``)."""
    state = {k.removeprefix("dinov3."): v for k, v in state.items()}
    out: dict[str, Tensor] = {}
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("model.layer.")})
    for i in layers:
        pre = f"model.layer.{i}.attention"
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([state[f"{pre}.{n}_proj.weight"] for n in "qkv"])
        if f"{pre}.q_proj.bias" in state:
            _merge_qkv_bias(
                out,
                f"blocks.{i}.attn",
                state[f"{pre}.q_proj.bias"],
                state.get(f"{pre}.k_proj.bias"),
                state[f"{pre}.v_proj.bias"],
            )
    gated = config.get("use_gated_mlp", False)
    for key, value in state.items():
        if re.fullmatch(r"model\.layer\.\d+\.attention\.[qkv]_proj\.(weight|bias)", key):
            continue
        if gated and ".mlp.up_proj." in key:
            new = key.replace("model.layer.", "blocks.").replace("mlp.up_proj", "mlp.w2")
        elif gated and ".mlp.down_proj." in key:
            new = key.replace("model.layer.", "blocks.").replace("mlp.down_proj", "mlp.w3")
        else:
            new = _rename(key, _HF_RULES, inverse=True)
        if new is None:
            raise ConversionError(f"unknown Hugging Face key {key!r}")
        out[new] = value.reshape(1, -1) if new == "mask_token" else value
    return _add_official_buffers(out, config["num_attention_heads"], config.get("rope_theta", 100.0))


def to_official(state: Mapping[str, Tensor], hf_config_dict: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
    """Any supported layout -> official (timm and HF are detected from their key names)."""
    layout = detect_layout(state)
    if layout == "timm":
        return from_timm(state)
    if layout == "hf":
        if hf_config_dict is None:
            raise ConversionError("a Hugging Face state dict needs its config.json (pass the model folder)")
        return from_hf(state, hf_config_dict)
    return dict(state)


CONVERTERS: dict[str, Callable[[Mapping[str, Tensor]], dict[str, Tensor]]] = {
    "official": dict,
    "timm": to_timm,
    "hf": to_hf,
}
