"""The text tower's training step beside open_clip's ``TextTransformer`` of the same size, in one run.

Same width, depth, heads, context, output size, batch and token ids; one step = forward, a loss on the
pooled embeddings, backward and an AdamW update; float32 on the CPU (bf16 autocast on a GPU). The median
of ``--repeats`` timed steps after ``--warmup``. Writes one line per tower.

    python benchmarks/text_tower.py --tower text_small --batch 64 --repeats 20
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from opendino.models.text import TEXT_TOWERS, build_text_tower


def _step_time(model: torch.nn.Module, tokens: torch.Tensor, warmup: int, repeats: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    device = tokens.device
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(tokens)
        loss = out.float().pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tower", default="text_small", choices=list(TEXT_TOWERS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    from open_clip.transformer import TextTransformer as OpenClipText

    g = TEXT_TOWERS[args.tower]
    device = torch.device(args.device)
    torch.manual_seed(0)
    tokens = torch.randint(1, 49_000, (args.batch, g.context_length), device=device)
    tokens[:, 20] = 49_407  # the end-of-text token, pooled by both (argmax)
    ours = build_text_tower(args.tower).to(device)
    peer = OpenClipText(
        context_length=g.context_length, width=g.width, heads=g.heads, layers=g.layers, output_dim=g.embed_dim
    ).to(device)
    n_ours, n_peer = (sum(p.numel() for p in m.parameters()) for m in (ours, peer))
    print(f"text tower {args.tower} {dataclasses.asdict(g)}, batch {args.batch}, {device}, torch {torch.__version__}")
    results = {}
    for name, model in (("opendino", ours), ("open_clip", peer), ("opendino (again)", ours)):
        results[name] = _step_time(model, tokens, args.warmup, args.repeats)
    print(f"  {'tower':<18} {'params':>10} {'step ms':>9} {'sequences/s':>12}")
    for name, seconds in results.items():
        n = n_peer if name == "open_clip" else n_ours
        print(f"  {name:<18} {n / 1e6:>9.2f}M {seconds * 1e3:>9.1f} {args.batch / seconds:>12.0f}")
    ratio = results["open_clip"] / min(results["opendino"], results["opendino (again)"])
    print(f"  opendino / open_clip speed: {ratio:.2f}x")


if __name__ == "__main__":
    main()
