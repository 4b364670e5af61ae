"""Feature-extraction throughput of OpenDINO's ViTs against timm's DINOv3 models, in one process.

CPU: fp32 with a fixed number of threads. GPU: bf16 autocast (optionally torch.compile for both).
Prints a markdown table; paste it into docs/benchmarks.md with the machine, command and date.

    python benchmarks/infer.py --device cpu --threads 2
    python benchmarks/infer.py --device cuda --batch-size 64 --compile
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from opendino.models import build_model

PEERS = {"vits16": "vit_small_patch16_dinov3_qkvb", "vitb16": "vit_base_patch16_dinov3_qkvb"}


def images_per_second(fn, x: torch.Tensor, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return iters * x.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--models", default="vits16,vitb16")
    args = parser.parse_args()

    import timm

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(args.batch_size, 3, args.resolution, args.resolution, device=device)
    rows = []
    for name in args.models.split(","):
        ours = build_model(name).to(device).eval()
        peer = timm.create_model(PEERS[name], pretrained=False, dynamic_img_size=True).to(device).eval()
        # Same weights in both, so the comparison also checks the outputs agree.
        peer.load_state_dict(timm.models.eva.checkpoint_filter_fn(ours.state_dict(), peer))
        results = {}
        for label, model in (("opendino", ours), ("timm", peer)):
            fn = model.forward_features
            if args.compile:
                fn = torch.compile(fn)

            def run(inp, fn=fn):
                with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    return fn(inp)

            results[label] = (images_per_second(run, x, args.warmup, args.iters), run(x[:2]))
        a, b = results["opendino"][1], results["timm"][1]
        ours_tokens = torch.cat([a["x_norm_clstoken"][:, None], a["x_storage_tokens"], a["x_norm_patchtokens"]], 1)
        diff = (ours_tokens.float() - b.float()).abs().max().item()
        rows.append((name, results["opendino"][0], results["timm"][0], diff))

    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or 'cpu'}"
    print(
        f"\ndevice: {dev}; threads {args.threads}; batch {args.batch_size}; {args.resolution}px; dtype {dtype}; "
        f"compile {args.compile}; torch {torch.__version__}; timm {timm.__version__}\n"
    )
    print("| model | OpenDINO images/s | timm images/s | ratio | max abs diff of outputs |")
    print("|---|---|---|---|---|")
    for name, ours, theirs, diff in rows:
        print(f"| {name} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
