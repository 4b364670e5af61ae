#!/usr/bin/env bash
# One device call per part; each prints a short table last (every section's output is kept in $OUT/all.log).
#   part 1 (default): GPU correctness against the CPU; the captured step against the eager one and its
#     resume (capture_check.py); the ViT-S and ViT-B b64 training step eager (compiled) and captured, three
#     repeats each, ViT-S with its kernel profile and host synchronisations; ViT-S end to end from a JPEG
#     folder with the captured step; extraction against timm, both compiled, bf16, batch 256.
#   part 2: the data path alone (crops cut in the workers, on the GPU, JPEGs decoded on the GPU) and per
#     core; ViT-S end to end compiled; the [B, N, h, d] attention layout; ViT-L; eager extraction.
# Sections run in order of importance, each with its own limit, cut to what is left of the part's budget
# (GPU_CHECK_BUDGET seconds, default 560: one 600-second call with room for the table); a section that
# would get under 30 s is skipped and named in the table.
#   bash benchmarks/gpu_check.sh                   (from the repo root on the device machine)
#   GPU_CHECK_PART=2 bash benchmarks/gpu_check.sh
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}
PART=${GPU_CHECK_PART:-1}
BUDGET=${GPU_CHECK_BUDGET:-560}
START=$SECONDS
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
: >"$SUMMARY"
echo "gpu_check part $PART, $(date -u '+%F %T') UTC, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')" | tee -a "$SUMMARY"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$SUMMARY"
python3 -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)' | tee -a "$SUMMARY"
lscpu | grep -E "^(Core|Socket|Model name)" | tr -s ' ' | tee -a "$SUMMARY"

table() {  # table HEADER...: a blank line, then a table's header in the summary
    {
        printf '\n|'
        printf ' %s |' "$@"
        printf '\n|'
        printf -- '---|%.0s' "$@"
        printf '\n'
    } >>"$SUMMARY"
}
section() {  # section SECONDS COMMAND...: run with a limit, keep the lines that start with "|"
    local limit=$1 left=$((BUDGET - (SECONDS - START)))
    shift
    [ "$limit" -le "$left" ] || limit=$left
    if [ "$limit" -lt 30 ]; then
        echo "| SKIPPED (out of time): $* |" >>"$SUMMARY"
        return
    fi
    echo "== $* (limit ${limit}s, $(date +%T))"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/section.log"
    local rc=${PIPESTATUS[0]}
    cat "$OUT/section.log" >>"$OUT/all.log"
    grep '^|' "$OUT/section.log" >>"$SUMMARY"
    [ "$rc" -eq 0 ] || echo "| FAILED ($rc): $* |" >>"$SUMMARY"
}

STEP="python3 benchmarks/train_step.py --device cuda --steps 40 --warmup 3 --table"
COMPILED="--compile blocks+heads+losses"
E2E="python3 benchmarks/train_e2e.py --batch-size 64"

if [ "$PART" = 1 ]; then
    table model "GPU fp32 vs CPU max diff" "GPU bf16 vs CPU max diff"
    section 60 python3 - <<'PY'
import torch
from opendino.models import build_model

torch.manual_seed(0)
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
    echo >>"$SUMMARY"
    section 150 python3 benchmarks/capture_check.py  # its own table
    # The step on synthetic batches: 2x224 + 8x96, K=65536, drop path 0.3, bf16. Baseline: the eager step
    # with blocks, heads and losses compiled; against it, the whole step captured (not compiled).
    table "training step" s/step images/s "peak GiB" MFU
    section 150 $STEP --arch vit_small --batch-size 64 --repeats 3 $COMPILED --profile --sync-debug
    section 90 $STEP --arch vit_small --batch-size 64 --repeats 3 --compile none --capture
    section 130 $STEP --arch vit_base --batch-size 64 --repeats 3 $COMPILED
    section 90 $STEP --arch vit_base --batch-size 64 --repeats 3 --compile none --capture
    # End to end: JPEG folder -> 15 workers (decode, crop boxes) -> GPU (crops, photometric) -> captured step.
    section 120 $E2E --arch vit_small --steps 120 --workers 15 --crops-on-device --capture
    # Extraction at 224 px, bf16, batch 256: OpenDINO against timm, both compiled.
    echo >>"$SUMMARY"
    section 150 python3 benchmarks/infer.py --device cuda --batch-size 256 --iters 20 --warmup 3 --compile --models vits16
else
    # The trainer's batches without the step. Baseline: workers decode + cut uint8 crops + masks, the GPU
    # distorts; against it: workers decode and draw crop boxes, the GPU cuts (data.crops_on_device); then
    # workers read bytes, the GPU decodes (data.decode_on_device); and the loader alone (the workers' rate).
    table "data path" "" images/s "" ""
    section 90 $E2E --steps 200 --workers 15 --data-only device
    section 90 $E2E --steps 200 --workers 15 --data-only device --crops-on-device
    section 90 $E2E --steps 200 --workers 15 --data-only device --crops-on-device --decode-on-device
    section 80 $E2E --steps 200 --workers 15 --data-only loader --crops-on-device
    echo >>"$SUMMARY"
    section 80 python3 benchmarks/data.py --device cuda --n 64 --batch-size 64  # per core, batched stages
    table "training step" s/step images/s "peak GiB" MFU
    section 150 $E2E --arch vit_small --steps 80 --workers 15 --crops-on-device --compile
    section 100 $STEP --arch vit_small --batch-size 64 --repeats 3 --attention-layout bnhd $COMPILED
    section 100 $STEP --arch vit_large --batch-size 64 $COMPILED
    section 120 $STEP --arch vit_large --batch-size 32 $COMPILED
    echo >>"$SUMMARY"
    section 100 python3 benchmarks/infer.py --device cuda --batch-size 128 --iters 20 --warmup 3
fi

echo
echo "=== summary, part $PART ($((SECONDS - START)) s)"
cat "$SUMMARY"
