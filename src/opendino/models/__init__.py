"""DINOv3 backbones (ViT, ConvNeXt), the DINOv2 ViT, heads, the model registry, checkpoints and layout conversion."""

from opendino.models.checkpoint import CheckpointError, load_model, read_checkpoint, save_model
from opendino.models.convnext import ConvNeXt
from opendino.models.dinov2 import DinoV2VisionTransformer
from opendino.models.heads import DINOHead
from opendino.models.registry import MODELS, ModelSpec, build_model, get_spec
from opendino.models.vit import DinoVisionTransformer

__all__ = [
    "MODELS",
    "CheckpointError",
    "ConvNeXt",
    "DINOHead",
    "DinoV2VisionTransformer",
    "DinoVisionTransformer",
    "ModelSpec",
    "build_model",
    "get_spec",
    "load_model",
    "read_checkpoint",
    "save_model",
]
