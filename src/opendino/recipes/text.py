"""Text alignment as a recipe of the contract (recipes/base.py): dino.txt / LiT, CLIP, SigLIP and a
Perception-Encoder-style variant, one recipe with three modes (``text.mode``, docs/text.md):

- ``locked``: a frozen image backbone (``init.backbone``: a run, a checkpoint or a named model) with a
  trained vision head and text tower (dino.txt, docs/design/recipe.md §5). Its tokens can be computed once
  and cached on disk (``text.cache_features``), so epochs never rerun the backbone;
- ``unlocked``: the image backbone is trained too, from scratch (``model.arch``: CLIP, or SigLIP with
  ``text.loss=siglip``) or from ``init.backbone``;
- ``unlocked`` with ``text.dense_weight > 0``: plus a dense term that keeps the backbone's patch tokens
  (projected) close to a frozen image teacher's (``text.dense_teacher``, default ``init.backbone``).

The contrastive losses run over the global batch (losses/contrastive.py); the logit scale is clamped to
[0, ln 100] after every step; no weight decay on 1-D parameters and the logit scale and bias.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from opendino.config import ConfigError, check_choice, check_minima
from opendino.losses import clip_loss, patch_alignment_loss, siglip_loss
from opendino.losses.contrastive import (
    CLIP_LOGIT_SCALE_INIT,
    LOGIT_SCALE_MAX,
    SIGLIP_LOGIT_BIAS_INIT,
    SIGLIP_LOGIT_SCALE_INIT,
)
from opendino.models.text import TEXT_EXPORT, TEXT_TOWERS, TextAlignedModel, VisionHead, build_text_tower
from opendino.recipes.base import DataNeeds, ParallelPlan, Recipe
from opendino.recipes.param_groups import ParamSetting, param_groups

FEATURE_CACHE = "feature_cache"  # in the run folder


@dataclasses.dataclass
class TextConfig:
    """The text recipe's section (``train.recipe=text``)."""

    mode: str = "locked"  # locked (frozen image backbone, dino.txt / LiT) | unlocked (trained: CLIP, SigLIP)
    loss: str = "clip"  # clip (symmetric InfoNCE) | siglip (pairwise sigmoid with a learned bias)
    tower: str = "text_small"  # the text tower: text_tiny | text_small | text_base | text_dinotxt
    context_length: int = 77  # tokens per caption (the end-of-text token is kept under truncation)
    embed_dim: int | None = None  # the shared embedding size; default: twice the backbone width (dino.txt)
    head_blocks: int = 2  # self-attention blocks of the vision head (0: a plain projection, CLIP-style)
    head_drop_path: float = 0.3  # stochastic depth in the vision head
    # locked: the backbone's tokens computed once (resized square, no augmentation) and cached in float16
    # in <run>/feature_cache; false: the backbone runs every step on augmented crops
    cache_features: bool = True
    cache_chunk: int = 256  # images per cache file (a killed build loses at most one chunk per rank)
    # Sub-caption sampling (not in dino.txt): the share of captions replaced by one of their clauses (split at
    # commas and joining words), so that no part of a long caption can be ignored (docs/text.md)
    caption_clauses: float = 0.0
    logit_scale_init: float | None = None  # default: ln(1/0.07) for clip, ln 10 for siglip
    logit_bias_init: float = SIGLIP_LOGIT_BIAS_INIT  # siglip only
    dense_weight: float = 0.0  # unlocked: weight of the dense alignment to a frozen image teacher (PE-style)
    dense_teacher: str | None = None  # its source (a run, checkpoint or named model); default: init.backbone
    # Zero-shot and retrieval during training, every monitor.every steps, on monitor.n_eval held-out
    # scenes of the synthetic world ("synthetic") or the val split of a labelled folder with captions
    eval_data: str | None = "synthetic"

    def check(self) -> None:
        check_choice("text.mode", self.mode, ("locked", "unlocked"))
        check_choice("text.loss", self.loss, ("clip", "siglip"))
        check_choice("text.tower", self.tower, tuple(TEXT_TOWERS))
        check_minima(
            "text",
            self,
            {
                "context_length": 2,
                "head_blocks": 0,
                "head_drop_path": 0,
                "cache_chunk": 1,
                "dense_weight": 0,
                "caption_clauses": 0,
            },
        )
        if self.caption_clauses > 1:
            raise ConfigError(f"text.caption_clauses={self.caption_clauses} is a probability (0 to 1)")
        if self.dense_weight > 0 and self.mode == "locked":
            raise ConfigError("text.dense_weight > 0 aligns a trained backbone's patches: it needs text.mode=unlocked")


class TextRecipe(Recipe):
    """Image-text contrastive training (``train.recipe=text``), configured by the run's ``text`` section,
    ``model`` (the image tower of an unlocked run from scratch) and ``init.backbone``."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        from opendino.runs import load_backbone

        self.cfg, t = cfg, cfg.text
        locked = t.mode == "locked"
        if locked:
            backbone = load_backbone(cfg.init.backbone, "init.backbone")
            backbone.requires_grad_(False)
        else:
            backbone = cfg.model.build()
        head = VisionHead(
            backbone.embed_dim,
            num_heads=backbone.num_heads,
            embed_dim=t.embed_dim,
            blocks=t.head_blocks,
            drop_path_rate=t.head_drop_path,
        )
        text = build_text_tower(t.tower, embed_dim=head.embed_dim, context_length=t.context_length)
        siglip = t.loss == "siglip"
        scale = (
            t.logit_scale_init
            if t.logit_scale_init is not None
            else (SIGLIP_LOGIT_SCALE_INIT if siglip else CLIP_LOGIT_SCALE_INIT)
        )
        self.model = TextAlignedModel(
            backbone, head, text, logit_scale=scale, logit_bias=t.logit_bias_init if siglip else None, locked=locked
        )
        if locked:
            self.model.backbone.eval()
        self.dense_teacher = None
        if t.dense_weight > 0:
            self.dense_teacher = load_backbone(t.dense_teacher or cfg.init.backbone, "text.dense_teacher")
            self.dense_teacher.requires_grad_(False).eval()
            # the trained backbone's patches are compared with the teacher's through a learned projection
            self.model.dense_projection = nn.Linear(backbone.embed_dim, self.dense_teacher.embed_dim, bias=False)
        self.cache = None
        self._eval_set = None

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        t = cfg.text
        if cfg.model.in_chans != 3:
            raise ConfigError(
                f"model.in_chans={cfg.model.in_chans}: the text recipe aligns RGB image backbones (its held-out "
                "captions, feature cache and frozen teachers are RGB); set model.in_chans=3"
            )
        if t.mode == "locked" and not cfg.init.backbone:
            raise ConfigError(
                "text.mode=locked aligns a text tower to a frozen image backbone: set init.backbone "
                "(a run folder, a checkpoint or a named model)"
            )
        if t.dense_weight > 0 and not (t.dense_teacher or cfg.init.backbone):
            raise ConfigError("text.dense_weight > 0 needs a frozen teacher: set text.dense_teacher or init.backbone")
        if cfg.init.from_run:
            raise ConfigError("init.from_run is a stage of the SSL recipe; the text recipe starts from init.backbone")
        if cfg.distill.students:
            raise ConfigError("distill.students: the text recipe trains one model per run")
        if t.embed_dim is not None and t.embed_dim % 2:
            raise ConfigError(f"text.embed_dim={t.embed_dim} must be even (an image half and a patch half)")
        if cfg.parallel.data_parallel == "fsdp" and (
            cfg.monitor.every and t.eval_data or t.mode == "locked" and t.cache_features
        ):
            raise ConfigError(
                "with parallel.data_parallel=fsdp the text recipe neither caches features nor evaluates during "
                "training (both call the sharded model outside its forward): set text.cache_features=false and "
                "text.eval_data=null, or use ddp"
            )
        if t.eval_data not in (None, "synthetic") and not (Path(t.eval_data) / "val").is_dir():
            raise ConfigError(f"text.eval_data={t.eval_data}: not a labelled folder with a val/ split (or synthetic)")

    @property
    def cached(self) -> bool:
        return self.cfg.text.mode == "locked" and self.cfg.text.cache_features

    # -- data -------------------------------------------------------------------------------------------
    def data_needs(self, shared: nn.Module | None = None) -> DataNeeds:
        skip = frozenset()
        if self.cached:
            skip = self._open_cache().unreadable
        images = not self.cached or self.dense_teacher is not None
        t = self.cfg.text
        return DataNeeds(
            captions=True, images=images, context_length=t.context_length, skip=skip, caption_clauses=t.caption_clauses
        )

    def _open_cache(self):
        """Builds the missing chunks of the feature cache (each rank its share), then memory-maps it."""
        from opendino.data.captions import as_captioned
        from opendino.data.feature_cache import FeatureCache
        from opendino.data.pipeline import open_training_source
        from opendino.eval.features import model_fingerprint
        from opendino.losses.distributed import barrier, rank_and_world

        if self.cache is not None:
            return self.cache
        cfg = self.cfg
        source = as_captioned(open_training_source(cfg.data))
        folder = Path(cfg.run.dir) / FEATURE_CACHE
        size = cfg.crops.global_size
        cache = FeatureCache(folder, source, size, cfg.crops.mean, cfg.crops.std, cfg.text.cache_chunk)
        rank, world = rank_and_world()
        device = self.model.logit_scale.device
        backbone = self.model.backbone
        cache.build(backbone, model_fingerprint(backbone), device, rank, world, progress=rank == 0 and cfg.log.progress)
        barrier()
        self.cache = cache.open()
        return self.cache

    # -- the contract -----------------------------------------------------------------------------------
    def start_fresh(self, say: Callable[[str], None]) -> tuple[int, dict | None]:
        from opendino.runs import load_backbone

        cfg = self.cfg
        if cfg.text.mode == "unlocked" and cfg.init.backbone:
            state = load_backbone(cfg.init.backbone).state_dict()
            self.model.backbone.load_state_dict(state)
            say(f"image backbone initialised from {cfg.init.backbone} (trained: text.mode=unlocked)")
        elif cfg.text.mode == "locked":
            say(f"image backbone {cfg.init.backbone}, frozen; vision head and text tower fresh")
        return 0, None

    def parallel_plan(self) -> ParallelPlan:
        model = self.model
        return ParallelPlan(
            trained=model,
            sharded=[self.dense_teacher] if self.dense_teacher is not None else [],
            compiled=[model, model.head, model.text],
        )

    def param_groups(self) -> list[dict]:
        """One lr for all (no layer decay in CLIP-style training); no weight decay on 1-D parameters, the
        logit scale and bias (docs/design/recipe.md §5)."""
        settings = []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                decay = param.ndim >= 2 and "logit" not in name
                settings.append(ParamSetting(name, param, 1.0, 1.0 if decay else 0.0, False))
        init = self.cfg.init
        return param_groups(
            settings,
            frozen_until={"backbone": init.head_warmup_steps},
            ramp_steps={"backbone": init.backbone_ramp_steps},
        )

    def train(self, mode: bool = True) -> TextRecipe:
        super().train(mode)
        if self.model.locked:
            self.model.backbone.eval()
        if self.dense_teacher is not None:
            self.dense_teacher.eval()
        return self

    def before_step(self, step: int) -> dict[str, float]:
        return {}

    def forward(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        tokens = batch["tokens"]
        image_tokens = None
        if self.cache is not None:
            # the pipeline keeps the indices on the host: a lookup reads no device value
            image_tokens = self.cache.lookup(batch["indices"]).to(tokens.device, non_blocking=True)
        image, _, text, backbone_tokens = self.model(tokens, images=batch.get("image"), image_tokens=image_tokens)
        model = self.model
        if model.logit_bias is not None:
            contrastive = siglip_loss(image, text, model.logit_scale, model.logit_bias)
        else:
            contrastive = clip_loss(image, text, model.logit_scale)
        terms = {"contrastive": contrastive, "temperature": model.logit_scale.detach().float().exp().reciprocal()[0]}
        loss = contrastive
        if self.dense_teacher is not None:
            with torch.no_grad():
                target = self.dense_teacher.forward_features(batch["image"])["x_norm_patchtokens"]
            patches = backbone_tokens[:, model.n_prefix :]
            if patches.shape[1] != target.shape[1]:
                raise ValueError(
                    f"text.dense_teacher gives {target.shape[1]} patch tokens per image, the trained backbone "
                    f"{patches.shape[1]}: they need the same patch size"
                )
            terms["dense"] = patch_alignment_loss(model.dense_projection(patches), target)
            loss = loss + self.cfg.text.dense_weight * terms["dense"]
        return loss, terms

    def clip_gradients(self, max_norm: float) -> dict[str, Tensor]:
        norms = {}
        units = [*self.model.named_children(), ("logit", self.model.parameters(recurse=False))]
        for name, module in units:
            params = [p for p in (module.parameters() if isinstance(module, nn.Module) else module) if p.requires_grad]
            if params:
                norm = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"), foreach=True)
                norms[name] = norm.to_local() if hasattr(norm, "to_local") else norm
        return norms

    @torch.no_grad()
    def after_update(self, step: int, finite: Tensor) -> None:
        self.model.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)  # on the device: no host read

    def export_module(self) -> nn.Module:
        return self.model.backbone

    def extra_exports(self) -> dict[str, tuple[nn.Module, Callable]]:
        from opendino.models.text import save_text_model

        return {TEXT_EXPORT: (self.model, save_text_model)}

    def evaluate(self, step: int) -> dict[str, float]:
        """Zero-shot and retrieval on held-out images (``text.eval_data``), every ``monitor.every`` steps."""
        from opendino.eval.text import text_metrics

        if self.cfg.text.eval_data is None:
            return {}
        images, labels, captions, classnames, templates = self._held_out()
        return text_metrics(self.model, images, labels, captions, classnames, templates)

    def _held_out(self) -> tuple:
        if self._eval_set is None:
            cfg = self.cfg
            device = self.model.logit_scale.device
            self._eval_set = held_out_set(
                cfg.text.eval_data, cfg.monitor.n_eval, cfg.crops.global_size, cfg.crops.mean, cfg.crops.std, device
            )
        return self._eval_set


HELD_OUT_OFFSET = 20_000_000  # synthetic val scenes past those the evaluations and the dense monitor use


def held_out_set(data: str, n: int, size: int, mean, std, device: torch.device) -> tuple:
    """``(images, labels, captions, classnames, templates)`` of ``n`` held-out captioned images: synthetic
    val scenes, or the captioned images of a labelled folder's val split."""
    import numpy as np

    from opendino.data.augment import normalize
    from opendino.eval.text import TEMPLATES

    if data == "synthetic":
        from opendino.data.synthetic import CLASSES, render_scene

        scenes = [render_scene(HELD_OUT_OFFSET + i, size, "val") for i in range(n)]
        images = torch.stack([torch.from_numpy(np.array(s.image)).permute(2, 0, 1) for s in scenes])
        labels = torch.tensor([s.label for s in scenes])
        return (
            normalize(images, mean, std).to(device),
            labels,
            [s.caption for s in scenes],
            list(CLASSES),
            TEMPLATES["synthetic"],
        )
    from opendino.data.sources import decode_or_skip
    from opendino.eval.data import open_labelled

    split = open_labelled(Path(data))["val"]
    captioned = [i for i, p in enumerate(split.paths) if p.with_suffix(".txt").exists()]
    # a seeded sample, not the first n: the val split is listed class by class
    order = torch.randperm(len(captioned), generator=torch.Generator().manual_seed(0))[:n]
    rows = sorted(captioned[i] for i in order.tolist())
    if not rows:
        raise ConfigError(f"text.eval_data={data}: its val split has no <name>.txt captions beside the images")
    import torchvision.transforms.v2.functional as TF
    from torchvision.transforms import v2

    pictures = [decode_or_skip(split.paths[i]) for i in rows]
    keep = [k for k, img in enumerate(pictures) if img is not None]
    resized = [
        TF.resize(pictures[k], [size, size], interpolation=v2.InterpolationMode.BICUBIC, antialias=True) for k in keep
    ]
    images = normalize(torch.stack(resized), mean, std).to(device)
    captions = [
        split.paths[rows[k]].with_suffix(".txt").read_text(encoding="utf-8", errors="replace").strip() for k in keep
    ]
    labels = split.labels[[rows[k] for k in keep]]
    return images, labels, captions, [c.replace("_", " ") for c in split.classes], TEMPLATES["simple"]
