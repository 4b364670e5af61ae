"""The memory one training step of the adaptation presets needs, estimated on the CPU (no GPU here).

For each preset (configs/adapt/vits16.yaml, vitb16.yaml) one process per micro-batch size runs one full
step (224 px, 2 global + 8 local crops, fresh heads, the Gram teacher) and records its peak resident
memory. The difference between two batch sizes is the activation memory per image; the states are
counted exactly (fp32 weights, gradients and the two AdamW moments of the trained student, fp32 EMA
teacher and Gram teacher). The estimate for a GPU is states + batch x activations per image, with the
activations of the float32 CPU step: bf16 autocast keeps most activations in 16 bits on a GPU, so this
is an upper bound. Run: ``python benchmarks/adapt_memory.py`` (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


def one_step(preset: str, batch: int) -> dict:
    """Runs in its own process: the preset's first step at ``batch`` images; peak RSS before and after."""
    import torch

    from opendino.train.config import load_train_config
    from opendino.train.trainer import Trainer

    overrides = [
        "run.dir=/tmp/opendino-adapt-memory",
        "gram.checkpoint=null",  # a copy of the EMA teacher: the same memory as the released file
        f"train.batch_size={batch}",
        "train.accumulate=1",
        "data.synthetic_size=256",
        "checkpoint.every=1000000",
        "log.progress=false",
        "log.tensorboard=false",
    ]
    cfg = load_train_config(REPO / "configs" / "adapt" / f"{preset}.yaml", overrides)
    trainer = Trainer(cfg)
    start = trainer.setup()
    member = trainer.members[0]
    recipe = member.recipe
    trained = sum(p.numel() for p in recipe.student.parameters() if p.requires_grad)
    companions = sum(p.numel() for m in (recipe.teacher, recipe.gram_teacher) for p in m.parameters())
    batch_data = [next(trainer.batches)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    member.step(start, batch_data)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "preset": preset,
        "batch": batch,
        "peak_bytes": peak,
        "before_bytes": before,
        "state_bytes": trained * 16 + companions * 4,
        "trained_params": trained,
        "seconds": seconds,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["vits16", "vitb16"])
    parser.add_argument("--batches", nargs=2, type=int, default=[1, 2], help="two micro-batch sizes")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_step(args.child[0], int(args.child[1]))))
        return
    rows = []
    for preset in args.presets:
        runs = []
        for batch in args.batches:
            cmd = [sys.executable, __file__, "--child", preset, str(batch)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
        (b1, small), (b2, large) = ((r["batch"], r) for r in runs)
        per_image = (large["peak_bytes"] - small["peak_bytes"]) / (b2 - b1)
        cfg_batch = {"vits16": 64, "vitb16": 32}.get(preset)
        row = {
            "preset": preset,
            "trained_params_M": small["trained_params"] / 1e6,
            "state_GiB": small["state_bytes"] / GIB,
            "activations_per_image_GiB": per_image / GIB,
            "preset_batch": cfg_batch,
            "estimate_GiB": (small["state_bytes"] + cfg_batch * per_image) / GIB if cfg_batch else None,
            "cpu_step_s": {str(r["batch"]): round(r["seconds"], 1) for r in runs},
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| preset | trained params | states (GiB) | activations / image (GiB, fp32) | batch | estimate (GiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['preset']} | {r['trained_params_M']:.1f} M | {r['state_GiB']:.2f} | "
            f"{r['activations_per_image_GiB']:.3f} | {r['preset_batch']} | {r['estimate_GiB']:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
