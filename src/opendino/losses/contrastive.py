"""Image-text contrastive losses over the global batch: CLIP's symmetric InfoNCE and SigLIP's sigmoid loss.

Facts implemented (docs/design/peers.md §4, docs/design/recipe.md §5): embeddings are L2-normalised and the
loss is computed in float32; each rank scores its own images against every rank's texts and its own texts
against every rank's images (the other ranks' embeddings gathered *with* gradients), so that the gradients
data parallelism averages equal those of one process holding the global batch. CLIP: the mean over the
rank's rows of the cross-entropy in both directions, halved; SigLIP: ``-sum log sigmoid(z * logit)`` over
the rank's images and all texts, divided by the rank's image count (z = +1 for the pair, -1 otherwise).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from opendino.losses.distributed import all_gather_with_grad, is_distributed
from opendino.losses.precision import float32

LOGIT_SCALE_MAX = math.log(100.0)  # the scale is clamped to [0, ln 100] after every step
CLIP_LOGIT_SCALE_INIT = math.log(1 / 0.07)
SIGLIP_LOGIT_SCALE_INIT, SIGLIP_LOGIT_BIAS_INIT = math.log(10.0), -10.0


def _rank() -> int:
    return dist.get_rank() if is_distributed() else 0


@float32
def clip_loss(image: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE of this rank's ``[b, E]`` normalised image and text embeddings against the global
    batch; ``logit_scale`` is the log of the temperature's inverse."""
    image, text = image.float(), text.float()
    all_image, all_text = all_gather_with_grad(image), all_gather_with_grad(text)
    scale = logit_scale.float().exp()
    labels = torch.arange(image.shape[0], device=image.device) + _rank() * image.shape[0]
    image_to_text = scale * image @ all_text.T
    text_to_image = scale * text @ all_image.T
    return (F.cross_entropy(image_to_text, labels) + F.cross_entropy(text_to_image, labels)) / 2


@float32
def siglip_loss(image: Tensor, text: Tensor, logit_scale: Tensor, logit_bias: Tensor) -> Tensor:
    """SigLIP's pairwise sigmoid loss of this rank's images against the texts of every rank."""
    image, text = image.float(), text.float()
    all_text = all_gather_with_grad(text)
    logits = logit_scale.float().exp() * image @ all_text.T + logit_bias.float()
    signs = -torch.ones_like(logits)
    rows = torch.arange(image.shape[0], device=image.device)
    signs[rows, rows + _rank() * image.shape[0]] = 1.0
    return -F.logsigmoid(signs * logits).sum() / image.shape[0]


@float32
def patch_alignment_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """``1 - cos`` between the student's (projected) patch tokens and a frozen teacher's, averaged: the dense
    term of the Perception-Encoder-style variant (docs/design/peers.md §5)."""
    return 1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1).mean()
