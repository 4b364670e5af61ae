"""Does curation help on a skewed pool? Raw pool, random subset, curated subset (hierarchical k-means and
balanced sampling), retrieval around a seed set, and their mix, at equal training steps.

The pool (benchmarks/curation_pool.py): 3,000 synthetic scenes whose classes follow a Zipf law (the
commonest 63x the rarest), 20% near-duplicates (re-encoded, shifted, rescaled or exact copies) and 5%
junk (blank, noise, gradients). The curation embedder is the raw-pool run of the first seed (DINOv3
curated with an earlier model trained on uncurated data); every other arm trains on a list
``opendino curate`` writes:

* ``raw``: every pool image; ``random``: ``--size`` images drawn uniformly (a new draw per seed);
* ``curated``: ``clustered.txt`` (exact and ``--dedup`` near-duplicates removed, the default
  three-level k-means, balanced sampling to ``--size``);
* ``retrieval``: ``retrieved.txt``, the ``--per-seed`` nearest pool images of each of a seed set of
  ``--seeds-per-class`` scenes per class (a held-out split: a small, balanced target set);
* ``mix``: ``mix.yaml``, clustered and retrieved images half and half plus the seed set, with 10% of
  steps drawn from the seed set alone (DINOv3's homogeneous ImageNet batches).

Every run trains the same ViT (``recipe_comparison.geometry``: 128 wide, 4 blocks, 8-pixel patches, 64-pixel
crops) for ``--steps`` steps of ``--batch`` images with the DINOv3 demo recipe, and is evaluated on a
class-balanced held-out set: k-NN top-1 (k = 20) per class and mean, and linear segmentation mIoU. The
selections are described by their class balance (normalised entropy of the class histogram, the share of
the three rarest classes), their junk and their duplicates (images whose original is already in the
selection).

    python benchmarks/curation_experiment.py --out runs/curation-experiment --seeds 0 1 2 \
        --figure docs/curation_experiment.png

``<out>/results.json`` keeps every finished run (a rerun continues); the table is printed last.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import shutil
import statistics
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from curation_pool import class_ranks, write_balanced_eval, write_skewed_pool  # noqa: E402
from recipe_comparison import geometry  # noqa: E402

from opendino.curate import CurateConfig, run_curation  # noqa: E402
from opendino.curate.embed import EmbeddingStore  # noqa: E402
from opendino.data.sources import open_source  # noqa: E402
from opendino.data.synthetic import CLASSES  # noqa: E402
from opendino.eval.data import open_labelled  # noqa: E402
from opendino.eval.features import cached_features  # noqa: E402
from opendino.eval.suite import _labels, random_init_like, resolve_model, run_tasks  # noqa: E402
from opendino.probes import knn_predict  # noqa: E402
from opendino.train.config import load_train_config  # noqa: E402
from opendino.train.trainer import Trainer  # noqa: E402

PRESET = Path(__file__).resolve().parents[1] / "configs" / "demo" / "pretrain.yaml"
ARMS = ("raw", "random", "curated", "retrieval", "mix")
RARE = 3  # the rarest classes whose share is reported


def make_data(args: argparse.Namespace) -> dict[str, Path]:
    data = args.out / "data"
    paths = {
        "pool": data / "pool" / "images",
        "manifest": data / "pool" / "pool.csv",
        "eval": data / "eval",
        "seeds": data / "seeds" / "test",
    }
    if not paths["manifest"].exists():
        write_skewed_pool(data / "pool", args.originals, size=64, seed=0, overwrite=True)
    if not (paths["eval"] / "val").exists():
        for split in ("train", "val"):
            write_balanced_eval(paths["eval"], args.eval_per_class, size=64, seed=0, split=split)
    if not paths["seeds"].exists():
        write_balanced_eval(data / "seeds", args.seeds_per_class, size=64, seed=0, split="test")
    return paths


def train(run: Path, data_path: Path, seed: int, args: argparse.Namespace) -> None:
    if (run / "teacher.safetensors").exists():
        return
    overrides = [
        *geometry("DINOv3", args),
        f"run.dir={run}",
        f"train.seed={seed}",
        f"train.steps={args.steps}",
        f"data.path={data_path}",
        "monitor.every=0",
        f"checkpoint.every={args.steps}",
    ]
    Trainer(load_train_config(PRESET, overrides)).run()


def evaluate(run: Path | None, model_like, args: argparse.Namespace, splits) -> dict:
    """k-NN (k = 20) per class and mean, linear segmentation mIoU; ``run=None``: the random twin."""
    model, info = resolve_model(model_like if run is None else run)
    if run is None:
        model = random_init_like(model)
    cache = args.out / "eval-cache"
    settings = {**info, "resolution": 64, "device": "cpu", "batch_size": 64, "progress": False, "cache": cache}
    results = run_tasks(model.eval(), splits, ("seg",), settings, log=lambda _: None)
    extract = {k: settings[k] for k in ("mean", "std", "resolution", "device", "batch_size", "progress")}
    feats = {s: cached_features(model, splits[s].paths, cache, keep_patch=True, **extract) for s in splits}
    labels = {}  # as ids of the synthetic world's classes (the folders' sorted order is another)
    for s in splits:
        _, folder_labels = _labels(splits[s], feats[s])
        labels[s] = torch.tensor([CLASSES.index(splits[s].classes[i]) for i in folder_labels.tolist()])
    predicted = knn_predict(feats["train"].cls, labels["train"], feats["val"].cls, ks=(20,), n_classes=len(CLASSES))[20]
    truth = labels["val"]
    per_class = [float((predicted[truth == c] == c).float().mean()) for c in range(len(CLASSES))]
    return {
        "knn": float((predicted == truth).float().mean()),
        "knn_per_class": per_class,
        "seg": results["seg"]["miou"],
    }


def selection_stats(paths: list[str], pool: dict[str, dict], ranks: list[int]) -> dict:
    """Class balance, junk and duplicates of a list of pool images (as training sees it)."""
    rows = [pool[str(Path(p).resolve())] for p in paths if str(Path(p).resolve()) in pool]
    labels = [int(r["label"]) for r in rows if r["kind"] != "junk"]
    counts = np.array([Counter(labels)[c] for c in range(len(CLASSES))], dtype=float)
    share = counts / max(counts.sum(), 1)
    entropy = -sum(p * math.log(p) for p in share if p > 0) / math.log(len(CLASSES))
    groups = Counter(int(r["group"]) for r in rows if r["kind"] != "junk")
    return {
        "images": len(paths),
        "entropy": entropy,
        "rare_share": float(share[ranks[-RARE:]].sum()),
        "rarest_count": int(counts[ranks[-1]]),
        "junk": sum(r["kind"] == "junk" for r in rows) / max(len(rows), 1),
        "redundant": sum(n - 1 for n in groups.values()) / max(len(rows), 1),
        "class_share": share.tolist(),
    }


def mix_draws(manifest: Path, steps: int, batch: int, seed: int) -> list[str]:
    """The images the mix sampler gives a run of ``steps`` steps (what training sees)."""
    from opendino.data.loader import StepBatchSampler

    source = open_source(manifest)
    sampler = StepBatchSampler(len(source), batch, seed=seed, mixture=source.mixture)
    return [source.path(ref.index) for s in range(steps) for ref in sampler.batch_at(s)]


def dedup_sweep(curation: Path, pool: dict[str, dict]) -> list[dict]:
    """Near-duplicate removal against the planted copies, for a few thresholds (reported, not used to
    choose ``--dedup``). A removal is right when the image kept in its place is a copy of the same original
    (or junk for junk: identical blanks); recall is the share of the planted surplus copies removed (every
    member of a group of copies but one)."""
    from opendino.curate.dedup import deduplicate

    store = EmbeddingStore(curation)
    rows = [pool[str(Path(p).resolve())] for p in store.paths]
    group = np.array([int(r["group"]) for r in rows])
    junk = np.array([r["kind"] == "junk" for r in rows])
    surplus = sum(n - 1 for g, n in Counter(group[~junk].tolist()).items())
    out = []
    for threshold in (None, 0.9, 0.95, 0.98, 0.99):
        result = deduplicate(store, threshold, progress=False)
        removed = np.nonzero(~result.keep)[0]
        kept_for = result.group[removed]
        right = ((group[removed] == group[kept_for]) & ~junk[removed]) | (junk[removed] & junk[kept_for])
        out.append(
            {
                "threshold": threshold,
                "removed": len(removed),
                "precision": float(right.mean()) if len(removed) else 1.0,
                "recall": float(right[~junk[removed]].sum() / max(surplus, 1)),
            }
        )
    return out


SWEEP_LEVELS = ([204, 25, 3], [200, 50, 10], [100, 10], [50, 10], [10])


def levels_sweep(args: argparse.Namespace, pool: dict[str, dict], ranks: list[int]) -> dict:
    """The class balance of the balanced sample for several cluster trees, for each embedder (the
    embeddings and the dedup of each curation folder reused; no training). Label-aware: a sensitivity
    analysis, not a way to choose the levels of the trained arms."""
    rows = {}
    for name in ("curation", "curation-strong"):
        source = args.out / name
        if not (source / "embeddings").exists():
            continue
        for levels in SWEEP_LEVELS:
            out = args.out / "sweep" / f"{name}-{'-'.join(map(str, levels))}"
            if not out.exists():
                shutil.copytree(source / "embeddings", out / "embeddings")
                for f in ("keep.npy", "dedup.json"):
                    shutil.copy(source / f, out / f)
                done = json.loads((source / "curate.json").read_text())["stages"]
                (out / "curate.json").write_text(json.dumps({"stages": {k: done[k] for k in ("embed", "dedup")}}))
            stored = json.loads((out / "curate.json").read_text())["stages"]["embed"]
            config = CurateConfig(**{**stored, "out": str(out), "size": args.size, "dedup": args.dedup})
            config.levels, config.steps, config.resume, config.progress = levels, [10] * len(levels), True, False
            run_curation(config)
            picked = (out / "clustered.txt").read_text().splitlines()
            stats = selection_stats(picked, pool, ranks)
            rows[f"{name} {levels}"] = {k: stats[k] for k in ("entropy", "rare_share", "rarest_count", "junk")}
            print(
                f"{name:<16} levels {str(levels):<15} "
                + " ".join(f"{k} {v:.3f}" for k, v in rows[f"{name} {levels}"].items())
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/curation-experiment"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--originals", type=int, default=3000, help="original scenes in the pool")
    p.add_argument("--size", type=int, default=1000, help="images of the random and curated subsets")
    p.add_argument("--dedup", type=float, default=0.95, help="near-duplicate cosine threshold of the curation")
    p.add_argument("--seeds-per-class", type=int, default=5, help="seed-set scenes per class (retrieval)")
    p.add_argument("--per-seed", type=int, default=20, help="pool images retrieved per seed")
    p.add_argument("--eval-per-class", type=int, default=50)
    p.add_argument("--steps", type=int, default=160, help="training steps of every run")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--figure", type=Path, default=None)
    p.add_argument("--only-embedder", action="store_true", help="stop after the raw run the curation embeds with")
    p.add_argument("--levels-sweep", action="store_true", help="only the class balance of other cluster trees")
    p.add_argument(
        "--strong-embedder",
        type=Path,
        default=None,
        help="also curate with this run as the embedder (arm curated-strong), e.g. a demo run of the uniform world",
    )
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = make_data(args)
    with data["manifest"].open(newline="") as f:
        pool = {str((data["manifest"].parent / r["path"]).resolve()): r for r in csv.DictReader(f)}
    ranks = class_ranks(0)  # class ids, commonest first
    splits = open_labelled(data["eval"])
    if args.levels_sweep:
        (args.out / "levels_sweep.json").write_text(json.dumps(levels_sweep(args, pool, ranks), indent=1))
        return
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}

    def save():
        results_file.write_text(json.dumps(results, indent=1))

    runs = args.out / "runs"
    first = args.seeds[0]
    train(runs / f"raw-seed{first}", data["pool"], first, args)
    if args.only_embedder:
        return
    curation = args.out / "curation"
    weights = ["clustered:0.49", "retrieved:0.49", f"seeds={data['seeds']}:0.02"]
    config = CurateConfig(
        pool=str(data["pool"]),
        out=str(curation),
        size=args.size,
        backbone=str(runs / f"raw-seed{first}"),
        levels=[204, 25, 3],  # the automatic levels of the 3,278 images left after dedup (about n/16, /8, /8)
        steps=[10, 10, 10],  # the reported run resampled every level (the default then; level 1 now runs once)
        dedup=args.dedup,
        seed_set=str(data["seeds"]),
        per_seed=args.per_seed,
        mix=weights,
        homogeneous="seeds:0.1",
        resolution=64,
        resume=True,
        progress=False,
    )
    results["curation"] = run_curation(config)
    results["dedup_sweep"] = dedup_sweep(curation, pool)
    save()
    lists = {
        "raw": data["pool"],
        "curated": curation / "clustered.txt",
        "retrieval": curation / "retrieved.txt",
        "mix": curation / "mix.yaml",
    }
    arms = list(ARMS)
    if args.strong_embedder is not None:  # the same curation with an embedder that tells the classes apart
        strong = args.out / "curation-strong"
        settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("mix", "homogeneous")}
        settings |= {"out": str(strong), "backbone": str(args.strong_embedder), "seed_set": None}
        results["curation_strong"] = run_curation(CurateConfig(**settings))
        save()
        lists["curated-strong"] = strong / "clustered.txt"
        arms.append("curated-strong")
    all_images = sorted(pool)
    for seed in args.seeds:
        rng = np.random.default_rng(seed)
        random_list = args.out / f"random-seed{seed}.txt"
        random_list.write_text(
            "".join(f"{all_images[i]}\n" for i in np.sort(rng.choice(len(all_images), args.size, False)))
        )
        for arm in arms:
            key = f"{arm}|{seed}"
            if key in results:
                continue
            data_path = random_list if arm == "random" else lists[arm]
            train(runs / f"{arm}-seed{seed}", data_path, seed, args)
            if arm == "mix":  # class balance and junk of the draws, duplicates among the images drawn
                seen = mix_draws(lists["mix"], args.steps, args.batch, seed)
                stats = selection_stats(seen, pool, ranks) | {
                    "redundant": selection_stats(sorted(set(seen)), pool, ranks)["redundant"]
                }
            else:
                seen = all_images if arm == "raw" else [r[0] for r in open_source(data_path).records]
                stats = selection_stats(seen, pool, ranks)
            results[key] = {**evaluate(runs / f"{arm}-seed{seed}", None, args, splits), "selection": stats}
            save()
            print(f"{key}: knn {results[key]['knn']:.3f} seg {results[key]['seg']:.3f}", flush=True)
    if "random_init" not in results:
        results["random_init"] = evaluate(None, runs / f"raw-seed{first}", args, splits)
        save()
    summary = table(results, args, ranks)
    if args.figure:
        figure(summary, results, args, ranks)


def _ms(values: list[float]) -> str:
    mean = statistics.mean(values)
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}"


def table(results: dict, args: argparse.Namespace, ranks: list[int]) -> dict:
    c = results["curation"]
    print(
        f"\npool {c['pool']} images -> {c['kept']} after dedup ({c['exact']} exact, {c['near']} near at "
        f"cos > {args.dedup}); clustered {c['clustered']}, retrieved {c['retrieved']}; levels {c.get('levels')}"
    )
    print(
        "\ndedup sweep (against the planted copies): "
        + "; ".join(
            f"{d['threshold'] or 'exact only'}: removed {d['removed']}, precision {d['precision']:.2f}, "
            f"recall {d['recall']:.2f}"
            for d in results["dedup_sweep"]
        )
    )
    rare = ", ".join(CLASSES[r] for r in ranks[-RARE:])
    print(f"\n{len(args.seeds)} seeds {args.seeds}; {args.steps} steps of {args.batch} images; rare = {rare}")
    print("| arm | images | class entropy | rare share | junk | redundant | k-NN mean | k-NN rare | seg mIoU |")
    print("|---|---|---|---|---|---|---|---|---|")
    summary = {}
    for arm in [*ARMS, "curated-strong"]:
        entries = [results[f"{arm}|{s}"] for s in args.seeds if f"{arm}|{s}" in results]
        if not entries:
            continue
        sel = [e["selection"] for e in entries]
        rare_knn = [statistics.mean(e["knn_per_class"][r] for r in ranks[-RARE:]) for e in entries]
        summary[arm] = {
            "knn_per_class": np.mean([e["knn_per_class"] for e in entries], 0).tolist(),
            "class_share": np.mean([s["class_share"] for s in sel], 0).tolist(),
        }
        print(
            f"| {arm} | {statistics.mean(s['images'] for s in sel):.0f} | {_ms([s['entropy'] for s in sel])} | "
            f"{_ms([s['rare_share'] for s in sel])} | {_ms([s['junk'] for s in sel])} | "
            f"{_ms([s['redundant'] for s in sel])} | {_ms([e['knn'] for e in entries])} | {_ms(rare_knn)} | "
            f"{_ms([e['seg'] for e in entries])} |"
        )
    r = results["random_init"]
    rare_r = statistics.mean(r["knn_per_class"][c] for c in ranks[-RARE:])
    print(f"| random init | — | — | — | — | — | {r['knn']:.3f} | {rare_r:.3f} | {r['seg']:.3f} |")
    print("\nk-NN per class (mean over seeds), commonest class first:")
    print("| arm | " + " | ".join(CLASSES[c] for c in ranks) + " |")
    print("|---" * (len(ranks) + 1) + "|")
    for arm, s in summary.items():
        print(f"| {arm} | " + " | ".join(f"{s['knn_per_class'][c]:.2f}" for c in ranks) + " |")
    return summary


def figure(summary: dict, results: dict, args: argparse.Namespace, ranks: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    x = np.arange(len(ranks))
    width = 0.8 / len(summary)
    for i, (arm, s) in enumerate(summary.items()):
        axes[0].bar(x + i * width, [s["class_share"][c] for c in ranks], width, label=arm)
        axes[1].bar(x + i * width, [s["knn_per_class"][c] for c in ranks], width, label=arm)
    for ax, title in zip(axes, ("class share of what training sees", "k-NN top-1 per class (held-out)"), strict=True):
        ax.set_xticks(x + 0.4 - width / 2, [CLASSES[c] for c in ranks], rotation=45, fontsize=8)
        ax.set_title(title, fontsize=10)
    axes[0].axhline(0.1, color="grey", lw=0.8, ls="--")
    axes[0].set_xlabel("classes, commonest in the pool first", fontsize=8)
    axes[1].legend(fontsize=8, ncol=2)
    fig.tight_layout()
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=110)
    print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
