"""The evaluation report: ``results.json``, ``report.md`` with tables, a bar chart and PCA / similarity
pictures of the evaluated model next to its random-initialised twin."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from torch import nn

from opendino.data.sources import decode_image
from opendino.eval.features import eval_transform
from opendino.eval.visualize import picture

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


def _bar_chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    headline = {**HEADLINE, **TEXT_HEADLINE}
    tasks = [t for t in headline if t in results["trained"] and headline[t] in results["trained"][t]]
    fig, ax = plt.subplots(figsize=(1.4 * len(tasks) + 2, 3.2))
    for offset, (name, colour) in zip((-0.2, 0.2), (("trained", "tab:blue"), ("random_init", "tab:gray")), strict=True):
        values = [results[name][t][headline[t]] for t in tasks]
        ax.bar([i + offset for i in range(len(tasks))], values, width=0.4, label=name.replace("_", " "), color=colour)
    ax.set_xticks(range(len(tasks)), [f"{t}\n{headline[t]}" for t in tasks], fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pictures(models: dict[str, nn.Module], images: list[Path], settings: dict, path: Path) -> None:
    transform = eval_transform(settings["resolution"], settings["mean"], settings["std"])
    decoded = [image for image in map(decode_image, images) if image is not None]
    rows = [
        picture(model, image, transform, settings["resolution"]).resize((3 * 160 + 8, 160), Image.NEAREST)
        for image in decoded
        for model in models.values()
    ]
    if not rows:
        return
    sheet = Image.new("RGB", (rows[0].width, sum(r.height + 4 for r in rows)), (255, 255, 255))
    for k, row in enumerate(rows):
        sheet.paste(row, (0, k * (row.height + 4)))
    sheet.save(path)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_report(out: Path, results: dict, models: dict[str, nn.Module], images: list[Path], settings: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    _bar_chart(results, out / "results.png")
    _pictures(models, images, settings, out / "pictures.png")
    meta = results["meta"]
    lines = [
        "# Evaluation report",
        "",
        f"Model `{meta['model']}` against a random-initialised model of the same architecture; data "
        f"`{meta['data']}` ({meta['n_train']} train / {meta['n_val']} val images, {len(meta['classes'])} classes), "
        f"{meta['resolution']} px, {meta['date']}.",
        "",
        "| task | metric | trained | random init | chance | better |",
        "|---|---|---|---|---|---|",
    ]
    for task in meta["tasks"]:
        trained, floor = results["trained"].get(task, {}), results["random_init"].get(task, {})
        if "skipped" in trained:
            lines.append(f"| {task} | skipped: {trained['skipped']} | | | | |")
            continue
        for metric, value in trained.items():
            if metric in SETTINGS or metric.startswith("chance_"):
                continue
            base, level = floor.get(metric), chance(trained, metric)
            better = (value < base) if metric in LOWER_IS_BETTER else (value > base)
            lines.append(
                f"| {task} | {metric} | {_fmt(value)} | {_fmt(base)} | {'' if level is None else _fmt(level)} "
                f"| {'yes' if better else 'no'} |"
            )
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
        "of every patch to the centre patch (green square); rows alternate trained / random init.",
        "",
        "![PCA and similarity](pictures.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
