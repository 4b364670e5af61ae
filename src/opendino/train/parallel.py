"""Where a recipe's modules are wrapped for speed and scale: ``torch.compile`` per block (and per head).

One place, applied once, in the order that PyTorch's composable APIs expect (activation checkpointing,
then compile, then data parallelism); the distributed wrappers join here with the scale-out work.
"""

from __future__ import annotations

from torch import nn


def compile_recipe(recipe: nn.Module, heads: bool = True) -> None:
    """Compiles every transformer block of the student and teacher backbones (one graph serves all blocks
    of a depth, so compilation time does not grow with depth) and, with ``heads``, the projection heads.
    Heads see a varying number of rows (the masked tokens), so they are compiled with dynamic shapes."""
    for model in (recipe.student, recipe.teacher):
        for block in getattr(model.backbone, "blocks", []):
            block.compile()
        if heads:
            for name in ("dino_head", "ibot_head"):
                model[name].compile(dynamic=True)
