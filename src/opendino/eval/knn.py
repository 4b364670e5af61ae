"""k-NN classification on frozen features (recipe.md §6.1): cosine similarity of L2-normalised CLS
features, the top-k neighbours vote with weights ``softmax(similarity / T)``, ``T = 0.07``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    chunk: int = 1024,
) -> dict[int, float]:
    """Top-1 accuracy for each ``k`` (capped at the number of training samples)."""
    train = F.normalize(train_features.float(), dim=-1)
    test = F.normalize(test_features.float(), dim=-1)
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k_max = min(max(ks), train.shape[0])
    correct = {k: 0 for k in ks}
    for start in range(0, test.shape[0], chunk):
        sims, idx = (test[start : start + chunk] @ train.t()).topk(k_max, dim=1)
        weights = torch.softmax(sims / temperature, dim=1)
        votes = F.one_hot(train_labels[idx], n_classes).float() * weights[..., None]  # [n, k, C]
        truth = test_labels[start : start + chunk]
        for k in ks:
            predicted = votes[:, : min(k, k_max)].sum(1).argmax(1)
            correct[k] += int((predicted == truth).sum())
    return {k: correct[k] / test.shape[0] for k in ks}
