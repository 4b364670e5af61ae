"""Training-free probes of frozen features, shared by the evaluation suite (eval/) and the dense-quality
monitor inside training: k-NN classification of global features (docs/design/recipe.md §6.1: cosine
similarity, the top-k neighbours vote with weights ``softmax(similarity / T)``, ``T = 0.07``) and
nearest-neighbour segmentation of patch features, with mIoU."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = 255  # the label of pixels that belong to no class


@torch.no_grad()
def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    chunk: int = 1024,
    n_classes: int | None = None,
) -> dict[int, Tensor]:
    """The weighted k-NN vote (cosine similarity, softmax weights at ``temperature``) of each test sample,
    for each ``k`` (capped at the number of training samples)."""
    train = F.normalize(train_features.float(), dim=-1)
    test = F.normalize(test_features.float(), dim=-1)
    n_classes = n_classes or int(train_labels.max()) + 1
    k_max = min(max(ks), train.shape[0])
    predicted = {k: [] for k in ks}
    for start in range(0, test.shape[0], chunk):
        sims, idx = (test[start : start + chunk] @ train.t()).topk(k_max, dim=1)
        weights = torch.softmax(sims / temperature, dim=1)
        votes = F.one_hot(train_labels[idx], n_classes).float() * weights[..., None]  # [n, k, C]
        for k in ks:
            predicted[k].append(votes[:, : min(k, k_max)].sum(1).argmax(1))
    return {k: torch.cat(v) for k, v in predicted.items()}


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
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    predicted = knn_predict(train_features, train_labels, test_features, ks, temperature, chunk, n_classes)
    return {k: float((p == test_labels).float().mean()) for k, p in predicted.items()}


def mean_iou(predicted: Tensor, target: Tensor, n_classes: int) -> dict[str, float]:
    """mIoU over the classes present in prediction or target (pixels labelled 255 are ignored)."""
    valid = target != IGNORE
    p, t = predicted[valid].long(), target[valid].long()
    confusion = torch.bincount(t * n_classes + p, minlength=n_classes**2).view(n_classes, n_classes).double()
    intersection = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    present = union > 0
    return {
        "miou": (intersection[present] / union[present]).mean().item(),
        "pixel_accuracy": (intersection.sum() / confusion.sum()).item(),
    }


def patch_majority(maps: Tensor, grid: int, n_classes: int) -> Tensor:
    """``[N, H, W]`` class maps -> ``[N, grid, grid]``: the most frequent labelled class of each patch
    (pixels labelled 255 do not vote; a patch with none is 255)."""
    valid = maps != IGNORE
    onehot = F.one_hot(torch.where(valid, maps, 0).long(), n_classes).permute(0, 3, 1, 2).float()
    votes = F.adaptive_avg_pool2d(onehot * valid[:, None], grid)
    labels = votes.argmax(1)
    return torch.where(votes.sum(1) > 0, labels, IGNORE)


def nearest_neighbour_segmentation(
    fit_features: Tensor, fit_maps: Tensor, val_features: Tensor, val_maps: Tensor, *, n_classes: int, chunk: int = 1024
) -> dict[str, float]:
    """Training-free dense probe (in-context label transfer, Balažević et al. 2023): every validation patch
    takes the majority class of its most cosine-similar training patch; mIoU over patches. Unlike the linear
    probe it does not need classes to be linearly separable, so it shows dense learning earlier."""
    grid = fit_features.shape[1]
    fit = F.normalize(fit_features.float().flatten(0, 2), dim=-1)
    fit_labels = patch_majority(fit_maps, grid, n_classes).flatten()
    keep = fit_labels != IGNORE
    fit, fit_labels = fit[keep], fit_labels[keep]
    queries = F.normalize(val_features.float().flatten(0, 2), dim=-1)
    predicted = torch.cat([fit_labels[(q @ fit.t()).argmax(1)] for q in queries.split(chunk)])
    return mean_iou(predicted, patch_majority(val_maps, grid, n_classes).flatten(), n_classes)
