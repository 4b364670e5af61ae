"""The evaluation report: ``results.json``, ``report.md`` with tables, a bar chart and PCA / similarity
pictures of the evaluated model next to its random-initialised twin and its baselines (other models, the
raw pixels), with the difference trained - baseline of every metric."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from opendino.data.sources import decode_or_skip
from opendino.eval.features import eval_transform
from opendino.eval.pixels import PixelBaseline
from opendino.eval.visualize import Row, patch_grid, save_figure, sheet, shown_input
from opendino.models.registry import input_channels

LOWER_IS_BETTER = {"rmse", "abs_rel", "mean_error_px"}
HEADLINE = {
    "knn": "top1_k20",
    "linear": "top1",
    "logreg": "top1",
    "seg": "miou",
    "depth": "delta1",
    "corr": "recall_1patch",
}
# Kept apart from HEADLINE, whose tasks every image evaluation has (the demo prints them all).
TEXT_HEADLINE = {"zeroshot": "top1", "retrieval": "image_to_text_r1", "ovseg": "miou"}
# Entries of a task's dict that describe it rather than score it: not rows of the table.
SETTINGS = {"lr", "C", "n_classes", "n_templates", "templates", "n_pairs"}


def chance(task: dict, metric: str) -> float | None:
    """The chance level of a metric, where the task reports one (``chance_top1`` for ``top1``,
    ``chance_r5`` for ``image_to_text_r5``)."""
    for key, value in task.items():
        level = key.removeprefix("chance_")
        if key.startswith("chance_") and (metric == level or metric.endswith(f"_{level}")):
            return value
    return None


def baseline_labels(results: dict) -> dict[str, str]:
    """Short column names of the baselines (``meta["baselines"]``), by results key: ``pixels``, else the
    file or folder name without its suffix (``adapted`` for ``runs/adapted``, ``dinov3_vits16`` for
    ``dinov3_vits16.pth``), or the whole key where two would read alike."""
    keys = results.get("meta", {}).get("baselines", [])
    short = {k: k if k == "pixels" else (Path(k.removeprefix("baseline:")).stem or k) for k in keys}
    counts = Counter(short.values())
    taken = {"trained", "random init", "chance", "better"}
    return {k: v if counts[v] == 1 and v not in taken else k for k, v in short.items()}


def difference(value, base, metric: str) -> tuple[float, str] | None:
    """``(trained - baseline, "better" | "worse" | "same")`` of one metric, from trained's side (lower is
    better for ``LOWER_IS_BETTER``); None where either is not a number."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (value, base)):
        return None
    diff = value - base
    if diff == 0:
        return diff, "same"
    return diff, "better" if (diff < 0) == (metric in LOWER_IS_BETTER) else "worse"


def _series(results: dict) -> list[tuple[str, str]]:
    """``(results key, label)`` of every column: trained, random init, the baselines."""
    return [("trained", "trained"), ("random_init", "random init"), *baseline_labels(results).items()]


def _bar_chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    headline = {**HEADLINE, **TEXT_HEADLINE}
    tasks = [t for t in headline if t in results["trained"] and headline[t] in results["trained"][t]]
    series = _series(results)
    width = 0.8 / len(series)
    colours = ["tab:blue", "tab:gray", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink"]
    fig, ax = plt.subplots(figsize=((0.3 * len(series) + 0.8) * len(tasks) + 2, 3.2))
    for k, (key, label) in enumerate(series):
        # A baseline's skipped task (a dense task on another patch grid) is a gap, not a zero.
        values = [results[key].get(t, {}).get(headline[t], math.nan) for t in tasks]
        offsets = [i + (k - (len(series) - 1) / 2) * width for i in range(len(tasks))]
        ax.bar(offsets, values, width=width, label=label, color=colours[k % len(colours)])
    ax.set_xticks(range(len(tasks)), [f"{t}\n{headline[t]}" for t in tasks], fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pictures(
    models: dict[str, nn.Module],
    images: list[Path],
    settings: dict,
    path: Path,
    title: str,
    labels: dict[str, str],
    normalisation: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None,
) -> None:
    """For each image a row per model, named by ``labels`` (``normalisation``: a model's own mean and std,
    else the settings')."""
    normalisation = normalisation or {}
    res = settings["resolution"]
    transforms = {
        name: eval_transform(res, *normalisation.get(name, (settings["mean"], settings["std"]))) for name in models
    }
    channels = input_channels(next(iter(models.values())))  # every model of a report takes the same
    decoded = [image for image in (decode_or_skip(p, channels) for p in images) if image is not None]
    rows = [
        Row(labels.get(name, name), shown_input(image, res), patch_grid(model, image, transforms[name], res))
        for image in decoded
        for name, model in models.items()
    ]
    if rows:
        save_figure(sheet(rows, title), path)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _baseline_sentence(results: dict, labels: dict[str, str]) -> str:
    info = results["meta"].get("baseline_info", {})
    parts = []
    for key, label in labels.items():
        if key == "pixels":
            grid = info.get(key, {}).get("grid", 16)
            parts.append(
                f"`pixels` (the resized raw pixels through the same probes: the image average-pooled to "
                f"{grid} x {grid} as the global feature, each patch's pixels as its patch feature; the floor "
                "any learned feature should clear)"
            )
        else:
            source = info.get(key, {}).get("source", key.removeprefix("baseline:"))
            parts.append(f"`{label}` (`{source}`, with its own normalisation)")
    return "; baselines at the same resolution on the same images: " + ", ".join(parts)


def _cell(value) -> str:
    return "" if value is None else _fmt(value)


def write_report(
    out: Path,
    results: dict,
    models: dict[str, nn.Module],
    images: list[Path],
    settings: dict,
    baselines: dict[str, tuple[nn.Module, dict]] | None = None,
) -> None:
    """``baselines``: ``{results key: (module, {mean, std, ...})}`` of ``evaluate``'s baselines, for the
    pictures; their numbers come from ``results``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    _bar_chart(results, out / "results.png")
    labels = baseline_labels(results)
    # The pixel baseline has no picture row: the PCA of raw pixel patches is a recolouring of the input,
    # already shown, and its similarity map is a colour match; a baseline model's row is its own features.
    pictured = {k: m for k, (m, _) in (baselines or {}).items() if not isinstance(m, PixelBaseline)}
    norms = {k: (about["mean"], about["std"]) for k, (_, about) in (baselines or {}).items() if k in pictured}
    meta = results["meta"]
    names = {"trained": f"trained: {Path(str(meta['model'])).name}", "random_init": "random init", **labels}
    title = f"Patch features at {settings['resolution']} px: each image, one row per model"
    _pictures({**models, **pictured}, images, settings, out / "pictures.png", title, names, norms)
    head = ["task", "metric", "trained", "random init", *labels.values(), "chance", "better"]
    head += [f"trained − {label}" for label in labels.values()]
    lines = [
        "# Evaluation report",
        "",
        f"Model `{meta['model']}` against a random-initialised model of the same architecture"
        + (_baseline_sentence(results, labels) if labels else "")
        + f"; data `{meta['data']}` ({meta['n_train']} train / {meta['n_val']} val images, "
        f"{len(meta['classes'])} classes), {meta['resolution']} px, {meta['date']}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    skipped: dict[tuple[str, str], list[str]] = {}  # (baseline, reason) -> its skipped tasks: one note each
    for task in meta["tasks"]:
        trained, floor = results["trained"].get(task, {}), results["random_init"].get(task, {})
        if "skipped" in trained:
            lines.append(f"| {task} | skipped: {trained['skipped']} |" + " |" * (len(head) - 2))
            continue
        rows = {key: results[key].get(task, {}) for key in labels}
        for k, row in rows.items():
            if "skipped" in row:
                skipped.setdefault((labels[k], row["skipped"]), []).append(task)
        for metric, value in trained.items():
            if metric in SETTINGS or metric.startswith("chance_"):
                continue
            base, level = floor.get(metric), chance(trained, metric)
            better = (value < base) if metric in LOWER_IS_BETTER else (value > base)
            shown = ["skipped" if "skipped" in row else _cell(row.get(metric)) for row in rows.values()]
            diffs = [difference(value, row.get(metric), metric) for row in rows.values()]
            cells = [task, metric, _fmt(value), _fmt(base), *shown, "" if level is None else _fmt(level)]
            cells += ["yes" if better else "no", *("" if d is None else f"{d[0]:+.4g} ({d[1]})" for d in diffs)]
            lines.append("| " + " | ".join(cells) + " |")
    if labels:
        lines += [
            "",
            "`better`: trained against random init. `trained − X`: the difference of each metric, and whether it "
            f"favours the trained model (lower is better for {', '.join(sorted(LOWER_IS_BETTER))}).",
        ]
    if skipped:
        lines += ["", *(f"- `{label}` {', '.join(t)}: skipped: {why}" for (label, why), t in skipped.items())]
    text = meta.get("text")
    if text:
        zeroshot = results["trained"].get("zeroshot", {})
        lines += [
            "",
            f"Text tasks (zeroshot, retrieval, ovseg): random init is {text['random_init']}, so the gap is what "
            f"the text training added. Templates `{text['templates']}` ({len(text['prompts'])}: "
            f"{'; '.join(f'`{p}`' for p in text['prompts'][:5])}{'; ...' if len(text['prompts']) > 5 else ''}); "
            f"class texts: {', '.join(f'`{c}`' for c in text['classnames'][:20])}"
            f"{', ...' if len(text['classnames']) > 20 else ''}"
            + (f" ({zeroshot['n_classes']} classes)" if "n_classes" in zeroshot else "")
            + ". Open-vocabulary segmentation rows: the background prompts, then the classes by segmentation id.",
        ]
    lines += [
        "",
        "![headline metrics](results.png)",
        "",
        "Each row of pictures: the input, the PCA of the patch features as RGB, and the cosine similarity "
        "of every patch to the centre patch (green square); rows alternate "
        + " / ".join(["trained", "random init", *(labels[k] for k in pictured)])
        + (" (the pixel baseline has no row: the PCA of raw pixels recolours the input)" if "pixels" in labels else "")
        + ".",
        "",
        "![PCA and similarity](pictures.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
