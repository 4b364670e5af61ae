#!/usr/bin/env bash
# One device call: GPU correctness, the trainer's batches end to end from a JPEG folder (crops cut in the
# workers or on the GPU), the data pipeline per core and its batched GPU stages, the full training step
# (ViT-S/B, with its host synchronisations and profiles; ViT-S captured as one CUDA graph, after the
# captured-vs-eager test), ViT-S end to end, JPEGs decoded on the GPU, and extraction against timm, both
# compiled; optionally the captured ViT-B step, the [B, N, h, d] attention layout, the end-to-end trainer
# with crops cut in the workers, ViT-L and eager inference against timm. Prints a short table last; every
# section's output is kept in $OUT/all.log.
# Every section has its own time limit, so one slow part cannot take the others down; the default set fits
# one 10-minute device call.
#   bash benchmarks/gpu_check.sh                    (from the repo root on the device machine)
#   GPU_CHECK_ALL=1 bash benchmarks/gpu_check.sh    (also ViT-L, inference)
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
: >"$SUMMARY"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$SUMMARY"
python3 -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__, "specialize_float", torch._dynamo.config.specialize_float)' | tee -a "$SUMMARY"
section() {  # section SECONDS COMMAND... : run with a limit, keep the lines that start with "|"
    local limit=$1
    shift
    echo "== $* ($(date +%T))"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/section.log"
    local rc=${PIPESTATUS[0]}
    cat "$OUT/section.log" >>"$OUT/all.log"
    grep '^|' "$OUT/section.log" >>"$SUMMARY"
    [ "$rc" -eq 0 ] || echo "| FAILED ($rc): $* |" >>"$SUMMARY"
}

section 60 python3 - <<'PY'
import torch
from opendino.models import build_model

torch.manual_seed(0)
print("| model | GPU fp32 vs CPU max diff | GPU bf16 vs CPU max diff |")
print("|---|---|---|")
for name in ("vits16plus", "vitb16", "convnext_tiny"):
    model = build_model(name).eval()
    x = torch.randn(4, 3, 224, 224)
    with torch.inference_mode():
        ref = model.forward_features(x)["x_norm_patchtokens"]
        gpu = model.cuda()
        fp32 = gpu.forward_features(x.cuda())["x_norm_patchtokens"].cpu()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = gpu.forward_features(x.cuda())["x_norm_patchtokens"].float().cpu()
    print(f"| {name} | {(fp32 - ref).abs().max().item():.1e} | {(bf16 - ref).abs().max().item():.1e} |")
PY

# End to end, data only (#3): JPEG folder -> 15 workers -> GPU, the trainer's own batches without the step.
# Baseline: workers decode + cut uint8 crops + masks, the GPU distorts; against: workers only decode and draw
# crop boxes, the GPU cuts the crops too (data.crops_on_device); and that loader alone (the workers' rate).
lscpu | grep -E "^(Thread|Core|Socket|Model name)" | tr -s ' ' | sed 's/^/| cpu: /; s/$/ |/' | tee -a "$SUMMARY"
E2E="python3 benchmarks/train_e2e.py --batch-size 64 --steps 400"
section 120 $E2E --data-only device
section 120 $E2E --data-only device --crops-on-device
section 100 $E2E --data-only loader --crops-on-device
# Per core, and the batched stages (crops, photometric) alone on the GPU.
section 90 python3 benchmarks/data.py --device cuda --n 64 --batch-size 64

# The training step on synthetic batches: 2x224 + 8x96, K=65536, drop path 0.3, bf16, blocks, heads and
# losses compiled; the profiles (device kernels and host time per operator) go to all.log.
echo "| training step | s/step | images/s | peak GiB | MFU |" >>"$SUMMARY"
echo "|---|---|---|---|---|" >>"$SUMMARY"
STEP="python3 benchmarks/train_step.py --device cuda --steps 40 --warmup 3 --table --compile blocks+heads+losses"
section 120 python3 benchmarks/capture_check.py  # the captured step against the eager one, and its resume
section 100 $STEP --arch vit_small --batch-size 64 --profile --sync-debug --repeats 3
section 100 $STEP --arch vit_small --batch-size 64 --repeats 3 --compile none --capture
section 100 $STEP --arch vit_base --batch-size 64 --profile --repeats 3
# End to end with the step: JPEG folder -> workers (decode) -> GPU (crops, photometric) -> compiled step.
section 150 python3 benchmarks/train_e2e.py --arch vit_small --batch-size 64 --steps 80 --compile --crops-on-device
section 120 $E2E --data-only device --crops-on-device --decode-on-device
# Extraction at 224 px, bf16, batch 256: OpenDINO against timm, both compiled (#27).
section 150 python3 benchmarks/infer.py --device cuda --batch-size 256 --iters 20 --warmup 3 --compile --models vits16
if [ -n "${GPU_CHECK_ALL:-}" ]; then  # the rest, for a second call
    # The captured ViT-B step and the [B, N, h, d] attention layout against the model's (#27).
    section 100 $STEP --arch vit_base --batch-size 64 --repeats 3 --compile none --capture
    section 100 $STEP --arch vit_small --batch-size 64 --repeats 3 --attention-layout bnhd
    section 100 $STEP --arch vit_base --batch-size 64 --repeats 3 --attention-layout bnhd
    # End to end with the step, crops cut in the workers.
    section 130 python3 benchmarks/train_e2e.py --arch vit_small --batch-size 64 --steps 80 --compile
    section 100 $STEP --arch vit_large --batch-size 64
    section 150 $STEP --arch vit_large --batch-size 32
    section 150 $STEP --arch vit_large --batch-size 64 --ac selective
    section 120 python3 benchmarks/infer.py --device cuda --batch-size 128 --iters 20 --warmup 3
fi

echo
echo "=== summary ($(date -u +%F))"
cat "$SUMMARY"
