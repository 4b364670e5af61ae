"""ONNX export on the CPU: onnxruntime against PyTorch eager on the same backbone and inputs (docs/benchmarks.md).

Exports a named architecture (random weights: speed does not depend on them) with a dynamic batch, checks
the outputs agree, then times both at ``--batch`` × ``--resolution``² images, median of ``--repeats``:

    python benchmarks/onnx_cpu.py --model vits16 --resolution 224 --batch 8
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

from opendino.deploy.onnx import check_onnx, export_backbone
from opendino.models import load_model


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vits16")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = load_model(args.model).eval()
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_backbone(model, Path(tmp) / "m.onnx", args.resolution, dynamic=True)
        diff = check_onnx(exported.path, exported.module, exported.check_inputs)
        session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
        x = torch.randn(args.batch, 3, args.resolution, args.resolution)
        feed = {"images": x.numpy()}

        def torch_run() -> None:
            with torch.inference_mode():
                exported.module(x)

        eager = _median_seconds(torch_run, args.repeats)
        onnx = _median_seconds(lambda: session.run(None, feed), args.repeats)
    images = args.batch
    print(
        f"{args.model}, batch {args.batch} × {args.resolution}², {torch.get_num_threads()} threads; |diff| {diff:.1e}"
    )
    print("| runtime | s / batch | images / s |")
    print("|---|---|---|")
    print(f"| PyTorch eager | {eager:.3f} | {images / eager:.1f} |")
    print(f"| onnxruntime | {onnx:.3f} | {images / onnx:.1f} |")
    print(f"onnxruntime / PyTorch: {eager / onnx:.2f}×")


if __name__ == "__main__":
    main()
