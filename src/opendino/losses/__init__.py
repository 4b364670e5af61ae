"""The losses of the DINOv3 recipe: DINO (CLS), iBOT (patches), KoLeo, Gram, with Sinkhorn-Knopp centring; and
the image-text losses of text alignment (CLIP, SigLIP)."""

from opendino.losses.contrastive import clip_loss, patch_alignment_loss, siglip_loss
from opendino.losses.dino import dino_loss
from opendino.losses.gram import gram_loss
from opendino.losses.ibot import ibot_loss_dense, ibot_loss_masked
from opendino.losses.koleo import koleo_loss, koleo_loss_distributed
from opendino.losses.sinkhorn import SoftmaxCenter, sinkhorn_knopp
from opendino.losses.total import LossWeights, total_loss

__all__ = [
    "LossWeights",
    "SoftmaxCenter",
    "clip_loss",
    "dino_loss",
    "gram_loss",
    "ibot_loss_dense",
    "ibot_loss_masked",
    "koleo_loss",
    "koleo_loss_distributed",
    "patch_alignment_loss",
    "siglip_loss",
    "sinkhorn_knopp",
    "total_loss",
]
