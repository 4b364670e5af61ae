"""``opendino eval``: every evaluation of a model beside a random-initialised model of the same
architecture, on the synthetic world or a user's labelled folder, written to ``results.json`` and
``report.md`` (with plots and PCA / similarity pictures).

The image tasks run on the backbone (``teacher.safetensors``); the text tasks (eval/text.py) on the
text-aligned model of a text run (``text.safetensors`` beside it), whose random-init twin keeps the trained
backbone and re-initialises the vision head and text tower: the gap is what the text training added.

Baselines (``evaluate(..., baselines=...)``, ``opendino eval --baseline``) are extra columns: other models
(the one an adapted model started from, say) at the same resolution on the same images through the same
probes, each with its own normalisation, and ``pixels``, the resized raw pixels (eval/pixels.py): the floor
any learned feature should clear."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from opendino import runs
from opendino.eval.correspondence import correspondence_metrics, match_errors
from opendino.eval.data import (
    LabelledSplit,
    dense_path,
    load_depth,
    load_flow,
    load_segmentation,
    open_labelled,
    synthetic_folder,
)
from opendino.eval.dense import linear_depth, linear_segmentation
from opendino.eval.features import Features, cached_features
from opendino.eval.linear import linear_probe, logistic_regression
from opendino.eval.pixels import pixel_baseline_like
from opendino.eval.text import (
    TEXT_TASKS,
    class_text,
    random_text_like,
    resolve_classnames,
    resolve_templates,
    run_text_tasks,
)
from opendino.models import MODELS, load_model
from opendino.models.checkpoint import CheckpointError
from opendino.models.registry import create, input_channels, normalisation
from opendino.probes import knn_accuracy, nearest_neighbour_segmentation

IMAGE_TASKS = ("knn", "linear", "logreg", "seg", "depth", "corr")
TASKS = (*IMAGE_TASKS, *TEXT_TASKS)
DENSE_TASKS = ("seg", "depth", "corr")
PIXELS = "pixels"  # --baseline pixels: the raw-pixel floor; any other value is a model


def resolve_model(
    source: str | Path, weights: str | Path | None = None, say: Callable[[str], None] | None = None
) -> tuple[nn.Module, dict]:
    """A run folder (its ``teacher.safetensors`` and the normalisation and crop size of its config), a
    checkpoint file, or a registered name (``weights``: its checkpoint; without, random weights, which ``say``
    is told); returns the model and ``{mean, std, resolution, out}``."""
    from opendino.models.registry import UnknownModelError

    path = Path(source)
    if weights is not None and str(source) not in MODELS:
        raise UnknownModelError(f"weights go with a named architecture; {source!r} is not one")
    if path.is_dir() and weights is None:
        weights = path / runs.EXPORT
        if not weights.exists():
            raise FileNotFoundError(f"{path} has no {runs.EXPORT}: is it a finished `opendino train` run?")
        crops = runs.read_config(path).get("crops", {}) if runs.is_run(path) else {}
        model = load_model(weights)
        # the run's own crops settings, else what the file records (normalisation)
        mean, std = (crops["mean"], crops["std"]) if "mean" in crops else normalisation(model)
        return model, {
            "mean": tuple(mean),
            "std": tuple(std),
            "resolution": crops.get("global_size", 224),
            "out": path / "eval",
        }
    if not path.exists() and str(source) not in MODELS:
        raise UnknownModelError(
            f"{source!r} is neither a file, a run folder nor a known model; known: {', '.join(MODELS)}"
        )
    if str(source) in MODELS and weights is None and not path.exists() and say is not None:
        say(f"note: {source} has random weights (no weights were given: pass --weights FILE or a run folder)")
    model = load_model(source, weights=weights) if weights is not None else load_model(source)
    mean, std = normalisation(model)
    return model, {
        "mean": mean,
        "std": std,
        "resolution": 224,
        "out": Path(f"eval-{path.stem}"),
    }


def random_init_like(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create(model.family, model.model_kwargs)


def _labels(split: LabelledSplit, features: Features) -> tuple[list[Path], torch.Tensor]:
    """The images that were read (unreadable ones are skipped) and their labels, in feature order."""
    index = {str(p): i for i, p in enumerate(split.paths)}
    rows = [index[p] for p in features.paths]
    return [split.paths[i] for i in rows], split.labels[rows]


def _as_stored(features: Features) -> Features:
    """The global features as the cache stores them (float16): a first run scores the same numbers as a
    re-run from the cache, and a baseline that is the evaluated model itself the same as ``trained`` (the
    patch grids are float16 either way)."""
    features.cls, features.pooled = features.cls.half().float(), features.pooled.half().float()
    return features


def run_tasks(model: nn.Module, splits: dict[str, LabelledSplit], tasks, settings: dict, log) -> dict:
    extract = {
        "mean": settings["mean"],
        "std": settings["std"],
        "resolution": settings["resolution"],
        "device": settings["device"],
        "batch_size": settings["batch_size"],
        "progress": settings["progress"],
        "compile": settings.get("compile", False),
    }
    res, cache = settings["resolution"], settings["cache"] / "features"
    # Patch grids only when a dense task has its labels: a large classification folder keeps CLS only.
    val = splits["val"]
    labelled = {
        "seg": val.has(".seg.png"),
        "depth": val.has(".depth.png"),
        "corr": any(dense_path(p, ".flow.npy").exists() for p in val.paths),
    }
    dense = any(labelled[t] for t in tasks if t in DENSE_TASKS)
    feats = {s: _as_stored(cached_features(model, splits[s].paths, cache, keep_patch=dense, **extract)) for s in splits}
    (train_paths, train_y), (val_paths, val_y) = (_labels(splits[s], feats[s]) for s in ("train", "val"))
    tr, va = feats["train"], feats["val"]
    results: dict[str, dict] = {}
    for task in tasks:
        start = time.perf_counter()
        if task == "knn":
            acc = knn_accuracy(tr.cls, train_y, va.cls, val_y, ks=(10, 20, 100, 200))
            results[task] = {f"top1_k{k}": v for k, v in acc.items()}
        elif task == "linear":
            results[task] = linear_probe(
                torch.cat([tr.cls, tr.pooled], 1), train_y, torch.cat([va.cls, va.pooled], 1), val_y
            )
        elif task == "logreg":
            results[task] = logistic_regression(tr.cls, train_y, va.cls, val_y)
        elif task == "seg":
            if not labelled["seg"]:
                results[task] = {"skipped": "no <stem>.seg.png labels beside the images"}
                continue
            train_maps, val_maps = load_segmentation(train_paths, res), load_segmentation(val_paths, res)
            classes = torch.cat([train_maps[train_maps != 255], val_maps[val_maps != 255]])
            n_classes = int(classes.max()) + 1
            results[task] = linear_segmentation(tr.patch, train_maps, va.patch, val_maps, n_classes=n_classes)
            nn = nearest_neighbour_segmentation(tr.patch, train_maps, va.patch, val_maps, n_classes=n_classes)
            results[task]["nn_miou"] = nn["miou"]
        elif task == "depth":
            if not labelled["depth"]:
                results[task] = {"skipped": "no <stem>.depth.png labels beside the images"}
                continue
            train_depth, val_depth = load_depth(train_paths, res), load_depth(val_paths, res)
            max_depth = float(math.ceil(max(train_depth.max(), val_depth.max())))
            results[task] = linear_depth(tr.patch, train_depth, va.patch, val_depth, max_depth=max_depth)
        elif task == "corr":
            pairs = [
                p for p in val_paths if dense_path(p, ".view2.png").exists() and dense_path(p, ".flow.npy").exists()
            ]
            if not pairs:
                results[task] = {"skipped": "no <stem>.view2.png / <stem>.flow.npy pairs beside the images"}
                continue
            second = cached_features(
                model, [dense_path(p, ".view2.png") for p in pairs], cache, keep_patch=True, **extract
            )
            row = {str(p): i for i, p in enumerate(val_paths)}
            stride = res // va.patch.shape[1]
            errors = torch.cat(
                [
                    match_errors(va.patch[row[str(p)]], second.patch[k], load_flow(p, res), stride)
                    for k, p in enumerate(pairs)
                ]
            )
            results[task] = correspondence_metrics(errors, stride)
        log(f"  {task:<7} {json.dumps(results[task])} ({time.perf_counter() - start:.0f}s)")
    return results


def text_model_file(source: str | Path, text_tasks: tuple[str, ...] | list[str]) -> Path:
    """The ``text.safetensors`` of ``source`` (a run folder or the file itself), or a CheckpointError that
    says what the text tasks need and how to get it; checked before any work is done."""
    from opendino.models.text import TEXT_EXPORT

    path = Path(source)
    file = path / TEXT_EXPORT if path.is_dir() else path
    if file.name == TEXT_EXPORT and file.is_file():
        return file
    if path.is_dir():
        why = f"the folder has no {TEXT_EXPORT}"
    elif path.exists():
        why = f"it is a backbone checkpoint, not a {TEXT_EXPORT}"
    else:
        why = "a registered backbone has no text tower"
    raise CheckpointError(
        f"--tasks {','.join(text_tasks)} need a text-aligned model, and {source} is not one ({why}). zeroshot "
        "and retrieval compare images with texts through a vision head and a text tower; ovseg compares patches "
        f"with texts through the vision head's patch embeddings. A run of the text recipe holds them in "
        f"{TEXT_EXPORT} beside its {runs.EXPORT}: train one with `opendino train configs/text/demo.yaml "
        f"init.backbone=RUN` (docs/text.md) and evaluate that run folder, or leave these tasks out (the image "
        f"tasks {','.join(IMAGE_TASKS)} need only the backbone)"
    )


def baseline_key(source: str | Path) -> str:
    """The name of a baseline's entry in ``results.json``: ``pixels``, or ``baseline:<source>``."""
    return PIXELS if str(source) == PIXELS else f"baseline:{Path(source)}"


def load_baselines(
    baselines: Sequence[str | Path], model: nn.Module, info: dict, resolution: int
) -> dict[str, tuple[nn.Module, dict]]:
    """``{results key: (module, {source, mean, std, feature_stride, dense})}`` for the baselines of ``model``;
    a ValueError before any work for one that cannot be compared: another number of input channels, a
    stride that does not divide the resolution. ``dense``: whether its patch grid is the evaluated model's
    (the dense tasks compare only then)."""
    channels = input_channels(model)
    grid = resolution // model.feature_stride
    loaded: dict[str, tuple[nn.Module, dict]] = {}
    for source in baselines:
        key = baseline_key(source)
        if key in loaded:
            continue  # named twice: one column
        if key == PIXELS:
            pixels = pixel_baseline_like(model)
            loaded[key] = (
                pixels,
                {
                    "source": PIXELS,
                    "mean": list(info["mean"]),
                    "std": list(info["std"]),
                    "feature_stride": pixels.feature_stride,
                    "grid": pixels.grid,
                    "dense": True,
                },
            )
            continue
        if str(source) in MODELS:
            torch.manual_seed(0)  # a registered name is its random initialisation: seed 0, like random_init_like
        other, other_info = resolve_model(source)
        other_channels = input_channels(other)
        if other_channels != channels:
            raise ValueError(
                f"baseline {source}: {other_channels} input channels, the evaluated model has {channels}; "
                "the two cannot see the same images (the start of an N-channel adaptation as a baseline: a "
                "1-step run of it with init.head_warmup_steps=1 exports the released model fitted to N channels)"
            )
        stride = other.feature_stride
        if resolution % stride:
            raise ValueError(
                f"baseline {source}: resolution {resolution} is not a multiple of its stride {stride}; "
                f"give --resolution a multiple of {stride} and {model.feature_stride}"
            )
        loaded[key] = (
            other,
            {
                "source": str(source),
                "mean": list(other_info["mean"]),
                "std": list(other_info["std"]),
                "feature_stride": stride,
                "dense": resolution // stride == grid,
            },
        )
    return loaded


def run_baseline(
    model: nn.Module,
    about: dict,
    splits: dict[str, LabelledSplit],
    image_tasks: Sequence[str],
    trained: dict,
    settings: dict,
    log,
) -> dict:
    """``run_tasks`` for a baseline with its own normalisation; on another patch grid than the evaluated
    model's, its dense tasks are ``skipped`` (with the reason of the evaluated model's where it has one)."""
    settings = {**settings, "mean": tuple(about["mean"]), "std": tuple(about["std"])}
    tasks = [t for t in image_tasks if about["dense"] or t not in DENSE_TASKS]
    done = run_tasks(model, splits, tasks, settings, log) if tasks else {}
    res = settings["resolution"]
    results = {}
    for task in image_tasks:
        if task in done:
            results[task] = done[task]
        elif "skipped" in trained.get(task, {}):
            results[task] = {"skipped": trained[task]["skipped"]}
        else:
            g = res // about["feature_stride"]
            results[task] = {
                "skipped": f"patch grid {g}x{g} (stride {about['feature_stride']}) is not the evaluated model's "
                f"{res // settings['feature_stride']}x{res // settings['feature_stride']}: dense tasks compare "
                "on the same grid only"
            }
    return results


def evaluate(
    source: str | Path,
    data: str = "synthetic",
    tasks: tuple[str, ...] = IMAGE_TASKS,
    out: str | Path | None = None,
    resolution: int | None = None,
    n_train: int = 1000,
    n_val: int = 500,
    device: str = "cpu",
    batch_size: int = 64,
    progress: bool = True,
    log=print,
    classnames: str | Path | list[str] | None = None,
    templates: str | Path | list[str] | None = None,
    baselines: Sequence[str | Path] = (),
    compile: bool = False,
) -> dict:
    """Evaluates ``source`` and a random-initialised twin; writes ``results.json`` and ``report.md``.
    ``compile``: features extracted through ``torch.compile`` (the same values; faster on a GPU).

    ``baselines``: ``pixels`` and / or other models (registered names, checkpoint files, run folders), each
    evaluated on the image tasks at the same resolution on the same images, with its own normalisation;
    their results are ``results["pixels"]`` and ``results["baseline:<source>"]``, listed in
    ``results["meta"]["baselines"]``. Checked (input channels, stride) before any data is written.

    Text tasks (``zeroshot``, ``retrieval``, ``ovseg``) need a text run (``text_model_file``); ``classnames``
    (a file, one per line in the sorted order of the class folders) replaces the folder names as the class
    texts, ``templates`` is ``simple``, ``synthetic`` or a file of templates with ``{}`` (default: ``synthetic``
    on synthetic data, else ``simple``)."""
    from opendino.eval.report import write_report

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; valid: {', '.join(TASKS)}")
    image_tasks = tuple(t for t in tasks if t in IMAGE_TASKS)
    text_tasks = tuple(t for t in tasks if t in TEXT_TASKS)
    text_model, template_set = None, None
    if text_tasks:
        # Before any model is loaded or data written: a model without a text tower fails here.
        text_file = text_model_file(source, text_tasks)
        template_set = resolve_templates(templates, synthetic=data == "synthetic")
        if Path(source).is_file():
            source = text_file.parent  # the run folder: its teacher, config and eval/ folder
    model, info = resolve_model(source)
    res = resolution or info["resolution"]
    if res % model.feature_stride:
        raise ValueError(f"resolution {res} is not a multiple of the model's stride {model.feature_stride}")
    baseline_models = load_baselines(baselines, model, info, res)
    if text_tasks:
        from opendino.models.text import load_text_model

        text_model = load_text_model(text_file, device=device)
    out = Path(out) if out is not None else info["out"]
    cache = out / "cache"
    root = synthetic_folder(cache, n_train, n_val, res) if data == "synthetic" else Path(data)
    splits = open_labelled(root)
    settings = {
        **info,
        "resolution": res,
        "device": device,
        "batch_size": batch_size,
        "progress": progress,
        "cache": cache,
        "feature_stride": model.feature_stride,
        "compile": compile,
    }
    text_inputs = {}
    if text_tasks:
        from opendino.data.synthetic import SEG_CLASSES_FILE

        names = resolve_classnames(splits["val"].classes, classnames)
        # Segmentation ids are 1 + class in the sorted order of the class folders, unless the folder's
        # seg_classes.txt names them in id order (the synthetic world numbers its classes its own way and
        # writes that file).
        text_of = dict(zip(splits["val"].classes, names, strict=True))
        seg_file = root / SEG_CLASSES_FILE
        seg_order = seg_file.read_text().split("\n") if seg_file.exists() else None
        seg_names = [text_of.get(c, class_text(c)) for c in seg_order if c] if seg_order else names
        text_inputs = {"classnames": names, "templates": template_set, "seg_classnames": seg_names}
    results = {}
    models = {"trained": model, "random_init": random_init_like(model)}
    for name, m in models.items():
        m.to(device).eval()  # on the device even without image tasks: the report's pictures use it
        results[name] = {}
        if image_tasks:
            log(f"{name}:")
            results[name] = run_tasks(m, splits, image_tasks, settings, log)
    if text_tasks:
        text_models = {"trained": text_model, "random_init": random_text_like(text_model)}
        text_results = run_text_tasks(text_models, splits["val"], text_tasks, settings, log=log, **text_inputs)
        for name, row in text_results.items():
            results[name].update(row)
    for key, (m, about) in baseline_models.items():
        m.to(device).eval()
        results[key] = {}
        if image_tasks:
            log(f"{key}:")
            results[key] = run_baseline(m, about, splits, image_tasks, results["trained"], settings, log)
        for task in text_tasks:
            results[key][task] = {"skipped": "a baseline is compared on the image tasks only"}
    results["meta"] = {
        "model": str(source),
        "data": str(root),
        "classes": splits["train"].classes,
        "n_train": len(splits["train"].paths),
        "n_val": len(splits["val"].paths),
        "resolution": res,
        "tasks": list(tasks),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "report": str(out / "report.md"),
        "baselines": list(baseline_models),
        "baseline_info": {key: about for key, (_, about) in baseline_models.items()},
    }
    if text_tasks:
        results["meta"]["text"] = {
            "classnames": text_inputs["classnames"],
            "templates": template_set[0],
            "prompts": list(template_set[1]),
            "ovseg_classes": ["background", *text_inputs["seg_classnames"]],
            "random_init": "the same backbone with a freshly initialised vision head and text tower (seed 0)",
        }
    write_report(out, results, models, splits["val"].paths[:4], settings, baselines=baseline_models)
    return results
