"""The viewer's click latency: a live ``opendino view`` server (real HTTP on loopback), one upload, the first
feature computation, then ``--clicks`` similarity requests (each a new patch, against a second cached image
too, as the page's correspondence view asks) timed from the client side (docs/benchmarks.md):

    python benchmarks/view_latency.py --model vits16 --resolution 512 --clicks 50

Random weights: the time does not depend on them. Target: a click under 100 ms on 2 CPU cores once the
image's features are cached.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
import urllib.request

import numpy as np
import torch
from PIL import Image

from opendino.models import load_model
from opendino.models.registry import normalisation
from opendino.view.server import FeatureViewer, running


def _post(url: str, body: bytes, kind: str = "application/json") -> dict:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": kind})
    with urllib.request.urlopen(request, timeout=300) as answer:
        return json.loads(answer.read())


def _photo(seed: int, side: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((side // 8, side // 8, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize((side, side), Image.BICUBIC).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vits16")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--clicks", type=int, default=50)
    args = parser.parse_args()

    model = load_model(args.model)
    viewer = FeatureViewer(model, *normalisation(model), name=args.model, resolution=args.resolution)
    with running(viewer) as url:
        started = time.perf_counter()
        first = _post(url + "/api/upload", _photo(0, 800), "application/octet-stream")["image"]
        second = _post(url + "/api/upload", _photo(1, 800), "application/octet-stream")["image"]
        uploaded = time.perf_counter()
        shape = _post(url + "/api/features", json.dumps({"image": first}).encode())
        loaded = time.perf_counter()
        _post(url + "/api/features", json.dumps({"image": second}).encode())
        h, w = shape["h"], shape["w"]
        rng = np.random.default_rng(0)
        times = []
        for _ in range(args.clicks):
            row, col = int(rng.integers(h)), int(rng.integers(w))
            body = json.dumps({"image": first, "row": row, "col": col, "other": second}).encode()
            t0 = time.perf_counter()
            answer = _post(url + "/api/similarity", body)
            times.append((time.perf_counter() - t0) * 1e3)
            assert len(answer["values"]) == h * w and len(answer["other"]["values"]) == h * w
    times.sort()
    print(f"{args.model}, {args.resolution} px ({h} x {w} patches), {torch.get_num_threads()} threads")
    print(f"  two uploads of 800 x 800 JPEGs: {(uploaded - started) * 1e3:.0f} ms")
    print(f"  first features (forward, PCA, pictures): {(loaded - uploaded) * 1e3:.0f} ms")
    print(
        f"  click (similarity over both images, {args.clicks} clicks): median {statistics.median(times):.1f} ms, "
        f"p95 {times[int(0.95 * (len(times) - 1))]:.1f} ms, max {times[-1]:.1f} ms"
    )


if __name__ == "__main__":
    main()
