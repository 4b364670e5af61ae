"""``opendino curate``: a pool of images -> a curated training list, every stage resumable.

Stages, each writing into the curation folder: embed (``embeddings/``), dedup (``duplicates.csv``),
hierarchical k-means (``kmeans/``), balanced sampling (``clustered.txt``), retrieval around a seed set
(``retrieved.txt``, ``retrieval.csv``), then ``selection.txt`` (the clustered picks, then the retrieved
images not already in them), ``mix.yaml`` and ``report.md``. ``curate.json`` records the settings each
finished stage ran with: a rerun with ``--resume`` keeps every stage whose settings (and those of the
stages before it) are unchanged and redoes the rest; embedding is kept chunk by chunk.

Under torchrun every rank embeds its share of the chunks and holds its share of level 1 for the k-means
(a gloo group: the sums are small, CPU tensors); the other stages run on rank 0.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from opendino.config import ConfigError
from opendino.curate.dedup import DESCRIPTORS, deduplicate, nearest_neighbour_similarities
from opendino.curate.embed import EMBEDDINGS, EmbeddingStore, embed_pool
from opendino.curate.kmeans import Points, default_sample_sizes, hierarchical_kmeans
from opendino.curate.retrieval import nearest_in_pool
from opendino.curate.sampling import STRATEGIES, balanced_sample

SETTINGS_FILE = "curate.json"
NN_HISTOGRAM_MAX_POOL = 2_000_000  # the report's nearest-neighbour similarity histogram up to this size
STAGES = ("embed", "dedup", "kmeans", "sample", "retrieve", "mix")
# The settings each stage's own result depends on, and the stages whose results it reads.
STAGE_SETTINGS = {
    "embed": ("pool", "backbone", "resolution", "chunk", "dtype"),
    "dedup": ("dedup", "dedup_k", "dedup_on"),
    "kmeans": ("levels", "steps", "sample_sizes", "iterations", "seed"),
    "sample": ("size", "strategy", "multiplier"),
    "retrieve": ("seed_set", "per_seed"),
    "mix": ("mix", "homogeneous"),
}
STAGE_INPUTS = {
    "embed": (),
    "dedup": ("embed",),
    "kmeans": ("dedup",),
    "sample": ("kmeans",),
    "retrieve": ("dedup",),
    "mix": ("sample", "retrieve"),
}


def _upstream(stage: str) -> list[str]:
    """``stage`` and every stage whose result it reads, directly or not."""
    found = [stage]
    for before in STAGE_INPUTS[stage]:
        found += [s for s in _upstream(before) if s not in found]
    return found


def _downstream(stage: str) -> list[str]:
    """``stage`` and every stage that reads its result, directly or not."""
    return [s for s in STAGES if stage in _upstream(s)]


@dataclasses.dataclass
class CurateConfig:
    pool: str  # image folder, .txt/.csv list, or tar shards
    out: str  # the curation folder
    size: int = 0  # images the balanced sampling picks (0: none, only retrieval)
    backbone: str | None = None  # run folder, checkpoint file or model name
    levels: list[int] = dataclasses.field(default_factory=list)  # clusters per level, decreasing; []: auto
    steps: list[int] = dataclasses.field(default_factory=list)  # k-means runs per level; []: 1, then 10
    sample_sizes: list[int] = dataclasses.field(default_factory=list)  # per level; []: half the mean cluster
    iterations: int = 50  # Lloyd updates per k-means
    strategy: str = "random"  # leaf picks: random | closest
    multiplier: int = 1  # the most times one image may be picked
    dedup: float | None = None  # near-duplicate cosine threshold (exact copies always go)
    dedup_k: int = 16  # neighbours searched per image for near-duplicates
    dedup_on: str = "thumbnail"  # the near-duplicate descriptor: thumbnail | embedding
    seed_set: str | None = None  # a folder (or list) of seed images to retrieve around
    per_seed: int = 4  # neighbours retrieved per seed image
    mix: list[str] = dataclasses.field(default_factory=list)  # NAME[=PATH]:WEIGHT entries of mix.yaml
    homogeneous: str | None = None  # NAME:FRACTION of steps drawn from one source alone
    resolution: int = 224
    chunk: int = 4096  # images per embedding shard (what a kill can lose)
    batch_size: int = 64
    dtype: str = "fp32"
    device: str = "cpu"
    workers: int = 0
    seed: int = 0
    resume: bool = False
    progress: bool = True

    def check(self) -> None:
        if self.size < 0 or self.iterations < 1 or self.multiplier < 1 or self.chunk < 1 or self.per_seed < 1:
            raise ConfigError("--size >= 0, --iterations, --multiplier, --chunk and --per-seed >= 1")
        if self.size == 0 and self.seed_set is None:
            raise ConfigError("nothing to select: give --size N (balanced sampling) and/or --seed-set FOLDER")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"--strategy {self.strategy}; valid: {', '.join(STRATEGIES)}")
        if any(b >= a for a, b in zip(self.levels, self.levels[1:], strict=False)) or any(k < 1 for k in self.levels):
            raise ConfigError(f"--levels {self.levels}: cluster counts must be positive and decreasing")
        for name in ("steps", "sample_sizes"):
            values = getattr(self, name)
            if values and (len(values) != len(self.levels) or min(values) < 1):
                raise ConfigError(f"--{name.replace('_', '-')} {values}: one positive value per level of --levels")
        if self.dedup_on not in DESCRIPTORS:
            raise ConfigError(f"--dedup-on {self.dedup_on}; valid: {', '.join(DESCRIPTORS)}")
        if self.dedup is not None and not -1.0 <= self.dedup <= 1.0:
            raise ConfigError(f"--dedup {self.dedup}: a cosine similarity in [-1, 1]")
        if not Path(self.pool).exists() and not any(c in self.pool for c in "*?["):
            raise ConfigError(f"pool {self.pool}: no such folder, list or tar shard")
        if self.seed_set is not None and not Path(self.seed_set).exists():
            raise ConfigError(f"--seed-set {self.seed_set}: no such folder or list")
        if self.dedup_k < 1 or self.resolution < 1:
            raise ConfigError("--dedup-k and --resolution must be >= 1")
        parse_mix(self.mix, self.homogeneous, self.parts)

    @property
    def parts(self) -> tuple[str, ...]:
        """The curated parts this run makes."""
        return ("clustered",) * bool(self.size) + ("retrieved",) * (self.seed_set is not None)

    def stage_key(self, stage: str) -> dict:
        """The settings ``stage`` depends on: its own and those of every stage whose result it reads."""
        names = [n for s in STAGES if s in _upstream(stage) for n in STAGE_SETTINGS[s]]
        return {n: getattr(self, n) for n in names}


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        return float("nan")
    return value if math.isfinite(value) else float("nan")


def parse_mix(
    entries: list[str], homogeneous: str | None, parts: tuple[str, ...] = ("clustered", "retrieved")
) -> tuple[list[tuple[str, str | None, float]], tuple]:
    """``NAME=PATH:WEIGHT`` (a raw source) or ``NAME:WEIGHT`` (one of the curated ``parts`` this run makes)
    entries and ``NAME:FRACTION``; raw paths made absolute (the manifest lives elsewhere)."""
    parsed = []
    for entry in entries:
        head, _, weight = entry.rpartition(":")
        name, _, path = head.partition("=")
        value = _number(weight)
        if not name or not value > 0 or (not path and name not in parts):
            raise ConfigError(
                f"--mix {entry}: give NAME=PATH:WEIGHT for a source, or PART:WEIGHT for a part this run makes "
                f"({', '.join(parts) or 'none: give --size and/or --seed-set'}); weights finite and > 0"
            )
        if name in {e[0] for e in parsed}:
            raise ConfigError(f"--mix {entry}: the name {name} is given twice")
        parsed.append((name, os.path.abspath(path) if path else None, value))
    homog = ()
    if homogeneous is not None:
        name, _, fraction = homogeneous.rpartition(":")
        value = _number(fraction)
        known = sorted({p[0] for p in parsed} or set(parts))
        if name not in known or not 0.0 <= value <= 1.0:
            raise ConfigError(f"--homogeneous {homogeneous}: NAME:FRACTION, NAME one of {known}, FRACTION 0..1")
        homog = (name, value)
    return parsed, homog


class _Stages:
    """The record of finished stages in ``curate.json``, re-read on every question: rank 0 writes it
    (atomically) and the other ranks must see the same answers."""

    def __init__(self, config: CurateConfig) -> None:
        self.config, self.file = config, Path(config.out) / SETTINGS_FILE

    def _read(self) -> dict:
        return json.loads(self.file.read_text())["stages"] if self.file.exists() else {}

    def is_done(self, stage: str) -> bool:
        return self._read().get(stage) == _plain(self.config.stage_key(stage))

    def _write(self, done: dict) -> None:
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"stages": done}, indent=1))
        os.replace(tmp, self.file)

    def invalidate(self, stage: str) -> None:
        """Before ``stage`` rewrites its outputs: it and every stage reading them are no longer done."""
        done = self._read()
        self._write({k: v for k, v in done.items() if k not in _downstream(stage)})

    def finish(self, stage: str) -> None:
        self.invalidate(stage)
        self._write({**self._read(), stage: self.config.stage_key(stage)})


def _plain(settings: dict) -> dict:
    """As stored in JSON (tuples become lists)."""
    return json.loads(json.dumps(settings))


def _claim(folder: Path, settings: dict) -> None:
    """A folder of partial results of one stage, marked with its settings; partial results of other
    settings are removed first (rank 0 only)."""
    marker = folder / "settings.json"
    if folder.exists() and (not marker.exists() or json.loads(marker.read_text()) != _plain(settings)):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(settings))
    os.replace(tmp, marker)


def _auto_levels(n: int) -> list[int]:
    levels, k = [], n // 16
    while k >= 2 and len(levels) < 3:
        levels.append(k)
        k //= 8
    return levels or [1]


def _write_list(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in lines))
    os.replace(tmp, path)


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def prepare_folder(config: CurateConfig) -> None:
    """Checks the folder against ``--resume`` before anything is written: embeddings (the costly part)
    made with other settings are never thrown away silently."""
    out = Path(config.out)
    if out.exists() and any(out.iterdir()) and not config.resume:
        raise ConfigError(f"--out {out} is not empty: pass --resume to continue it, or choose a new folder")
    marker = out / EMBEDDINGS / "settings.json"
    key = _plain(config.stage_key("embed"))
    if config.resume and marker.exists() and json.loads(marker.read_text()) != key:
        stored = json.loads(marker.read_text())
        changed = sorted(k for k in key if stored.get(k) != key[k])
        raise ConfigError(
            f"--resume {out}: its embeddings were made with another {', '.join(changed)}; use a new --out"
        )


def run_curation(config: CurateConfig) -> dict:
    """Runs (or resumes) every stage; returns the counts the report shows."""
    from opendino.data.sources import open_source
    from opendino.models.registry import normalisation

    config.check()
    prepare_folder(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = _Stages(config)
    source = open_source(os.path.abspath(config.pool))  # absolute paths: the lists are read from elsewhere
    if len(source) == 0:
        raise ConfigError(f"pool {config.pool}: no images found")
    pool_size = out / EMBEDDINGS / "pool.json"  # chunk i is records [i * chunk, ...): the pool must not move
    if pool_size.exists() and json.loads(pool_size.read_text())["records"] != len(source):
        before = json.loads(pool_size.read_text())["records"]
        raise ConfigError(
            f"pool {config.pool} changed since it was embedded ({before} -> {len(source)} images): use a new --out"
        )
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

    if not stages.is_done("embed"):
        if config.backbone is None:
            raise ConfigError(
                "--backbone is needed to embed the pool: a run folder, a checkpoint file, or a model name "
                "(a model name alone has random weights: for trying the tool, not for curating)"
            )
        model = _backbone(config.backbone)
        if _is_main():
            stages.invalidate("embed")
            _claim(out / EMBEDDINGS, config.stage_key("embed"))
            pool_size.write_text(json.dumps({"records": len(source)}))
        _barrier()
        mean, std = normalisation(model)
        embed_pool(
            source,
            model,
            out,
            mean=mean,
            std=std,
            chunk=config.chunk,
            resolution=config.resolution,
            batch_size=config.batch_size,
            device=config.device,
            dtype=config.dtype,
            num_workers=config.workers,
            rank=rank,
            world_size=world,
            progress=config.progress and _is_main(),
        )
        _barrier()
        if _is_main():
            stages.finish("embed")
    _barrier()
    store = EmbeddingStore(out)
    if len(store) == 0:
        raise ConfigError(f"pool {config.pool}: none of its {len(source)} images could be read")
    counts = {"pool": len(source), "unreadable": len(store.skipped), "embedded": len(store)}

    if _is_main() and not stages.is_done("dedup"):
        stages.invalidate("dedup")  # from here on its files (and what was built on them) are being replaced
        (out / "nn_similarity.npy").unlink(missing_ok=True)
        result = deduplicate(store, config.dedup, config.dedup_k, config.dedup_on, progress=config.progress)
        np.save(out / "keep.npy", result.keep)
        lines = ["kept,removed,kind"]
        for row in np.nonzero(~result.keep)[0]:
            kind = "near" if result.distinct[row] else "exact"
            lines.append(f"{store.paths[result.group[row]]},{store.paths[row]},{kind}")
        _write_list(out / "duplicates.csv", lines)
        (out / "dedup.json").write_text(json.dumps({"exact": result.exact, "near": result.near}))
        distinct = np.nonzero(result.distinct)[0]
        if 1 < len(distinct) <= NN_HISTOGRAM_MAX_POOL:  # a sample against the whole pool: cheap up to here
            sims = nearest_neighbour_similarities(store, distinct, descriptor=config.dedup_on, progress=config.progress)
            np.save(out / "nn_similarity.npy", sims)
        stages.finish("dedup")
    _barrier()
    keep_rows = np.nonzero(np.load(out / "keep.npy"))[0]
    counts |= json.loads((out / "dedup.json").read_text()) | {"kept": len(keep_rows)}
    if config.size > len(keep_rows) * config.multiplier:
        raise ConfigError(
            f"--size {config.size} is more than the {len(keep_rows)} images left after deduplication "
            f"(x --multiplier {config.multiplier}): lower --size or raise --multiplier"
        )

    levels = config.levels or _auto_levels(len(keep_rows))
    kdir = out / "kmeans"
    if config.size and not stages.is_done("kmeans"):
        if levels[0] > len(keep_rows):
            raise ConfigError(f"--levels {levels}: {levels[0]} clusters of only {len(keep_rows)} images")
        if _is_main():
            stages.invalidate("kmeans")
            _claim(kdir, config.stage_key("kmeans"))
        _barrier()
        sample_sizes = config.sample_sizes or default_sample_sizes(len(keep_rows), levels)
        # Level 1 runs once (the web configuration's level 1: resampling it would re-cluster half the pool
        # in memory at every step); the upper levels resample 10 times where there is something to sample.
        steps = config.steps or [1] + [10 if s > 1 else 1 for s in sample_sizes[1:]]
        search = "faiss" if config.device == "cpu" else config.device  # on a GPU: torch's matrix product
        points = Points(len(keep_rows), store.dim, lambda pos: store.take(keep_rows[pos]), sharded=True, device=search)
        tree = hierarchical_kmeans(
            points,
            levels,
            steps=steps,
            sample_sizes=sample_sizes,
            iterations=config.iterations,
            seed=config.seed,
            folder=kdir,
            progress=config.progress and _is_main(),
        )
        if _is_main():
            for depth, level in enumerate(tree):
                np.savez(kdir / f"level{depth + 1}.npz", **dataclasses.asdict(level))
            stages.finish("kmeans")
    _barrier()
    if not _is_main():
        return counts

    clustered: list[str] = []
    if config.size:
        tree = [np.load(kdir / f"level{d + 1}.npz") for d in range(len(levels))]
        counts["levels"] = levels
        if not stages.is_done("sample"):
            stages.invalidate("sample")
            rng = np.random.default_rng(np.random.SeedSequence([config.seed, 4]))
            picks = balanced_sample(
                tree[0]["labels"],
                tree[0]["distances"],
                [t["labels"] for t in tree[1:]],
                config.size,
                n_clusters=[len(t["centroids"]) for t in tree],
                multiplier=config.multiplier,
                strategy=config.strategy,
                rng=rng,
            )
            _write_list(out / "clustered.txt", [store.paths[keep_rows[p]] for p in picks])
            stages.finish("sample")
        clustered = (out / "clustered.txt").read_text().splitlines()
    counts["clustered"] = len(clustered)

    retrieved: list[str] = []
    if config.seed_set is not None:
        if not stages.is_done("retrieve"):
            stages.invalidate("retrieve")
            retrieved = _retrieve(config, store, keep_rows, out)
            stages.finish("retrieve")
        retrieved = (out / "retrieved.txt").read_text().splitlines()
    counts["retrieved"] = len(retrieved)
    picked = set(clustered)
    selection = clustered + [p for p in retrieved if p not in picked]
    _write_list(out / "selection.txt", selection)
    counts["selection"] = len(selection)
    if not stages.is_done("mix"):
        stages.invalidate("mix")
        _write_mix(config, out, bool(clustered), bool(retrieved))
        stages.finish("mix")
    from opendino.curate.report import write_report

    write_report(out, counts, source, store, keep_rows, clustered, config.dedup)
    return counts


def _backbone(name: str):
    """The embedding model; a model name alone gets the same random weights in every process (a resumed
    or multi-rank run must embed with one model)."""
    from opendino.runs import load_backbone

    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return load_backbone(name, "--backbone")
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise ConfigError(f"--backbone {name}: cannot be loaded ({e})") from None


def _retrieve(config: CurateConfig, store: EmbeddingStore, keep_rows: np.ndarray, out: Path) -> list[str]:
    from opendino.data.sources import open_source
    from opendino.eval.features import extract_features
    from opendino.models.registry import normalisation

    model = _backbone(config.backbone)  # the embeddings' own: --resume refuses another
    mean, std = normalisation(model)
    seeds = open_source(config.seed_set)
    if len(seeds) == 0:
        raise ConfigError(f"--seed-set {config.seed_set}: no images found")
    feats = extract_features(
        model,
        seeds,
        mean=mean,
        std=std,
        resolution=config.resolution,
        batch_size=config.batch_size,
        device=config.device,
        dtype=config.dtype,
        num_workers=config.workers,
        keep_patch=False,
        progress=config.progress,
    )
    queries = torch.nn.functional.normalize(feats.cls.float(), dim=-1).numpy()
    sims, found = nearest_in_pool(store, keep_rows, queries, config.per_seed, progress=config.progress)
    lines, retrieved, seen = ["seed,neighbour,similarity"], [], set()
    for seed_path, row_sims, row_found in zip(feats.paths, sims, found, strict=True):
        for sim, pos in zip(row_sims, row_found, strict=True):
            path = store.paths[keep_rows[pos]]
            lines.append(f"{seed_path},{path},{sim:.4f}")
            if path not in seen:
                seen.add(path)
                retrieved.append(path)
    _write_list(out / "retrieval.csv", lines)
    _write_list(out / "retrieved.txt", retrieved)
    return retrieved


def _write_mix(config: CurateConfig, out: Path, clustered: bool, retrieved: bool) -> None:
    from opendino.data.mix import write_manifest

    entries, homogeneous = parse_mix(config.mix, config.homogeneous)
    parts = {"clustered": clustered, "retrieved": retrieved}
    if not entries:  # the curated parts in proportion to their sizes: the same as selection.txt
        sizes = {n: len((out / f"{n}.txt").read_text().splitlines()) for n, ok in parts.items() if ok}
        entries = [(n, None, float(s)) for n, s in sizes.items() if s]
    sources = []
    for name, path, weight in entries:
        if path is None and not parts[name]:
            raise ConfigError(f"--mix {name}:{weight}: there is no {name} part (it needs --size / --seed-set)")
        sources.append((name, path or f"{name}.txt", weight))
    write_manifest(out / "mix.yaml", sources, homogeneous or None)
