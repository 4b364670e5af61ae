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
from opendino.losses import gram_loss
from opendino.models.vit import global_feature
from opendino.probes import knn_accuracy, nearest_neighbour_segmentation

N_SEG_CLASSES = len(CLASSES) + 1  # background + shapes


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
        }
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
