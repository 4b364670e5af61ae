"""Dense correspondence: nearest-neighbour matching of patch features between two views of a scene.

For every patch of the first view whose centre is visible in the second, the most cosine-similar patch
of the second view is its match; the error is the pixel distance between the match's centre and the
true position (from the ground-truth flow). Reported: the share of matches within one and two patch
strides (``recall_1patch``, ``recall_2patch``) and the mean error in pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def match_errors(first: Tensor, second: Tensor, flow: Tensor, stride: int) -> Tensor:
    """``first``, ``second``: ``[h, w, D]`` patch features; ``flow``: ``[H, W, 2]`` positions in the second
    view (NaN outside) at the feature resolution ``H = h * stride``. Errors in pixels of visible patches."""
    h, w, _ = first.shape
    # The true position of a patch centre: the mean flow over the patch, exact for the affine warps of the
    # synthetic pairs; a patch with any pixel outside the second view counts as not visible.
    truth = flow[: h * stride, : w * stride].reshape(h, stride, w, stride, 2).mean(dim=(1, 3))
    visible = ~truth.isnan().any(-1)
    a = F.normalize(first.float().reshape(h * w, -1), dim=-1)
    b = F.normalize(second.float().reshape(-1, second.shape[-1]), dim=-1)
    nearest = (a @ b.t()).argmax(1)  # index into the second view's grid
    w2 = second.shape[1]
    predicted = torch.stack([(nearest % w2 + 0.5) * stride - 0.5, (nearest // w2 + 0.5) * stride - 0.5], -1)
    errors = (predicted - truth.reshape(-1, 2)).norm(dim=-1)
    return errors[visible.reshape(-1)]


def correspondence_metrics(errors: Tensor, stride: int) -> dict[str, float]:
    return {
        "recall_1patch": (errors <= stride).float().mean().item(),
        "recall_2patch": (errors <= 2 * stride).float().mean().item(),
        "mean_error_px": errors.mean().item(),
    }
