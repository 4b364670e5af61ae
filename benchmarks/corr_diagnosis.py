"""Why a model's dense correspondence does (not) beat random init: its patch matches beside trivial
matchers on the synthetic view pairs, and how much of its patch features is still the patch embedding.

For a run folder (or checkpoint) and a random-initialised model of the same architecture, on ``--n``
held-out view pairs at ``--resolution``:
- recall within one patch stride for the model, random init, raw pixel patches (mean-removed), the
  identity matcher (every patch matched to the same grid position) and chance;
- how often the model and random init pick the same match;
- the cosine similarity between the final patch tokens and the patch embeddings they started as
  (close to 1: the blocks have added little, so the features are a linear function of the pixels).

    python benchmarks/corr_diagnosis.py demo_out/gram --resolution 128
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from opendino.data.synthetic import render_pair
from opendino.eval.correspondence import match_errors
from opendino.eval.suite import random_init_like, resolve_model


def image_tensor(image, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    x = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255
    return (x - mean) / std


def patch_grid(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Raw pixel patches ``[B, h, w, 3 * stride * stride]``, mean-removed per patch."""
    patches = x.unfold(2, stride, stride).unfold(3, stride, stride).permute(0, 2, 3, 1, 4, 5).flatten(3)
    return patches - patches.mean(-1, keepdim=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a run folder, checkpoint or registered name")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--n", type=int, default=150, help="view pairs of the val split")
    args = p.parse_args()
    torch.manual_seed(0)
    model, info = resolve_model(args.model)
    models = {"model": model.eval(), "random init": random_init_like(model).eval()}
    mean, std = (torch.tensor(info[k])[:, None, None] for k in ("mean", "std"))
    pairs = [render_pair(i, args.resolution, "val") for i in range(args.n)]
    first = torch.stack([image_tensor(a.image, mean, std) for a, _, _ in pairs])
    second = torch.stack([image_tensor(b.image, mean, std) for _, b, _ in pairs])
    flows = [torch.from_numpy(flow) for _, _, flow in pairs]

    grids, start_cosine = {}, {}
    with torch.inference_mode():
        for name, m in models.items():
            a, b = (m.forward_features(x)["x_norm_patchtokens"] for x in (first, second))
            side = int(a.shape[1] ** 0.5)
            grids[name] = (a.unflatten(1, (side, side)), b.unflatten(1, (side, side)))
            embedded, _, _ = m.patch_embed(first)
            start_cosine[name] = F.cosine_similarity(m.norm(embedded), a, dim=-1).mean().item()
    stride = args.resolution // side
    grids["raw pixel patches"] = (patch_grid(first, stride), patch_grid(second, stride))
    identity = torch.eye(side * side).unflatten(0, (side, side)).expand(args.n, -1, -1, -1)
    grids["identity (no motion)"] = (identity, identity)
    grids["chance"] = (torch.randn(args.n, side, side, 8), torch.randn(args.n, side, side, 8))

    print(f"{args.n} view pairs at {args.resolution} px, {side} x {side} patches of {stride} px\n")
    print("| matcher | recall within 1 patch | within 2 patches | mean error (px) |")
    print("|---|---|---|---|")
    for name, (a, b) in grids.items():
        errors = torch.cat([match_errors(a[k], b[k], flows[k], stride) for k in range(args.n)])
        print(
            f"| {name} | {(errors <= stride).float().mean():.3f} | {(errors <= 2 * stride).float().mean():.3f} "
            f"| {errors.mean():.1f} |"
        )
    picks = [
        (F.normalize(a.flatten(1, 2), dim=-1) @ F.normalize(b.flatten(1, 2), dim=-1).mT).argmax(-1)
        for a, b in (grids["model"], grids["random init"])
    ]
    print(f"\nsame match as random init: {(picks[0] == picks[1]).float().mean():.3f}")
    for name, cosine in start_cosine.items():
        print(f"{name}: cosine(final patch tokens, normalised patch embeddings) {cosine:.3f}")


if __name__ == "__main__":
    main()
