"""Text tasks of a text-aligned model: zero-shot classification, image-text retrieval and open-vocabulary
segmentation (docs/design/peers.md §4 gives the protocols followed), for ``opendino eval`` (``run_text_tasks``)
and for the text recipe's evaluation during training (``text_metrics``).

Zero-shot: every class name is put into each prompt template, each prompt's embedding normalised, averaged
over the templates and normalised again; an image is given the class of highest similarity (top-1 / top-5).
Retrieval (one caption per image): the rank of the true pair counts the candidates scored higher, and ties
go to the lower index; R@k = the share of queries whose pair ranks below k, image->text and text->image.
Open-vocabulary segmentation: each patch is given the class whose text embedding (its patch half) is most
similar to the patch embedding; scores are upsampled bilinearly to the label maps, mIoU as the probes compute it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from opendino.eval.data import LabelledSplit, dense_path, load_segmentation
from opendino.eval.features import _collate, _ImageDataset, eval_transform
from opendino.models.text import TextAlignedModel, TextTransformer, VisionHead, backbone_tokens
from opendino.probes import mean_iou

TEXT_TASKS = ("zeroshot", "retrieval", "ovseg")
RETRIEVAL_KS = (1, 5, 10)

# Built-in prompt sets; `--templates FILE` gives one per line with `{}` for the class name.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "simple": ("a photo of a {}.", "a {}.", "a picture of a {}.", "an image of a {}.", "a close-up photo of a {}."),
    # the synthetic world's captions name shapes with a size and a colour on a background
    "synthetic": ("a {}", "a large {}", "a {} on a background", "a large {} and a small shape"),
}
BACKGROUND_PROMPTS = ("a background", "a textured background", "a plain background")


# -- inputs: class names and templates -------------------------------------------------------------------
def class_text(name: str) -> str:
    """The text of a class (folder) name: ``_`` becomes a space; capitals and spaces are kept (the tokenizer
    does its own cleaning, and a user who wrote "Red Ring" means that text)."""
    return name.replace("_", " ")


def _read_lines(path: Path) -> list[str]:
    """Non-empty lines without their line endings (inner and surrounding spaces kept)."""
    return [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def resolve_templates(spec: str | Path | Sequence[str] | None, synthetic: bool) -> tuple[str, tuple[str, ...]]:
    """``(name, templates)`` of ``--templates``: a built-in set (``simple``, ``synthetic``), a file with one
    template per line, or the templates themselves; ``None``: ``synthetic`` on synthetic data, else ``simple``."""
    if spec is None:
        spec = "synthetic" if synthetic else "simple"
    if isinstance(spec, str | Path) and str(spec) in TEMPLATES:
        return str(spec), TEMPLATES[str(spec)]
    if isinstance(spec, str | Path):
        if not Path(spec).is_file():
            raise ValueError(f"--templates {spec}: neither a built-in set ({', '.join(TEMPLATES)}) nor a file")
        name, templates = str(spec), tuple(_read_lines(Path(spec)))
    else:
        name, templates = "custom", tuple(spec)
    if not templates:
        raise ValueError(f"--templates {name}: no templates (one per line, with {{}} for the class name)")
    for k, template in enumerate(templates, 1):
        try:
            ok = "{}" in template and template.format("x") is not None
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ValueError(
                f"--templates {name}: template {k} {template!r} needs exactly one {{}} for the class name "
                "and no other braces"
            )
    return name, templates


def resolve_classnames(folder_classes: Sequence[str], classnames: str | Path | Sequence[str] | None) -> list[str]:
    """The texts of the classes: the folder names, or ``--classnames`` (a file with one name per line, or the
    names, in the sorted order of the class folders), each through ``class_text``."""
    if classnames is None:
        names = list(folder_classes)
    else:
        names = _read_lines(Path(classnames)) if isinstance(classnames, str | Path) else list(classnames)
        if len(names) != len(folder_classes):
            raise ValueError(
                f"--classnames {classnames}: {len(names)} names for {len(folder_classes)} class folders "
                f"({', '.join(folder_classes[:5])}{', ...' if len(folder_classes) > 5 else ''}); give one per "
                "line, in the sorted order of the folders"
            )
    return [class_text(n) for n in names]


# -- metrics ---------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_texts(model, texts: Sequence[str], batch: int = 256) -> Tensor:
    """Normalised text embeddings ``[N, E]`` of strings, ``batch`` at a time."""
    return torch.cat([model.encode_text(list(texts[i : i + batch])) for i in range(0, len(texts), batch)])


@torch.no_grad()
def zero_shot_weights(model, classnames: Sequence[str], templates: Sequence[str], batch: int = 256) -> Tensor:
    """``[C, E]`` classifier: per class, the renormalised mean of its normalised prompt embeddings."""
    prompts = [t.format(c) for c in classnames for t in templates]
    embedded = encode_texts(model, prompts, batch)
    return F.normalize(embedded.view(len(classnames), len(templates), -1).mean(1), dim=-1)


@torch.no_grad()
def background_weight(model, prompts: Sequence[str] = BACKGROUND_PROMPTS) -> Tensor:
    """``[1, E]``: the background row of the open-vocabulary classifier (its prompts averaged like templates)."""
    return F.normalize(encode_texts(model, prompts).mean(0, keepdim=True), dim=-1)


def zero_shot_accuracy(images: Tensor, labels: Tensor, weights: Tensor, ks: Sequence[int] = (1, 5)) -> dict:
    """Top-k accuracy of normalised image embeddings ``[N, E]`` against a ``[C, E]`` classifier."""
    scores = images.float() @ weights.float().T
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = top == labels.view(-1, 1).to(top.device)
    return {f"top{k}": hits[:, :k].any(1).double().mean().item() for k in ks}


def retrieval_ranks(scores: Tensor, offset: int = 0) -> Tensor:
    """The rank of each query's true pair in a ``[Q, N]`` score matrix whose row ``r`` pairs with column
    ``offset + r``: candidates scored higher, plus those scored equal with a lower index."""
    rows = torch.arange(scores.shape[0], device=scores.device)
    true_column = (rows + offset).view(-1, 1)
    true = scores.gather(1, true_column)
    columns = torch.arange(scores.shape[1], device=scores.device).view(1, -1)
    return ((scores > true) | ((scores == true) & (columns < true_column))).sum(1)


def retrieval_recall(images: Tensor, texts: Tensor, ks: Sequence[int] = RETRIEVAL_KS, chunk: int = 4096) -> dict:
    """Image->text and text->image R@k of paired normalised embeddings ``[N, E]`` (pair i = row i); queries
    are scored ``chunk`` at a time, so the ``[N, N]`` matrix is never held whole."""
    images, texts = images.float(), texts.float()
    out = {}
    for name, queries, candidates in (("image_to_text", images, texts), ("text_to_image", texts, images)):
        ranks = torch.cat(
            [retrieval_ranks(queries[i : i + chunk] @ candidates.T, i) for i in range(0, len(queries), chunk)]
        )
        out.update({f"{name}_r{k}": (ranks < k).double().mean().item() for k in ks})
    return out


def ovseg_predict(model, patches: Tensor, weights: Tensor, size: int) -> Tensor:
    """Class maps ``[N, size, size]`` from patch embeddings ``[N, h, w, E/2]`` and a ``[C, E]`` classifier."""
    scores = model.patch_text_similarity(patches.float(), weights.float())  # [N, h, w, C]
    scores = F.interpolate(scores.permute(0, 3, 1, 2), size=(size, size), mode="bilinear", align_corners=False)
    return scores.argmax(1)


def ovseg_miou(model, patches: Tensor, weights: Tensor, maps: Tensor) -> dict:
    """mIoU of open-vocabulary segmentation against ``[N, H, W]`` label maps (label = classifier row)."""
    predicted = ovseg_predict(model, patches, weights, maps.shape[-1])
    return mean_iou(predicted, maps.to(predicted.device), weights.shape[0])


def chance_levels(n_classes: int | None = None, n_pairs: int | None = None) -> dict[str, float]:
    """What guessing scores: ``1/C`` top-1 and ``min(5, C)/C`` top-5, ``min(k, N)/N`` R@k."""
    out = {}
    if n_classes:
        out.update(chance_top1=1 / n_classes, chance_top5=min(5, n_classes) / n_classes)
    if n_pairs:
        out.update({f"chance_r{k}": min(k, n_pairs) / n_pairs for k in RETRIEVAL_KS})
    return out


# -- training-time evaluation ----------------------------------------------------------------------------
def text_metrics(
    model: TextAlignedModel,
    images: Tensor,
    labels: Tensor,
    captions: list[str],
    classnames: list[str],
    templates: Sequence[str],
    batch_size: int = 64,
) -> dict[str, float]:
    """Zero-shot top-1 / top-5 and retrieval R@1 (both directions) of held-out normalised images
    ``[N, 3, S, S]`` with their labels ``[N]`` and one caption each, for the text recipe's periodic evaluation.

    Class names go through ``class_text`` as in ``opendino eval``. Runs batched without gradients in eval
    mode; every module's train / eval mode is restored afterwards (a locked backbone stays in eval mode)."""
    if not len(images) == len(labels) == len(captions):
        raise ValueError(f"{len(images)} images, {len(labels)} labels and {len(captions)} captions: need one each")
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            device = model.logit_scale.device
            dtype = next(model.backbone.parameters()).dtype
            embedded = torch.cat(
                [
                    model.encode_image(images[i : i + batch_size].to(device, dtype))
                    for i in range(0, len(images), batch_size)
                ]
            )
            weights = zero_shot_weights(model, [class_text(c) for c in classnames], templates)
            zero_shot = zero_shot_accuracy(embedded, labels, weights)
            recall = retrieval_recall(embedded, encode_texts(model, captions), ks=(1,))
    finally:
        for module, mode in modes.items():
            module.training = mode  # per module, not .train(mode): mixed modes come back as they were
    return {
        "zeroshot_top1": zero_shot["top1"],
        "zeroshot_top5": zero_shot["top5"],
        "retrieval_i2t_r1": recall["image_to_text_r1"],
        "retrieval_t2i_r1": recall["text_to_image_r1"],
    }


# -- `opendino eval` -------------------------------------------------------------------------------------
def random_text_like(model: TextAlignedModel, seed: int = 0) -> TextAlignedModel:
    """The random-init twin of the text tasks: the same backbone (shared, not copied) with a freshly
    initialised vision head and text tower, so its scores are what the backbone gives before text training."""
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
        torch.manual_seed(seed)
        head, text = VisionHead(**model.head.kwargs), TextTransformer(**model.text.kwargs)
    bias = None if model.logit_bias is None else model.logit_bias.item()
    twin = TextAlignedModel(
        model.backbone, head, text, logit_scale=model.logit_scale.item(), logit_bias=bias, locked=model.locked
    )
    twin.tokenizer = model.tokenizer
    return twin.to(model.logit_scale.device).eval()


def read_caption(image: Path) -> str | None:
    """The caption ``<stem>.txt`` beside an image (its text, stripped), or None."""
    path = dense_path(image, ".txt")
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8").strip() or None


@torch.no_grad()
def _embed_split(models: dict[str, TextAlignedModel], split: LabelledSplit, settings: dict, seg_weights: dict):
    """One pass over the split for every model: image embeddings ``[N, E]`` and, where ``seg_weights`` has the
    model, its open-vocabulary class maps at the eval resolution. The backbone runs once per batch for all
    models that share it (the random-init twin does)."""
    res, device = settings["resolution"], settings["device"]
    loader = DataLoader(
        _ImageDataset(split.paths, eval_transform(res, settings["mean"], settings["std"])),
        batch_size=settings["batch_size"],
        collate_fn=_collate,
    )
    images = {name: [] for name in models}
    maps = {name: [] for name in seg_weights}
    kept = []
    for batch, indices, _ in tqdm(loader, desc="embed", unit="batch", disable=not settings["progress"]):
        if batch is None:
            continue
        tokens: dict[int, Tensor] = {}
        for name, model in models.items():
            key = id(model.backbone)
            if key not in tokens:
                x = batch.to(device, next(model.backbone.parameters()).dtype)
                tokens[key] = backbone_tokens(model.backbone, x)
            image, patches = model.embed_images(tokens[key].to(model.head.ln_final.weight.dtype))
            images[name].append(image.cpu())
            if name in seg_weights:
                stride = getattr(model.backbone, "feature_stride", 16)
                grid = patches.unflatten(1, (batch.shape[-2] // stride, batch.shape[-1] // stride))
                maps[name].append(ovseg_predict(model, grid, seg_weights[name], res).to(torch.int16).cpu())
        kept += indices
    if not kept:
        raise RuntimeError(f"none of the {len(split.paths)} images could be read")
    return kept, {n: torch.cat(v) for n, v in images.items()}, {n: torch.cat(v) for n, v in maps.items()}


def run_text_tasks(
    models: dict[str, TextAlignedModel],
    val: LabelledSplit,
    tasks: Sequence[str],
    settings: dict,
    *,
    classnames: Sequence[str],
    templates: tuple[str, Sequence[str]],
    seg_classnames: Sequence[str],
    log: Callable[[str], None] = print,
) -> dict[str, dict]:
    """The text tasks on the val split for each model: ``{model name: {task: metrics}}``.

    ``classnames``: the texts of ``val.classes`` (zero-shot labels); ``templates``: ``(name, templates)``;
    ``seg_classnames``: the texts of the segmentation ids 1, 2, ... (row 0 is the background prompts)."""
    template_name, prompts = templates
    tasks = [t for t in tasks if t in TEXT_TASKS]
    results: dict[str, dict] = {name: {} for name in models}
    captions = {i: read_caption(p) for i, p in enumerate(val.paths)} if "retrieval" in tasks else {}
    with_maps = "ovseg" in tasks and val.has(".seg.png")
    start = time.perf_counter()
    zs_weights, seg_weights = {}, {}
    for name, model in models.items():
        if "zeroshot" in tasks:
            zs_weights[name] = zero_shot_weights(model, classnames, prompts)
        if with_maps:
            classes = zero_shot_weights(model, seg_classnames, prompts)
            seg_weights[name] = torch.cat([background_weight(model), classes])
    kept, images, predicted = _embed_split(models, val, settings, seg_weights)
    seconds = time.perf_counter() - start
    labels = val.labels[kept]
    paired = [k for k, i in enumerate(kept) if captions.get(i)]
    maps = load_segmentation([val.paths[i] for i in kept], settings["resolution"]) if with_maps else None
    for name in models:
        log(f"{name} (text):")
        for task in tasks:
            if task == "zeroshot":
                n = len(classnames)
                row = zero_shot_accuracy(images[name], labels, zs_weights[name])
                row.update(chance_levels(n_classes=n), n_classes=n, templates=template_name, n_templates=len(prompts))
            elif task == "retrieval":
                if not paired:
                    row = {"skipped": "no <stem>.txt captions beside the val images"}
                else:
                    texts = encode_texts(models[name], [captions[kept[k]] for k in paired])
                    row = retrieval_recall(images[name][paired], texts)
                    row.update(chance_levels(n_pairs=len(paired)), n_pairs=len(paired))
            else:  # ovseg
                n_rows = 1 + len(seg_classnames)
                labelled = maps[maps != 255] if maps is not None else None
                if maps is None:
                    row = {"skipped": "no <stem>.seg.png labels beside the val images"}
                elif labelled.numel() and int(labelled.max()) >= n_rows:
                    row = {
                        "skipped": f"the .seg.png maps hold class id {int(labelled.max())}, but only "
                        f"{len(seg_classnames)} classes are named (ids 1..{len(seg_classnames)})"
                    }
                else:
                    row = mean_iou(predicted[name], maps, n_rows)
                    row["n_classes"] = n_rows
            results[name][task] = row
            log(f"  {task:<9} {json.dumps(row)}")
    log(f"  text tasks: {seconds:.0f}s for the image pass")
    return results
