"""Training recipes behind one contract (recipes/base.py): the DINOv3 SSL recipe with its stages and
distillation (ssl.py, distill.py; DINOv2 and Franca-style nested heads are its options), Gram anchoring as
a component (gram.py); I-JEPA (ijepa.py); text alignment (text.py: dino.txt, CLIP, SigLIP)."""

from __future__ import annotations

import importlib

from opendino.config import ConfigError

# Names `train.recipe` may take, and the classes they stand for (module:Class).
RECIPES = {
    "ssl": "opendino.recipes.ssl:SSLRecipe",
    "ijepa": "opendino.recipes.ijepa:IJEPARecipe",
    "text": "opendino.recipes.text:TextRecipe",
}


def recipe_class(name: str) -> type:
    """The recipe class of ``train.recipe``: a name of RECIPES, or an importable ``module:Class``."""
    from opendino.recipes.base import Recipe

    target = RECIPES.get(name, name)
    module, sep, attr = target.partition(":")
    if not sep:
        raise ConfigError(f"train.recipe={name!r}; valid: {', '.join(RECIPES)} or module:Class")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"train.recipe={name!r}: cannot import {target} ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, Recipe)):
        raise ConfigError(f"train.recipe={name!r}: {target} is not a Recipe (opendino.recipes.base)")
    return cls
