"""Time of the full SSL training step on synthetic batches: teacher, student, heads, losses, backward,
per-submodule clipping, AdamW, EMA. Reports s/step, images/s, peak memory and (on GPU) MFU.

    python benchmarks/train_step.py --device cpu --arch vit_small --global-size 64 --local-size 32 \\
        --n-local 2 --batch-size 4                         # the CPU configuration of docs/benchmarks.md
    python benchmarks/train_step.py --device cuda --arch vit_small --batch-size 64 --compile
"""

from __future__ import annotations

import argparse
import time

import torch

from opendino.data.collate import collate_masks
from opendino.data.masking import BlockMaskGenerator
from opendino.recipes.ssl import SSLRecipe
from opendino.train.config import load_train_config
from opendino.train.optim import apply_schedules, build_optimizer, param_groups, param_settings

# Per-image GFLOPs of one step (student fwd+bwd on all crops, teacher fwd, heads), recipe.md §10.3.
GFLOPS_PER_IMAGE = {"vit_small": 130, "vit_base": 469, "vit_large": 1618}
BF16_PEAK_TFLOPS = {"H100": 989, "H200": 989}


def synthetic_batch(b: int, global_size: int, local_size: int, n_local: int, patch: int, device) -> dict:
    grid = global_size // patch
    batch = {
        "global": torch.randn(2 * b, 3, global_size, global_size),
        "local": torch.randn(n_local * b, 3, local_size, local_size),
        **collate_masks(2 * b, grid * grid, BlockMaskGenerator(grid, seed=0)),
    }
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", default="vit_small")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--n-local", type=int, default=8)
    p.add_argument("--prototypes", type=int, default=65536)
    p.add_argument("--drop-path", type=float, default=0.3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_train_config(
        None,
        [
            f"model.arch={args.arch}",
            f"model.drop_path_rate={args.drop_path}",
            f"dino_head.prototypes={args.prototypes}",
            f"ibot_head.prototypes={args.prototypes}",
        ],
    )
    recipe = SSLRecipe(cfg).to(device).train()
    if args.compile:
        for backbone in (recipe.student.backbone, recipe.teacher.backbone):
            for block in backbone.blocks:
                block.compile()
    optimizer = build_optimizer(param_groups(param_settings(recipe.student)))
    apply_schedules(optimizer, 1e-4, 0.04, 1e-4)
    batch = synthetic_batch(args.batch_size, args.global_size, args.local_size, args.n_local, 16, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            loss, _ = recipe(batch, 0.07)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        recipe.clip_gradients(3.0)
        optimizer.step()
        recipe.update_teacher(0.994)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    images = args.batch_size / seconds
    line = f"{args.arch} b{args.batch_size} {args.global_size}/{args.local_size}x{args.n_local} K={args.prototypes}: "
    line += f"{seconds:.3f} s/step, {images:.1f} images/s"
    if device.type == "cuda":
        line += f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
        if peak and args.arch in GFLOPS_PER_IMAGE and args.global_size == 224:
            line += f", MFU {images * GFLOPS_PER_IMAGE[args.arch] / 1e3 / peak:.1%}"
    print(line)


if __name__ == "__main__":
    main()
