#!/usr/bin/env bash
# One device call: GPU correctness of the backbones against the CPU float32 reference, then inference
# throughput against timm (eager and compiled, bf16). Prints a short table last.
# Run from the repo root on the device machine:  bash benchmarks/gpu_check.sh
set -euo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

python3 - <<'PY'
import torch
from opendino.models import build_model

torch.manual_seed(0)
rows = []
for name in ("vits16plus", "vitb16", "convnext_tiny"):
    model = build_model(name).eval()
    x = torch.randn(4, 3, 224, 224)
    with torch.inference_mode():
        ref = model.forward_features(x)["x_norm_patchtokens"]
        gpu = model.cuda()
        fp32 = gpu.forward_features(x.cuda())["x_norm_patchtokens"].cpu()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = gpu.forward_features(x.cuda())["x_norm_patchtokens"].float().cpu()
    rows.append((name, (fp32 - ref).abs().max().item(), (bf16 - ref).abs().max().item()))
print("| model | GPU fp32 vs CPU max diff | GPU bf16 vs CPU max diff |")
print("|---|---|---|")
for name, a, b in rows:
    print(f"| {name} | {a:.1e} | {b:.1e} |")
PY

python3 benchmarks/infer.py --device cuda --batch-size 128 --iters 20 --warmup 3
python3 benchmarks/infer.py --device cuda --batch-size 128 --iters 20 --warmup 3 --compile
