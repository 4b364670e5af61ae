"""A dense-quality monitor inside training (the measurement that showed the paper its dense degradation).

Every ``monitor.every`` steps the EMA teacher is evaluated on a fixed held-out set of synthetic scenes:
a training-free segmentation probe of its patch features (each patch of ``n_eval`` scenes takes the
majority class of its nearest patch among ``n_fit`` other scenes, by cosine similarity; mIoU), as in the
in-context dense evaluations of Balažević et al. (2023), the mean cosine similarity between the
CLS token and the patch tokens (it rises when patch features collapse towards the global one), a k-NN
accuracy of the CLS token (k = 10, the same scenes) as the global counterpart, and, with Gram anchoring,
the Gram loss between the teacher's and the Gram teacher's patch features.

Four diagnostics say *why* dense quality moves (docs/experiments.md, Gram anchoring): the effective rank
of the patch features (RankMe, Garrido et al. 2023: exp of the entropy of the normalised singular values;
it falls when patches collapse onto few directions), the spread (standard deviation) of the
patch-to-patch cosine similarities within an image (it falls when all patches of an image look alike),
their mean, and the entropy of the last block's attention of the CLS token over the tokens, as a fraction
of the uniform entropy (near 1: it averages everything; low: it reads a few patches).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from opendino.data.augment import normalize
from opendino.data.synthetic import CLASSES, render_scene
from opendino.losses import gram_loss
from opendino.models.vit import global_feature
from opendino.probes import knn_accuracy, nearest_neighbour_segmentation

N_SEG_CLASSES = len(CLASSES) + 1  # background + shapes
SCORE = "monitor_seg_miou"  # the dense score whose best point train/dense_peak.py keeps


class DenseMonitor:
    def __init__(self, size: int, patch_size: int, mean, std, n_fit: int = 64, n_eval: int = 32) -> None:
        scenes = [render_scene(10_000_000 + i, size, "val") for i in range(n_fit + n_eval)]  # unused by evals
        images = torch.stack([torch.from_numpy(np.array(s.image)).permute(2, 0, 1) for s in scenes])
        self.images = normalize(images, mean, std)
        self.grid = size // patch_size
        self.maps = torch.from_numpy(np.stack([s.semantic for s in scenes]))
        self.labels = torch.tensor([s.label for s in scenes])
        self.n_fit = n_fit

    @torch.no_grad()
    def __call__(self, backbone: nn.Module, reference: nn.Module | None = None) -> dict[str, float]:
        """The metrics of ``backbone``; with a ``reference`` backbone (the Gram teacher) also the Gram loss
        between their patch features."""
        device = next(backbone.parameters()).device
        modes = [(m, m.training) for m in (backbone, reference) if m is not None]
        attention = _LastAttention(backbone)
        # eager: a compiled block would not run the hook added after its compilation
        with attention, torch.compiler.set_stance("force_eager"):
            out = backbone.eval()(self.images.to(device), is_training=True)
        patches = out["x_norm_patchtokens"].float().cpu()  # [N, P, D]
        cls = out["x_norm_clstoken"].float().cpu()
        glob = global_feature(backbone, out).float().cpu()  # what k-NN reads (the mean patch for global_pool=avg)
        result = {
            "monitor_seg_miou": self._retrieval_miou(patches),
            "monitor_cls_patch_cos": F.cosine_similarity(cls[:, None], patches, dim=-1).mean().item(),
            "monitor_knn": knn_accuracy(
                glob[: self.n_fit], self.labels[: self.n_fit], glob[self.n_fit :], self.labels[self.n_fit :], ks=(10,)
            )[10],
            **patch_diagnostics(patches),
        }
        if attention.probs is not None:
            result["monitor_cls_attn_entropy"] = attention.cls_entropy()
        if reference is not None:
            anchor = reference.eval()(self.images.to(device), is_training=True)["x_norm_patchtokens"].float()
            result["monitor_gram_distance"] = gram_loss(patches, anchor.cpu()).item()
        for model, training in modes:  # a monitored model that trains goes on training as it did
            model.train(training)
        return result

    def _retrieval_miou(self, patches: Tensor) -> float:
        grid = patches.reshape(len(patches), self.grid, self.grid, -1)
        n = self.n_fit
        return nearest_neighbour_segmentation(
            grid[:n], self.maps[:n], grid[n:], self.maps[n:], n_classes=N_SEG_CLASSES
        )["miou"]


def patch_diagnostics(patches: Tensor) -> dict[str, float]:
    """Effective rank of the ``[N, P, D]`` patch features, and the mean and spread of the patch-to-patch
    cosine similarities within each image (diagonal excluded)."""
    flat = F.normalize(patches.flatten(0, 1).double(), dim=-1)
    s = torch.linalg.eigvalsh(flat.t() @ flat).clamp_min(0).sqrt()  # singular values from the D x D Gram
    p = s / s.sum()
    rank = torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum()).item()
    off_diagonal = ~torch.eye(patches.shape[1], dtype=torch.bool)
    means, spreads = [], []
    for image in F.normalize(patches.double(), dim=-1):  # one [P, P] at a time: P can be thousands
        sims = (image @ image.t())[off_diagonal]
        means.append(sims.mean())
        spreads.append(sims.std())
    return {
        "monitor_patch_rank": rank,
        "monitor_patch_sim_mean": torch.stack(means).mean().item(),
        "monitor_patch_sim_std": torch.stack(spreads).mean().item(),
    }


class _LastAttention:
    """Catches the input of the last block's attention during one forward (a pre-hook) and computes its
    probabilities; for backbones whose attention exposes ``attention_probs`` (the DINOv3 and DINOv2 ViTs), else
    nothing."""

    def __init__(self, backbone: nn.Module) -> None:
        blocks = getattr(backbone, "blocks", None)
        attn = getattr(blocks[-1], "attn", None) if blocks else None
        self.attn = attn if hasattr(attn, "attention_probs") else None
        self.probs: Tensor | None = None
        self.handle = None

    def __enter__(self) -> _LastAttention:
        if self.attn is not None:
            self.handle = self.attn.register_forward_pre_hook(self._catch)
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.remove()

    def _catch(self, module: nn.Module, args: tuple) -> None:
        xs, ropes = args
        self.probs = module.attention_probs(xs[0], ropes[0], queries=1).float()  # [B, h, 1, N]: the CLS row

    def cls_entropy(self) -> float:
        """Entropy of the CLS token's attention row over the N tokens, divided by log N (mean over images
        and heads)."""
        row = self.probs[:, :, 0]  # [B, h, N]
        entropy = -(row * torch.log(row.clamp_min(1e-12))).sum(-1)
        return (entropy / math.log(row.shape[-1])).mean().item()
