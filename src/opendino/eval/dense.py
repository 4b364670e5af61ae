"""Dense linear probes on frozen last-layer patch features (docs/design/recipe.md §6.4, §6.5).

Segmentation: ``Dropout2d(0.1) -> BatchNorm -> 1x1 conv`` to the classes, logits upsampled bilinearly to
the label size, cross-entropy ignoring 255, AdamW (official lr 1e-3, wd 1e-3), mIoU. Two changes for the
short schedule: lr 1e-2, and class weights ``1 / sqrt(pixel frequency)`` (normalised to mean 1): with
plain cross-entropy a few hundred steps leave the probe predicting the majority class (background, 85 %
of the synthetic pixels) everywhere, for trained and random features alike, and mIoU measures nothing.

Depth: ``BatchNorm -> 1x1 conv`` to 256 bins linearly spaced over the depth range, bin weights ``(ReLU(x) +
0.1) / sum``, depth = weighted sum of the bin centres, the scale-invariant SigLoss, AdamW (official lr 3e-4;
1e-2 here, which the short schedule needs), metrics RMSE, abs rel and delta < 1.25. Both train on cached
features for a few hundred steps with a cosine schedule instead of the official 40k-iteration schedules with
image augmentation: a cheap protocol that ranks models the same way, applied identically to every model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from opendino.probes import IGNORE, mean_iou


def _grid(features: Tensor) -> Tensor:
    """``[N, h, w, D]`` (any float dtype) -> ``[N, D, h, w]`` float32."""
    return features.float().permute(0, 3, 1, 2)


def _train(
    head: nn.Module,
    loss_fn,
    features: Tensor,
    targets: Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    head.train()
    for _ in range(steps):
        idx = torch.randint(len(features), (min(batch_size, len(features)),), generator=generator)
        loss = loss_fn(head(_grid(features[idx])), targets[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    head.eval()


@torch.no_grad()
def _predict(head: nn.Module, features: Tensor, size: int, batch_size: int = 64) -> Tensor:
    out = [
        F.interpolate(head(_grid(features[i : i + batch_size])), size=(size, size), mode="bilinear")
        for i in range(0, len(features), batch_size)
    ]
    return torch.cat(out)


def class_weights(maps: Tensor, n_classes: int) -> Tensor:
    """``1 / sqrt(pixel frequency)`` of each class (absent classes get the largest weight), mean 1."""
    counts = torch.bincount(maps[maps != IGNORE].long(), minlength=n_classes).double()
    weights = counts.clamp(min=counts[counts > 0].min()).rsqrt()
    return (weights / weights.mean()).float()


def linear_segmentation(
    train_features: Tensor,
    train_maps: Tensor,
    val_features: Tensor,
    val_maps: Tensor,
    *,
    n_classes: int,
    steps: int = 500,
    batch_size: int = 32,
    lr: float = 1e-2,
    seed: int = 0,
) -> dict[str, float]:
    """Features ``[N, h, w, D]``, maps ``[N, H, W]`` (uint8 classes, 255 ignored) -> mIoU on val."""
    torch.manual_seed(seed)
    dim, size = train_features.shape[-1], train_maps.shape[-1]
    head = nn.Sequential(nn.Dropout2d(0.1), nn.BatchNorm2d(dim), nn.Conv2d(dim, n_classes, 1))
    nn.init.normal_(head[2].weight, std=0.01)
    nn.init.zeros_(head[2].bias)
    weights = class_weights(train_maps, n_classes)

    def loss(logits: Tensor, maps: Tensor) -> Tensor:
        logits = F.interpolate(logits, size=(size, size), mode="bilinear")
        return F.cross_entropy(logits, maps.long(), weight=weights, ignore_index=IGNORE)

    _train(head, loss, train_features, train_maps, steps, batch_size, lr, 1e-3, seed)
    predicted = _predict(head, val_features, size).argmax(1)
    return mean_iou(predicted, val_maps, n_classes)


class BinnedDepthHead(nn.Module):
    def __init__(self, dim: int, min_depth: float, max_depth: float, n_bins: int = 256) -> None:
        super().__init__()
        self.norm, self.conv = nn.BatchNorm2d(dim), nn.Conv2d(dim, n_bins, 1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)
        self.register_buffer("bins", torch.linspace(min_depth, max_depth, n_bins))

    def forward(self, x: Tensor) -> Tensor:
        weights = F.relu(self.conv(self.norm(x))) + 0.1
        weights = weights / weights.sum(1, keepdim=True)
        return torch.einsum("bkhw,k->bhw", weights, self.bins)[:, None]


def sig_loss(predicted: Tensor, target: Tensor, variance_focus: float = 0.15) -> Tensor:
    valid = target > 0
    g = torch.log(predicted[valid] + 1e-3) - torch.log(target[valid] + 1e-3)
    return torch.sqrt(g.var() + variance_focus * g.mean() ** 2)


def depth_metrics(predicted: Tensor, target: Tensor) -> dict[str, float]:
    valid = target > 0
    p, t = predicted[valid].double(), target[valid].double()
    ratio = torch.maximum(p / t, t / p)
    return {
        "rmse": torch.sqrt(((p - t) ** 2).mean()).item(),
        "abs_rel": ((p - t).abs() / t).mean().item(),
        "delta1": (ratio < 1.25).double().mean().item(),
    }


def linear_depth(
    train_features: Tensor,
    train_depth: Tensor,
    val_features: Tensor,
    val_depth: Tensor,
    *,
    max_depth: float = 10.0,
    steps: int = 500,
    batch_size: int = 32,
    lr: float = 1e-2,
    seed: int = 0,
) -> dict[str, float]:
    """Features ``[N, h, w, D]``, depth ``[N, H, W]`` in metres (0 = none) -> depth metrics on val."""
    torch.manual_seed(seed)
    size = train_depth.shape[-1]
    head = BinnedDepthHead(train_features.shape[-1], 1e-3, max_depth)

    def loss(predicted: Tensor, depth: Tensor) -> Tensor:
        return sig_loss(F.interpolate(predicted, size=(size, size), mode="bilinear")[:, 0], depth)

    _train(head, loss, train_features, train_depth, steps, batch_size, lr, 1e-4, seed)
    return depth_metrics(_predict(head, val_features, size)[:, 0], val_depth)
