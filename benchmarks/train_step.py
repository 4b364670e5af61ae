"""Time of the full SSL training step on synthetic batches: teacher, student, heads, losses, backward,
per-submodule clipping, AdamW, EMA. Reports s/step, images/s, peak memory and (on GPU) MFU.

    python benchmarks/train_step.py --device cpu --arch vit_small --global-size 64 --local-size 32 \\
        --n-local 2 --batch-size 4                         # the CPU configuration of docs/benchmarks.md
    python benchmarks/train_step.py --device cuda --arch vit_small --batch-size 64 --compile
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from opendino.data.collate import collate_masks
from opendino.data.masking import BlockMaskGenerator
from opendino.models import vit
from opendino.models.rope import rotate_half
from opendino.models.vit import PatchEmbed
from opendino.recipes.ssl import SSLRecipe
from opendino.train.capture import WARMUP, CapturedStep
from opendino.train.config import load_train_config
from opendino.train.optim import apply_schedules, build_optimizer, make_capturable
from opendino.train.parallel import apply_activation_checkpointing, compile_modules
from opendino.train.step import train_step

# Per-image GFLOPs of one step (student fwd+bwd on all crops, teacher fwd, heads), docs/design/recipe.md §10.3.
GFLOPS_PER_IMAGE = {"vit_small": 130, "vit_base": 469, "vit_large": 1618}
BF16_PEAK_TFLOPS = {"H100": 989, "H200": 989}


def synthetic_batch(b: int, global_size: int, local_size: int, n_local: int, patch: int, device) -> dict:
    grid = global_size // patch
    batch = {
        "global": torch.randn(2 * b, 3, global_size, global_size),
        "local": torch.randn(n_local * b, 3, local_size, local_size),
        "labels": torch.zeros(b, dtype=torch.long),
        **collate_masks(2 * b, grid * grid, BlockMaskGenerator(grid, seed=0), pad=True),
    }
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def attend_bnhd(self, qkv: torch.Tensor, rope) -> torch.Tensor:
    """``SelfAttention._attend`` with q, k, v kept in the ``[B, N, h, d]`` memory of the qkv projection
    (RoPE applied in that layout, SDPA given transposed views): no permuted copies before the kernel, and
    its output, ``[B, N, h, d]`` in memory, flattens without a copy. An experiment (``--attention-layout``)."""
    B, N, _ = qkv.shape
    q, k, v = qkv.view(B, N, 3, self.num_heads, -1).unbind(2)
    if rope is not None:
        sin, cos = (t.unsqueeze(-2) if t.dim() == 2 else t.transpose(1, 2) for t in rope)  # [N, 1, d] / [B, N, 1, d]

        def rotate(x: torch.Tensor) -> torch.Tensor:
            n_prefix = x.shape[1] - sin.shape[-3]
            patches = x[:, n_prefix:].to(sin.dtype)
            return torch.cat([x[:, :n_prefix], (patches * cos + rotate_half(patches) * sin).to(x.dtype)], 1)

        q, k = rotate(q), rotate(k)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)


def profile(step, device: torch.device) -> None:
    """Where the time of a step goes: device kernels by total time, and device-busy vs wall time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    start = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / 3
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    # Kernels only: an operator's row repeats the device time of the kernels it launched, and a user
    # annotation's (``Optimizer.step#AdamW.step``) spans its kernels and the gaps between them.
    kind = torch.autograd.DeviceType.CUDA if device.type == "cuda" else torch.autograd.DeviceType.CPU
    kernels = [e for e in events if e.device_type == kind and not getattr(e, "is_user_annotation", False)]
    busy = sum(getattr(e, key) for e in kernels) / 3 / 1e6
    print(f"profiled: wall {wall * 1e3:.1f} ms/step, device busy {busy * 1e3:.1f} ms/step")
    print(events.table(sort_by=key, row_limit=25, max_name_column_width=60))
    if device.type == "cuda":  # where the host's time goes: the step is host-bound when busy < wall
        print(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
        print_kernel_breakdown([(e.key, getattr(e, key) / 3e3, e.count / 3) for e in kernels])


KERNEL_KINDS = (  # the first pattern found in a kernel's name decides its kind
    ("matrix products", ("gemm", "nvjet", "gemv", "xmma", "cutlass", "splitk")),
    ("attention", ("sdpa", "flash", "fmha", "attention")),
    ("compiled pointwise (Triton)", ("triton_poi",)),
    ("compiled reductions (Triton)", ("triton_red", "triton_per")),
    ("optimizer (fused AdamW)", ("adam",)),
    ("multi-tensor ops (EMA, clipping)", ("multi_tensor_apply",)),
    ("eager reductions", ("reduce_kernel", "softmax", "norm")),
    ("eager pointwise", ("elementwise_kernel", "vectorized", "unrolled")),
    ("copies and fills", ("memcpy", "memset", "copy", "fill", "cat")),
)


def print_kernel_breakdown(kernels: list[tuple[str, float, float]]) -> None:
    """Device time per step by kind of kernel, then the 40 longest kernels: the long tail below the top
    rows of the operator table is where fusion can still win. ``kernels``: (name, ms per step, calls per step)."""
    by_kind: dict[str, list[float]] = {}
    for name, ms, calls in kernels:
        lower = name.lower()
        kind = next((k for k, pats in KERNEL_KINDS if any(p in lower for p in pats)), "other")
        totals = by_kind.setdefault(kind, [0.0, 0.0])
        totals[0] += ms
        totals[1] += calls
    print("device time by kind of kernel (ms per step, kernels per step):")
    for kind, (ms, calls) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        print(f"  {ms:7.2f} {calls:5.0f}  {kind}")
    print("longest kernels (ms per step, calls per step, name):")
    for name, ms, calls in sorted(kernels, key=lambda k: -k[1])[:40]:
        print(f"  {ms:7.3f} {calls:5.0f}  {name[:110]}")


def report_syncs(step) -> None:
    """Runs one step with CUDA's synchronisation debug mode and prints each distinct synchronising line."""
    import collections
    import traceback
    import warnings

    seen: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        stack = traceback.extract_stack()[:-1]
        ours = [f for f in stack if "opendino" in f.filename or "benchmarks" in f.filename]
        where = " <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno} {f.line}" for f in [stack[-1], *ours[-1:]])
        seen[f"{where} [{str(message).splitlines()[0][:80]}]"] += 1

    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        step()
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    print(f"host-device synchronisations in one step: {sum(seen.values())}")
    for where, count in seen.most_common():
        print(f"  {count} x {where}")


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
    p.add_argument(
        "--compile",
        choices=["none", "blocks", "blocks+heads", "blocks+heads+losses"],
        default="none",
        help="what is compiled (train.compile=true compiles blocks, heads and, in one process, the losses)",
    )
    p.add_argument("--ac", choices=["none", "selective", "full"], default="none", help="activation checkpointing")
    p.add_argument("--profile", action="store_true", help="print the top GPU kernels of 3 profiled steps")
    p.add_argument(
        "--baseline-ema",
        action="store_true",
        help="the EMA update before 2026-11-26 (lerp with a device weight, read back on the host every step)",
    )
    p.add_argument(
        "--baseline-patch-embed",
        action="store_true",
        help="the patch embedding before 2026-11-26 (a cuDNN convolution instead of a matrix product)",
    )
    p.add_argument(
        "--baseline-drop-path",
        action="store_true",
        help="stochastic-depth subsets as before 2026-11-27 (one randperm per block, branch and crop group)",
    )
    p.add_argument(
        "--capture",
        action="store_true",
        help="train.capture: the whole step replayed from a CUDA graph (padded masked rows, device scalars)",
    )
    p.add_argument("--repeats", type=int, default=1, help="timed runs of --steps steps: median and spread")
    p.add_argument(
        "--attention-layout",
        choices=["bhnd", "bnhd"],
        default="bhnd",
        help="q, k, v as [B, h, N, d] permuted copies (the model's) or kept as [B, N, h, d] views (experiment)",
    )
    p.add_argument("--sync-debug", action="store_true", help="list the host-device synchronisations of one step")
    p.add_argument("--table", action="store_true", help="print one markdown table row")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.capture and device.type != "cuda":
        p.error("--capture replays CUDA graphs: it needs --device cuda")
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
    plan = recipe.parallel_plan()
    apply_activation_checkpointing(plan, args.ac)  # the order of train.parallel: AC, then compile
    if args.compile != "none":
        compile_modules(recipe, plan, heads="heads" in args.compile, methods="losses" in args.compile)
    if args.baseline_ema:
        teacher, student = list(recipe.teacher.parameters()), list(recipe.student.parameters())
        recipe.after_update = lambda step, finite: torch._foreach_lerp_(
            teacher, student, finite.float() * recipe.ema_weight
        )
    if args.baseline_patch_embed:
        PatchEmbed.forward = lambda self, x: (
            self.proj(x).flatten(2).transpose(1, 2),
            x.shape[-2] // self.patch_size,
            x.shape[-1] // self.patch_size,
        )
    if args.baseline_drop_path:
        vit.drop_path_subsets = lambda sizes, rate, n, device: [
            [torch.randperm(b, device=device)[: max(int(b * (1 - rate)), 1)] for b in sizes] for _ in range(n)
        ]
    if args.attention_layout == "bnhd":
        block = recipe.student.backbone.blocks[0].attn
        x = torch.randn(2, 5 + 16, block.qkv.in_features, device=device)
        rope = recipe.student.backbone.rope_embed(H=4, W=4) if recipe.student.backbone.rope_embed else None
        with torch.no_grad():
            qkv = block.qkv(x)
            diff = (attend_bnhd(block, qkv, rope) - block._attend(qkv, rope)).abs().max().item()
        print(f"[B, N, h, d] attention layout: max |diff| against the model's {diff:.1e}")
        vit.SelfAttention._attend = attend_bnhd
    optimizer = build_optimizer(recipe.param_groups())
    recipe.set_scalar("teacher_temp", 0.07)
    recipe.set_scalar("ema_weight", 1.0 - 0.994)
    step_fn = train_step
    if args.capture:
        recipe.scalars_on(device)
        make_capturable(optimizer, device)
        step_fn = CapturedStep(print)
    apply_schedules(optimizer, 1e-4, 0.04, 1e-4)
    batch = synthetic_batch(args.batch_size, args.global_size, args.local_size, args.n_local, 16, device)

    def step():
        step_fn(recipe, optimizer, batch, clip_grad=3.0)

    for _ in range(max(args.warmup, WARMUP + 1 if args.capture else 0)):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    runs = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        runs.append((time.perf_counter() - start) / args.steps)
    seconds = statistics.median(runs)
    spread = f" ({args.batch_size / max(runs):.0f}-{args.batch_size / min(runs):.0f})" if len(runs) > 1 else ""
    images = args.batch_size / seconds
    name = f"{args.arch} b{args.batch_size} {args.global_size}/{args.local_size}x{args.n_local} K={args.prototypes}"
    name += f", compile: {args.compile}" + (f", AC: {args.ac}" if args.ac != "none" else "")
    name += ", EMA before 2026-11-26" if args.baseline_ema else ""
    name += ", convolution patch embedding" if args.baseline_patch_embed else ""
    name += ", randperm per drop-path draw" if args.baseline_drop_path else ""
    name += ", captured (CUDA graph)" if args.capture else ""
    name += ", attention [B, N, h, d]" if args.attention_layout == "bnhd" else ""
    memory = mfu = ""
    if device.type == "cuda":
        memory = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}"
        gpu = torch.cuda.get_device_name()
        peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in gpu), None)
        if peak and args.arch in GFLOPS_PER_IMAGE and args.global_size == 224:
            mfu = f"{images * GFLOPS_PER_IMAGE[args.arch] / 1e3 / peak:.1%}"
    if args.sync_debug and device.type == "cuda":
        report_syncs(step)
    if args.profile:
        profile(step, device)
    if args.table:
        print(f"| {name} | {seconds:.3f} | {images:.0f}{spread} | {memory} | {mfu} |")
    else:
        print(f"{name}: {seconds:.3f} s/step, {images:.1f} images/s, peak memory {memory or '-'} GiB, MFU {mfu or '-'}")


if __name__ == "__main__":
    main()
