"""A dense-quality monitor inside training (the measurement that showed the paper its dense degradation).

Every ``monitor.every`` steps the EMA teacher is evaluated on a fixed held-out set of synthetic scenes:
a training-free segmentation probe of its patch features (each patch of ``n_eval`` scenes takes the
majority class of its nearest patch among ``n_fit`` other scenes, by cosine similarity; mIoU), as in the
in-context dense evaluations of Balažević et al. (2023), the mean cosine similarity between the
CLS token and the patch tokens (it rises when patch features collapse towards the global one), a k-NN
accuracy of the CLS token (k = 10, the same scenes) as the global counterpart, and, with Gram anchoring,
the Gram loss between the teacher's and the Gram teacher's patch features.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from opendino.data.augment import normalize
from opendino.data.synthetic import CLASSES, render_scene
from opendino.eval.dense import mean_iou
from opendino.eval.knn import knn_accuracy
from opendino.losses import gram_loss

N_SEG_CLASSES = len(CLASSES) + 1  # background + shapes


class DenseMonitor:
    def __init__(self, size: int, patch_size: int, mean, std, n_fit: int = 64, n_eval: int = 32) -> None:
        scenes = [render_scene(10_000_000 + i, size, "val") for i in range(n_fit + n_eval)]  # unused by evals
        images = torch.stack([torch.from_numpy(np.array(s.image)).permute(2, 0, 1) for s in scenes])
        self.images = normalize(images, mean, std)
        grid = size // patch_size
        maps = torch.from_numpy(np.stack([s.semantic for s in scenes])).long()
        # The majority class of each patch: one-hot maps averaged over the patch, then argmax.
        votes = F.adaptive_avg_pool2d(F.one_hot(maps, N_SEG_CLASSES).permute(0, 3, 1, 2).float(), grid)
        self.patch_labels = votes.argmax(1)  # [N, grid, grid]
        self.labels = torch.tensor([s.label for s in scenes])
        self.n_fit = n_fit

    @torch.no_grad()
    def __call__(self, backbone: nn.Module, gram_teacher: nn.Module | None = None) -> dict[str, float]:
        device = next(backbone.parameters()).device
        out = backbone.eval().forward_features(self.images.to(device))
        patches = out["x_norm_patchtokens"].float().cpu()  # [N, P, D]
        cls = out["x_norm_clstoken"].float().cpu()
        result = {
            "monitor_seg_miou": self._retrieval_miou(patches),
            "monitor_cls_patch_cos": F.cosine_similarity(cls[:, None], patches, dim=-1).mean().item(),
            "monitor_knn": knn_accuracy(
                cls[: self.n_fit], self.labels[: self.n_fit], cls[self.n_fit :], self.labels[self.n_fit :], ks=(10,)
            )[10],
        }
        if gram_teacher is not None:
            anchor = gram_teacher.eval().forward_features(self.images.to(device))["x_norm_patchtokens"].float()
            result["monitor_gram_distance"] = gram_loss(patches, anchor.cpu()).item()
        return result

    def _retrieval_miou(self, patches: Tensor) -> float:
        """Each held-out patch takes the label of its most similar fitting patch (cosine)."""
        fit = F.normalize(patches[: self.n_fit].flatten(0, 1), dim=-1)
        held_out = F.normalize(patches[self.n_fit :].flatten(0, 1), dim=-1)
        nearest = (held_out @ fit.t()).argmax(1)
        predicted = self.patch_labels[: self.n_fit].flatten()[nearest]
        return mean_iou(predicted, self.patch_labels[self.n_fit :].flatten(), N_SEG_CLASSES)["miou"]
