"""OpenDINO: the DINOv3 recipe for self-supervised vision foundation models (Apache-2.0)."""

__version__ = "0.1.0"
