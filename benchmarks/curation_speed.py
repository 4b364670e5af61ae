"""Curation speed on this machine: the hierarchical k-means over memory-mapped embeddings, and the embedding
throughput of ``curate``'s embed stage against ``opendino extract`` on the same model.

    python benchmarks/curation_speed.py kmeans --n 1000000 --dim 384 --levels 1000,100,10 --iterations 10
    python benchmarks/curation_speed.py embed --images 512 --model vits16 --resolution 112

``kmeans`` writes ``--n`` x ``--dim`` float32 points (a mixture of Gaussians, unit length) to a ``.npy``
file, memory-maps it and runs ``hierarchical_kmeans`` on it, timing each level and one assignment pass
(the per-point cost every Lloyd update pays) and recording the peak anonymous memory (RssAnon, sampled every
0.1 s: the process's own allocations, not the file pages of the memory map, which the kernel can drop).
``embed`` times ``extract_features`` on a folder and ``embed_pool`` on the same folder (they share the
code path; the difference is the shard writes and pixel digests).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from opendino.curate.kmeans import Points, assign, default_sample_sizes, hierarchical_kmeans


def _rss_anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PeakMemory:
    """The peak of RssAnon while the block runs."""

    def __enter__(self) -> PeakMemory:
        self.peak, self._stop = _rss_anon_mib(), threading.Event()

        def poll():
            while not self._stop.wait(0.1):
                self.peak = max(self.peak, _rss_anon_mib())

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def write_points(path: Path, n: int, dim: int, centres: int, seed: int = 0, chunk: int = 65536) -> None:
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(centres, dim)).astype(np.float32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        x = means[rng.integers(centres, size=b - a)] + 0.5 * rng.normal(size=(b - a, dim)).astype(np.float32)
        out[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    del out


def bench_kmeans(args: argparse.Namespace) -> dict:
    levels = [int(v) for v in args.levels.split(",")]
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        path = Path(tmp) / "points.npy"
        start = time.perf_counter()
        write_points(path, args.n, args.dim, centres=max(levels) * 2)
        print(
            f"wrote {args.n} x {args.dim} float32 ({path.stat().st_size / 2**30:.2f} GiB) "
            f"in {time.perf_counter() - start:.0f} s"
        )
        x = np.load(path, mmap_mode="r")
        points = Points(args.n, args.dim, lambda pos: x[pos])
        baseline = _rss_anon_mib()
        centroids = np.ascontiguousarray(x[: levels[0]])
        with PeakMemory() as peak_pass:
            start = time.perf_counter()
            assign(points, centroids)
            one_pass = time.perf_counter() - start
        sample_sizes = default_sample_sizes(args.n, levels)
        steps = [int(v) for v in args.steps.split(",")] if args.steps else [3] * len(levels)
        with PeakMemory() as peak:
            start = time.perf_counter()
            tree = hierarchical_kmeans(
                points,
                levels,
                steps=steps,
                sample_sizes=sample_sizes,
                iterations=args.iterations,
                folder=Path(tmp),
                progress=True,
            )
            total = time.perf_counter() - start
        times = sorted(Path(tmp).glob("level*_step*.npy"), key=lambda p: p.stat().st_mtime)
    sizes = np.bincount(tree[0].labels, minlength=levels[0])
    return {
        "n": args.n,
        "dim": args.dim,
        "levels": levels,
        "steps": steps,
        "sample_sizes": sample_sizes,
        "iterations": args.iterations,
        "seconds": total,
        "assign_pass_seconds": one_pass,
        "per_point_per_centroid_ns": one_pass / (args.n * levels[0]) * 1e9,
        "baseline_rss_anon_mib": baseline,
        "peak_rss_anon_mib": peak.peak,
        "peak_rss_anon_pass_mib": peak_pass.peak,
        "pool_fp32_mib": args.n * args.dim * 4 / 2**20,
        "level1_sizes": [int(sizes.min()), int(np.median(sizes)), int(sizes.max())],
        "step_files": len(times),
    }


def bench_embed(args: argparse.Namespace) -> dict:
    from opendino.curate.embed import embed_pool
    from opendino.data.sources import open_source
    from opendino.data.synthetic import write_image_folder
    from opendino.eval.features import extract_features
    from opendino.models import build_model
    from opendino.models.registry import normalisation

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        root = write_image_folder(Path(tmp) / "images", n=args.images, size=args.resolution)
        source = open_source(root)
        torch.manual_seed(0)
        model = build_model(args.model).eval()
        mean, std = normalisation(model)
        settings = {"mean": mean, "std": std, "resolution": args.resolution, "batch_size": args.batch_size}
        extract_features(model, source, indices=range(args.batch_size), progress=False, **settings)  # warm-up
        rows = {}
        for repeat in range(args.repeats):
            start = time.perf_counter()
            extract_features(model, source, keep_patch=False, progress=False, **settings)
            rows.setdefault("extract", []).append(args.images / (time.perf_counter() - start))
            start = time.perf_counter()
            embed_pool(source, model, Path(tmp) / f"curation{repeat}", chunk=args.chunk, progress=False, **settings)
            rows.setdefault("curate embed", []).append(args.images / (time.perf_counter() - start))
    return {
        k: {"images_per_s": [round(v, 1) for v in vals], "median": float(np.median(vals))} for k, vals in rows.items()
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="part", required=True)
    k = sub.add_parser("kmeans")
    k.add_argument("--n", type=int, default=1_000_000)
    k.add_argument("--dim", type=int, default=384)
    k.add_argument("--levels", default="1000,100,10")
    k.add_argument("--steps", default=None, help="k-means runs per level (default: 3 each)")
    k.add_argument("--iterations", type=int, default=10)
    e = sub.add_parser("embed")
    e.add_argument("--images", type=int, default=512)
    e.add_argument("--model", default="vits16")
    e.add_argument("--resolution", type=int, default=112)
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--chunk", type=int, default=4096)
    e.add_argument("--repeats", type=int, default=3)
    for q in (k, e):
        q.add_argument("--tmp", default=None, help="scratch folder (default: the system's)")
        q.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = p.parse_args()
    result = bench_kmeans(args) if args.part == "kmeans" else bench_embed(args)
    result["machine"] = (
        f"{platform.node()}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
