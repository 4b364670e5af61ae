"""The end-to-end demo run by ``make demo``: the most complete path that exists so far.

1. renders synthetic scenes into an image folder (the path users' own folders take);
2. extracts CLS / pooled / patch features with the official ViT-S/16 architecture (random weights: no
   weights can be downloaded here; pass real ones to ``opendino extract --weights``);
3. saves the model as safetensors, reloads it and converts it to the timm and Hugging Face layouts, and
   checks that all of them give the same features;
4. prints a results table.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from opendino.data.sources import list_images
from opendino.data.synthetic import write_image_folder
from opendino.eval.features import extract_features, save_features
from opendino.models import build_model, load_model, save_model
from opendino.models.convert import hf_config, to_hf, to_timm

N_IMAGES, SIZE, RESOLUTION = 64, 128, 128


def _tokens(out: dict) -> torch.Tensor:
    return torch.cat([out["x_norm_clstoken"][:, None], out["x_storage_tokens"], out["x_norm_patchtokens"]], 1)


def _peer_differences(model: torch.nn.Module, x: torch.Tensor) -> dict[str, str]:
    """Max |diff| of all output tokens against timm and transformers fed our converted weights."""
    ours = _tokens(model.forward_features(x))
    state = model.state_dict()
    result = {}
    try:
        import timm

        peer = timm.create_model("vit_small_patch16_dinov3_qkvb", pretrained=False, dynamic_img_size=True)
        peer.load_state_dict(to_timm(state), strict=True)
        result["timm Eva"] = f"{(peer.eval().forward_features(x) - ours).abs().max().item():.2e}"
    except ImportError:
        result["timm Eva"] = "timm not installed"
    try:
        from transformers import DINOv3ViTConfig, DINOv3ViTModel

        cfg = {k: v for k, v in hf_config(model.model_kwargs).items() if k not in ("model_type", "architectures")}
        peer = DINOv3ViTModel(DINOv3ViTConfig(**cfg))
        peer.load_state_dict(to_hf(state), strict=True)
        result["transformers DINOv3ViTModel"] = (
            f"{(peer.eval()(pixel_values=x).last_hidden_state - ours).abs().max().item():.2e}"
        )
    except ImportError:
        result["transformers DINOv3ViTModel"] = "transformers not installed"
    return result


def run_demo(out: Path) -> int:
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    root = write_image_folder(out / "data", n=N_IMAGES, size=SIZE, split="train")
    render_s = time.perf_counter() - t0
    paths = list_images(root)

    model = build_model("vits16")
    spec = model.spec
    feats = extract_features(model, paths, mean=spec.mean, std=spec.std, resolution=RESOLUTION, batch_size=16)
    written = save_features(feats, out / "features.safetensors", {"model": "vits16 (random init)"})

    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, Path(tmp) / "vits16.safetensors")
        reloaded = load_model(Path(tmp) / "vits16.safetensors").eval()
    with torch.inference_mode():
        batch = torch.randn(2, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(0))
        ref = _tokens(model.eval().forward_features(batch))
        reload_diff = (_tokens(reloaded.forward_features(batch)) - ref).abs().max().item()
        peers = _peer_differences(model, batch)

    rows = [
        ("synthetic scenes rendered", f"{len(paths)} at {SIZE}px in {render_s:.2f}s -> {root}"),
        ("features extracted", f"cls {tuple(feats.cls.shape)}, patch {tuple(feats.patch.shape)}"),
        ("extraction speed (CPU, fp32)", f"{feats.images_per_second:.1f} images/s at {RESOLUTION}px"),
        ("unreadable images skipped", str(len(feats.skipped))),
        ("saved", ", ".join(map(str, written))),
        ("safetensors save/reload max |diff|", f"{reload_diff:.2e}"),
        *((f"vs {name} max |diff|", value) for name, value in peers.items()),
    ]
    width = max(len(r[0]) for r in rows)
    print("\nOpenDINO demo — ViT-S/16 (official architecture, random weights)\n")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print(f"\n  total {time.perf_counter() - t0:.1f}s\n")
    return 0
