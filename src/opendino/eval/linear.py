"""Linear probe on frozen features (docs/design/recipe.md §6.2): ``cat(CLS, mean patch token)`` -> ``Linear``, the
official grid of 13 learning rates trained at once (SGD, momentum 0.9, no weight decay, cosine to 0,
lr scaled by batch / 256), the best classifier chosen on the validation set.

Deliberate difference: the probe trains on cached features of the un-augmented images (the official one
re-extracts features of random-resized crops every epoch); it is orders of magnitude cheaper, and the
same protocol is applied to every model compared.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

OFFICIAL_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor,
    val_y: Tensor,
    *,
    epochs: int = 100,
    batch_size: int = 128,
    lrs: Sequence[float] = OFFICIAL_LRS,
    seed: int = 0,
) -> dict[str, float]:
    """``{"top1": best validation accuracy, "lr": its learning rate}``."""
    generator = torch.Generator().manual_seed(seed)
    n_classes = int(max(train_y.max(), val_y.max())) + 1
    heads = nn.ModuleList(nn.Linear(train_x.shape[1], n_classes) for _ in lrs)
    for head in heads:
        nn.init.normal_(head.weight, std=0.01, generator=generator)
        nn.init.zeros_(head.bias)
    scale = batch_size / 256
    optimizer = torch.optim.SGD(
        [{"params": h.parameters(), "lr": lr * scale} for h, lr in zip(heads, lrs, strict=True)], momentum=0.9
    )
    steps = epochs * -(-len(train_x) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    train_x, val_x = train_x.float(), val_x.float()
    for _ in range(steps):
        idx = torch.randint(len(train_x), (min(batch_size, len(train_x)),), generator=generator)
        loss = sum(nn.functional.cross_entropy(h(train_x[idx]), train_y[idx]) for h in heads)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        accuracy = [(h(val_x).argmax(1) == val_y).float().mean().item() for h in heads]
    best = max(range(len(lrs)), key=accuracy.__getitem__)
    return {"top1": accuracy[best], "lr": lrs[best]}


def logistic_regression(
    train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, *, c_grid: Sequence[float] | None = None
) -> dict[str, float]:
    """scikit-learn L2 logistic regression (lbfgs) on the CLS features (docs/design/recipe.md §6.3): ``C`` chosen on a
    10 % hold-out of train, then refitted on all of train and scored on val. Deliberate differences, for
    speed on small machines: features standardised with the train statistics (lbfgs converges in far
    fewer iterations), at most 300 iterations and tolerance 1e-6 instead of 1000 and 1e-12, and every
    fourth value (12) of the official grid ``10^linspace(-6, 5, 45)``."""
    import numpy as np
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    grid = list(c_grid) if c_grid is not None else list(10.0 ** np.linspace(-6, 5, 45)[::4])
    mean, std = train_x.double().mean(0), train_x.double().std(0).clamp(min=1e-6)
    train_x, val_x = (train_x.double() - mean) / std, (val_x.double() - mean) / std
    x, y = train_x.numpy(), train_y.numpy()
    order = np.random.default_rng(0).permutation(len(x))
    hold, fit = order[: max(len(x) // 10, 1)], order[max(len(x) // 10, 1) :]

    def model(c: float) -> LogisticRegression:
        return LogisticRegression(C=c, max_iter=300, tol=1e-6)

    with warnings.catch_warnings():  # weakly regularised fits on separable data never fully converge
        warnings.simplefilter("ignore", ConvergenceWarning)
        scores = [model(c).fit(x[fit], y[fit]).score(x[hold], y[hold]) for c in grid]
        best = grid[int(np.argmax(scores))]
        final = model(best).fit(x, y)
    return {"top1": float(final.score(val_x.double().numpy(), val_y.numpy())), "C": float(best)}
