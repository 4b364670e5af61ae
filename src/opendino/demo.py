"""The end-to-end demo run by ``make demo``: the most complete path that exists so far.

1. pretrains a tiny ViT with the full SSL recipe (DINO + iBOT + KoLeo, Sinkhorn-Knopp, EMA teacher) on
   the synthetic world (``configs/demo/pretrain.yaml``) and prints its loss curve;
2. evaluates the trained teacher against a random-initialised model of the same architecture with k-NN
   on held-out synthetic scenes;
3. checks interoperability: the trained backbone reloads from safetensors, and its weights give the same
   features in timm and Hugging Face transformers (ViT-S/16 geometry with the same code paths).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from opendino.data.augment import normalize
from opendino.data.synthetic import render_scene
from opendino.eval.knn import knn_accuracy
from opendino.models import build_model, load_model
from opendino.models.convert import hf_config, to_hf, to_timm
from opendino.train.config import load_train_config
from opendino.train.logging import read_metrics
from opendino.train.trainer import Trainer

PRESET = Path(__file__).resolve().parents[2] / "configs" / "demo" / "pretrain.yaml"
N_TRAIN, N_TEST = 1000, 500


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
        diff = (peer.eval()(pixel_values=x).last_hidden_state - ours).abs().max().item()
        result["transformers DINOv3ViTModel"] = f"{diff:.2e}"
    except ImportError:
        result["transformers DINOv3ViTModel"] = "transformers not installed"
    return result


@torch.inference_mode()
def _features(model: torch.nn.Module, split: str, n: int, size: int, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels = [], []
    for start in range(0, n, 100):
        scenes = [render_scene(i, size, split) for i in range(start, min(n, start + 100))]
        images = torch.stack([torch.from_numpy(np.array(s.image)).permute(2, 0, 1) for s in scenes])
        feats.append(model.eval()(normalize(images, mean, std)))
        labels += [s.label for s in scenes]
    return torch.cat(feats), torch.tensor(labels)


def run_demo(out: Path, overrides: list[str] = ()) -> dict:
    """Runs the demo, prints its report and returns the k-NN results (``{"trained": {k: acc}, ...}``)."""
    t0 = time.perf_counter()
    cfg = load_train_config(PRESET, [f"run.dir={out / 'pretrain'}", *overrides])
    run = Trainer(cfg).run()
    train_s = time.perf_counter() - t0
    records = [r for r in read_metrics(run) if not r.get("skipped_step")]

    teacher = load_model(run / "teacher.safetensors")
    torch.manual_seed(0)
    random_init = build_model(cfg.model.arch, **cfg.model.kwargs)
    size, mean, std = cfg.crops.global_size, cfg.crops.mean, cfg.crops.std
    results = {}
    for name, model in (("trained", teacher), ("random init", random_init)):
        train = _features(model, "train", N_TRAIN, size, mean, std)
        test = _features(model, "val", N_TEST, size, mean, std)
        results[name] = knn_accuracy(*train, *test, ks=(10, 20))

    with torch.inference_mode():
        vits = build_model("vits16").eval()
        batch = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        peers = _peer_differences(vits, batch)

    print(f"\nOpenDINO demo — SSL pretraining of a tiny ViT on the synthetic world ({run})\n")
    print("  step   loss    dino_local  ibot    koleo")
    for r in records[:: max(1, len(records) // 8)] + ([records[-1]] if len(records) % 8 else []):
        print(f"  {r['step']:>4}   {r['loss']:.3f}  {r['dino_local']:.3f}       {r['ibot']:.3f}   {r['koleo']:.3f}")
    print(f"\n  k-NN on held-out scenes (train {N_TRAIN}, val {N_TEST}, 10 classes, chance 10%):")
    print("  model          k=10     k=20")
    for name, acc in results.items():
        print(f"  {name:<13}  {acc[10]:.1%}    {acc[20]:.1%}")
    print("\n  interoperability (ViT-S/16, our weights in peer libraries, max |diff| of all tokens):")
    for name, value in peers.items():
        print(f"    {name:<28} {value}")
    print(f"\n  training {train_s:.0f}s, total {time.perf_counter() - t0:.0f}s\n")
    return results
