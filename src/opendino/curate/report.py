"""The curation report: ``report.md`` with the counts of every stage, a histogram of cluster sizes before
and after the balanced sampling (``cluster_sizes.png``) and a contact sheet of a few clusters
(``clusters.png``: the largest, middle and smallest level-1 clusters, images nearest the centroid first)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from opendino.curate.embed import EmbeddingStore  # noqa: E402
from opendino.data.sources import ImageSource  # noqa: E402

THUMB = 64


def _histogram(out: Path, sizes: np.ndarray, picked: np.ndarray) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    top = max(int(sizes.max()), 1)
    bins = np.unique(np.geomspace(1, top + 1, 30).astype(int))
    ax.hist(sizes[sizes > 0], bins=bins, alpha=0.6, label="images per cluster (after dedup)")
    ax.hist(picked[picked > 0], bins=bins, alpha=0.6, label="picked per cluster (selection)")
    ax.set_xscale("log")
    ax.set_xlabel("cluster size (level 1)")
    ax.set_ylabel("clusters")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _similarity_histogram(out: Path, sims: np.ndarray, threshold: float | None) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 3.0))
    ax.hist(sims, bins=60, color="tab:blue", alpha=0.8)
    if threshold is not None:
        ax.axvline(threshold, color="tab:red", lw=1.2, label=f"--dedup {threshold}")
        ax.legend(fontsize=8)
    ax.set_xlabel("cosine similarity to the nearest other image (a sample, exact copies removed)")
    ax.set_ylabel("images")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _contact_sheet(out: Path, source: ImageSource, rows: list[list[int]], titles: list[str]) -> None:
    width = max(len(r) for r in rows)
    sheet = Image.new("RGB", (width * THUMB, len(rows) * THUMB), "white")
    for y, records in enumerate(rows):
        for x, record in enumerate(records):
            img = source.load(record)
            if img is not None:
                thumb = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((THUMB, THUMB))
                sheet.paste(thumb, (x * THUMB, y * THUMB))
    fig, ax = plt.subplots(figsize=(1 + width * 0.7, 0.3 + len(rows) * 0.7))
    ax.imshow(sheet)
    ax.set_yticks([(i + 0.5) * THUMB for i in range(len(rows))], titles, fontsize=7)
    ax.set_xticks([])
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_report(
    out: Path,
    counts: dict,
    source: ImageSource,
    store: EmbeddingStore,
    keep_rows: np.ndarray,
    clustered: list[str],
    threshold: float | None = None,
) -> Path:
    lines = [
        "# Curation report",
        "",
        "| stage | images |",
        "|---|---|",
        f"| pool | {counts['pool']} |",
        f"| unreadable (skipped) | {counts['unreadable']} |",
        f"| embedded | {counts['embedded']} |",
        f"| exact duplicates removed | {counts['exact']} |",
        f"| near-duplicates removed | {counts['near']} |",
        f"| kept after dedup | {counts['kept']} |",
        f"| balanced sampling (clustered.txt) | {counts['clustered']} |",
        f"| retrieval (retrieved.txt) | {counts['retrieved']} |",
        f"| selection.txt | {counts['selection']} |",
        "",
    ]
    if (out / "nn_similarity.npy").exists():
        sims = np.load(out / "nn_similarity.npy")
        _similarity_histogram(out / "nn_similarity.png", sims, threshold)
        above = "" if threshold is None else f"; {(sims > threshold).mean():.1%} above --dedup {threshold}"
        lines += [
            f"Nearest-neighbour similarity of {len(sims)} sampled images (median {np.median(sims):.3f}{above}): "
            "copies pile up near 1, distinct images lower; a good --dedup lies in the gap.",
            "",
            "![nearest-neighbour similarity](nn_similarity.png)",
            "",
        ]
    level_file = out / "kmeans" / "level1.npz"
    if clustered and level_file.exists():
        level = np.load(level_file)
        labels, dists = level["labels"], level["distances"]
        k = len(level["centroids"])
        sizes = np.bincount(labels, minlength=k)
        row_of_path = {store.paths[r]: i for i, r in enumerate(keep_rows)}
        picked = np.bincount(labels[[row_of_path[p] for p in clustered]], minlength=k)
        lines += [
            f"Levels (clusters): {', '.join(map(str, counts.get('levels', [k])))}. Level-1 cluster sizes: min "
            f"{sizes.min()}, median {int(np.median(sizes))}, max {sizes.max()}; picked per cluster: min "
            f"{picked.min()}, median {int(np.median(picked))}, max {picked.max()}.",
            "",
            "![cluster sizes](cluster_sizes.png)",
            "",
        ]
        _histogram(out / "cluster_sizes.png", sizes, picked)
        order = np.argsort(-sizes, kind="stable")
        shown = list(dict.fromkeys([*order[:3], *order[len(order) // 2 : len(order) // 2 + 2], *order[-2:]]))
        rows, titles = [], []
        for c in shown:
            members = np.nonzero(labels == c)[0]
            members = members[np.argsort(dists[members], kind="stable")][:10]
            rows.append([store.records[keep_rows[m]] for m in members])
            titles.append(f"cluster {c} ({sizes[c]})")
        _contact_sheet(out / "clusters.png", source, rows, titles)
        lines += ["Some level-1 clusters (largest, middle, smallest), nearest the centroid first:", ""]
        lines += ["![clusters](clusters.png)", ""]
    lines += [
        "Files: `selection.txt` (train with `data.path=selection.txt`), `mix.yaml` (`data.path=mix.yaml`), "
        "`duplicates.csv`, `clustered.txt`, `retrieved.txt`, `retrieval.csv`, `kmeans/level*.npz`.",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
