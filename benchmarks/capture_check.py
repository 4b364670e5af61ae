"""GPU check of ``train.capture`` (benchmarks/gpu_check.sh runs it; tests/test_static_step.py too, on a GPU):

1. the captured step against the eager step, term by term over the steps after the warm-up (no random
   draws: stochastic depth and RoPE augmentation off, so both must agree to rounding);
2. with stochastic depth on, the captured losses stay finite and near the eager ones;
3. a captured run stopped at a checkpoint and resumed gives the metrics of the uninterrupted run.

Prints a table; exits 1 when a check fails.

    python benchmarks/capture_check.py
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import torch

from opendino.data.collate import collate_masks
from opendino.data.masking import BlockMaskGenerator
from opendino.recipes.ssl import SSLRecipe
from opendino.train.capture import WARMUP, CapturedStep
from opendino.train.config import load_train_config
from opendino.train.logging import read_metrics
from opendino.train.optim import apply_schedules, build_optimizer, make_capturable
from opendino.train.step import train_step
from opendino.train.trainer import Trainer

NO_RANDOM_ROPE = {f"pos_embed_rope_{k}_coords": None for k in ("shift", "jitter", "rescale")}
SMALL = ["model.arch=vit_small", "dino_head.prototypes=4096", "ibot_head.prototypes=4096", "loss.pad_masked_rows=true"]


def _batches(n: int, b: int = 16, device: str = "cuda") -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        masks = collate_masks(2 * b, 49, BlockMaskGenerator(7, seed=i), pad=True)  # both global crops of b images
        batch = {
            "global": torch.randn(2 * b, 3, 112, 112, generator=gen),
            "local": torch.randn(4 * b, 3, 48, 48, generator=gen),
            "labels": torch.zeros(b, dtype=torch.long),
            **masks,
        }
        out.append({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    return out


def _recipe(random: bool, device: str = "cuda") -> SSLRecipe:
    """ViT-S/16 with small heads; ``random``: stochastic depth 0.3 and RoPE augmentation, else no random draw."""
    cfg = load_train_config(None, [*SMALL, f"model.drop_path_rate={0.3 if random else 0}"])
    if not random:
        cfg.model.kwargs = dict(NO_RANDOM_ROPE)
    torch.manual_seed(0)
    return SSLRecipe(cfg).to(device).train()


def _run(recipe: SSLRecipe, batches: list[dict], capture: bool, device: str = "cuda") -> list[dict]:
    device = torch.device(device)
    optimizer = build_optimizer(recipe.param_groups())
    step_fn = train_step
    if capture:
        recipe.scalars_on(device)
        make_capturable(optimizer, device)
        step_fn = CapturedStep(print)
    torch.manual_seed(0)
    records = []
    for step, batch in enumerate(batches):
        apply_schedules(optimizer, 1e-4 * (1 + step), 0.04 + 0.01 * step, 1e-4, step)
        recipe.before_step(step)
        result = step_fn(recipe, optimizer, batch, step=step, clip_grad=3.0)
        records.append({"loss": result.loss, **result.terms, **{f"norm_{k}": v for k, v in result.grad_norms.items()}})
    return [{k: float(v) for k, v in r.items()} for r in records]


def _worst(a: list[dict], b: list[dict]) -> float:
    return max(abs(x[k] - y[k]) / max(abs(x[k]), 1e-6) for x, y in zip(a, b, strict=True) for k in x)


def main() -> int:
    if not torch.cuda.is_available():
        print("capture_check: needs a CUDA device")
        return 1
    rows, failed = [], False
    batches = _batches(WARMUP + 5)

    recipe = _recipe(random=False)
    twin = copy.deepcopy(recipe)
    eager, captured = _run(recipe, batches, False), _run(twin, batches, True)
    worst = _worst(eager[WARMUP:], captured[WARMUP:])
    rows.append(
        ("captured vs eager, no random draws, 5 steps after warm-up: max rel diff", f"{worst:.1e}", worst < 1e-4)
    )

    recipe = _recipe(random=True)
    twin = copy.deepcopy(recipe)
    eager, captured = _run(recipe, batches, False), _run(twin, batches, True)
    finite = all(torch.isfinite(torch.tensor(r["loss"])) for r in captured)
    drift = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(eager, captured, strict=True))
    rows.append(("with stochastic depth: losses finite, max rel loss diff", f"{drift:.1e}", finite and drift < 0.05))

    with tempfile.TemporaryDirectory() as tmp:
        common = [
            *SMALL,
            "model.drop_path_rate=0",
            *(f"model.kwargs.{k}=null" for k in NO_RANDOM_ROPE),  # eager warm-ups and replays: the same numbers
            "train.capture=true",
            "train.batch_size=16",
            "crops.global_size=112",
            "crops.local_size=48",
            "crops.n_local=4",
            "data.source=synthetic",
            "data.synthetic_n=256",
            "data.synthetic_size=128",
            "checkpoint.every=6",
            "log.every=1",
            "log.progress=false",
            "log.tensorboard=false",
            "optim.epochs=1",
            "train.epoch_length=12",
        ]
        whole, split = Path(tmp) / "whole", Path(tmp) / "split"
        name = "captured run resumed at step 6 vs uninterrupted: max rel diff"
        try:  # a failure here is a row of the table, after the rows above
            Trainer(load_train_config(None, [*common, f"run.dir={whole}", "train.steps=12"])).run()
            Trainer(load_train_config(None, [*common, f"run.dir={split}", "train.steps=6"])).run()
            Trainer(load_train_config(None, [*common, f"run.dir={split}", "train.steps=12"])).run()
        except Exception as e:
            rows.append((name, f"{type(e).__name__}: {e}"[:120], False))
        else:
            keys = ("loss", "dino_local", "dino_global", "ibot", "koleo")
            a = [{k: r[k] for k in keys} for r in read_metrics(whole) if r["step"] >= 6]
            b = [{k: r[k] for k in keys} for r in read_metrics(split) if r["step"] >= 6]
            worst = _worst(a, b) if len(a) == len(b) == 6 else float("inf")
            rows.append((name, f"{worst:.1e}", worst < 1e-4))

    print("| capture check | value | ok |")
    print("|---|---|---|")
    for name, value, ok in rows:
        print(f"| {name} | {value} | {'yes' if ok else 'NO'} |")
        failed |= not ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
