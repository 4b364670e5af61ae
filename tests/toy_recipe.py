"""A toy recipe on the recipe contract: supervised classification of the two global crops by a ViT with a
linear head, and an EMA of the backbone as the exported model. It is the proof that the contract is
enough for a recipe the trainer has never heard of (docs/design/recipes.md): trained with
``train.recipe=tests.toy_recipe:ToyRecipe``, it resumes, runs on several ranks and exports like the SSL
recipe, with no change to the loop."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from opendino.data.synthetic import CLASSES
from opendino.models import build_model
from opendino.recipes.base import ParallelPlan, Recipe, ema_update_

EMA_MOMENTUM = 0.9


class Classifier(nn.Module):
    """One ``forward`` for every use in a step: data parallelism hooks the module's ``__call__``."""

    def __init__(self, backbone: nn.Module, n_classes: int) -> None:
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(backbone.embed_dim, n_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images, is_training=True)["x_norm_clstoken"])


class ToyRecipe(Recipe):
    def __init__(self, cfg) -> None:
        super().__init__()
        backbone = build_model(cfg.model.arch, **{"drop_path_rate": 0.0, **cfg.model.kwargs})
        self.student = Classifier(backbone, len(CLASSES))
        self.ema = copy.deepcopy(backbone).requires_grad_(False).eval()

    def parallel_plan(self) -> ParallelPlan:
        return ParallelPlan(trained=self.student, sharded=[self.ema], compiled=[self.student])

    def param_groups(self) -> list[dict]:
        names, params = zip(*self.student.named_parameters(), strict=True)
        common = {"lr_multiplier": 1.0, "wd_multiplier": 1.0, "is_last_layer": False, "frozen_until": 0}
        return [{"params": list(params), "names": list(names), **common}]

    def train(self, mode: bool = True) -> ToyRecipe:
        super().train(mode)
        self.ema.eval()
        return self

    def forward(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        labels = batch["labels"].repeat(2)  # the global crops are crop-major: all first crops, then all second
        logits = self.student(batch["global"])
        loss = F.cross_entropy(logits, labels)
        return loss, {"cross_entropy": loss, "accuracy": (logits.argmax(-1) == labels).float().mean()}

    def clip_gradients(self, max_norm: float) -> dict[str, Tensor]:
        norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), max_norm or float("inf"), foreach=True)
        return {"student": norm.to_local() if hasattr(norm, "to_local") else norm}

    def after_update(self, step: int, finite: Tensor) -> None:
        ema_update_(list(self.ema.parameters()), list(self.student.backbone.parameters()), 1.0 - EMA_MOMENTUM, finite)

    def export_module(self) -> nn.Module:
        return self.ema
