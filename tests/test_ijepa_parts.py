"""I-JEPA building blocks: multi-block masks, the 2-D sin-cos table and the predictor."""

from __future__ import annotations

import math

import pytest
import torch

from opendino.data.masking import MultiBlockSpec, multiblock_masks, sample_multiblock
from opendino.models.predictor import JEPAPredictor, sincos_2d

SPEC = MultiBlockSpec()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def bbox(idx: torch.Tensor, W: int) -> tuple[int, int, int, int]:
    rows, cols = idx // W, idx % W
    return int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())


# -- masks ------------------------------------------------------------------------------------------------------


def test_shapes_counts_sorted_in_range():
    B, grid = 8, (16, 16)
    ctx, tgt = multiblock_masks(B, grid, gen(0), SPEC)
    assert ctx.dtype == tgt.dtype == torch.long
    assert ctx.dim() == 2 and ctx.shape[0] == B
    assert tgt.dim() == 3 and tgt.shape[:2] == (B, SPEC.n_targets)
    assert ctx.shape[1] > SPEC.min_keep
    for t in (ctx, tgt):
        assert t.min() >= 0 and t.max() < 256
        assert (t.diff(dim=-1) > 0).all()  # sorted, no repeats


def test_target_blocks_are_rectangles_within_scale_and_aspect():
    H = W = 64
    for seed in range(10):
        draw = sample_multiblock(3, (H, W), gen(seed), SPEC)
        h, w = draw.target_shape
        assert 0.15 * 0.93 <= h * w / (H * W) <= 0.2 * 1.07
        assert 0.75 * 0.93 <= h / w <= 1.5 * 1.07
        assert draw.context_shape[0] == draw.context_shape[1]  # aspect 1
        for blocks in draw.targets:
            assert len(blocks) == SPEC.n_targets
            for b in blocks:
                r0, r1, c0, c1 = bbox(b, W)
                assert (r1 - r0 + 1, c1 - c0 + 1) == (h, w) and len(b) == h * w
                assert r1 < H - 1 and c1 < W - 1  # exclusive upper bound on the corner


def test_scale_and_aspect_are_correlated():
    """One draw sets both: bigger target blocks are taller (h / w grows with the area)."""
    shapes = {sample_multiblock(1, (64, 64), gen(s), SPEC).target_shape for s in range(40)}
    by_area = sorted(shapes, key=lambda hw: hw[0] * hw[1])
    small, large = by_area[: len(by_area) // 3], by_area[-(len(by_area) // 3) :]
    assert max(h / w for h, w in small) < min(h / w for h, w in large)


def test_context_disjoint_from_targets_and_batch_counts_equal():
    B, grid = 16, (14, 14)
    for seed in range(5):
        draw = sample_multiblock(B, grid, gen(seed), SPEC)
        for c, ts, kept in zip(draw.contexts, draw.targets, draw.constraints_kept, strict=True):
            assert len(c) > SPEC.min_keep
            for t in ts[:kept]:  # every target still in the constraint set (all of them unless relaxed)
                assert not set(c.tolist()) & set(t.tolist())
        ctx, tgt = multiblock_masks(B, grid, gen(seed), SPEC)
        assert ctx.shape[1] == min(len(c) for c in draw.contexts)
        for i, c in enumerate(draw.contexts):  # truncation keeps the first indices in raster order
            assert torch.equal(ctx[i], c[: ctx.shape[1]])
        assert torch.equal(tgt, torch.stack([torch.stack(ts) for ts in draw.targets]))


def test_unrelaxed_context_fully_disjoint():
    draw = sample_multiblock(32, (16, 16), gen(3), SPEC)
    assert SPEC.n_targets in draw.constraints_kept
    for c, ts, kept in zip(draw.contexts, draw.targets, draw.constraints_kept, strict=True):
        if kept == SPEC.n_targets:
            union = set().union(*(t.tolist() for t in ts))
            assert not set(c.tolist()) & union


def test_deterministic_given_generator():
    a = multiblock_masks(4, (16, 16), gen(7), SPEC)
    b = multiblock_masks(4, (16, 16), gen(7), SPEC)
    c = multiblock_masks(4, (16, 16), gen(8), SPEC)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_relaxation_on_small_grid():
    spec = MultiBlockSpec(min_keep=4, target_scale=(0.3, 0.4))
    relaxed = False
    for seed in range(20):
        draw = sample_multiblock(8, (6, 6), gen(seed), spec)
        relaxed |= min(draw.constraints_kept) < spec.n_targets
        assert all(len(c) > spec.min_keep for c in draw.contexts)
        ctx, tgt = multiblock_masks(8, (6, 6), gen(seed), spec)
        assert ctx.shape[1] > spec.min_keep and tgt.shape[:2] == (8, spec.n_targets)
    assert relaxed


@pytest.mark.parametrize(
    "kwargs, grid",
    [
        (dict(), (3, 3)),  # 9 cells <= min_keep 10
        (dict(), (1, 40)),
        (dict(n_targets=0), (16, 16)),
        (dict(max_tries=0), (16, 16)),
        (dict(target_scale=(0.3, 0.2)), (16, 16)),
        (dict(context_scale=(0.5, 1.5)), (16, 16)),
        (dict(target_aspect=(0.0, 1.0)), (16, 16)),
        (dict(context_scale=(0.1, 0.1), min_keep=30), (8, 8)),  # context block too small for min_keep
    ],
)
def test_invalid_arguments(kwargs, grid):
    with pytest.raises(ValueError):
        multiblock_masks(2, grid, gen(0), MultiBlockSpec(**kwargs))


def test_invalid_batch_size():
    with pytest.raises(ValueError):
        multiblock_masks(0, (16, 16), gen(0), SPEC)


# -- sin-cos ----------------------------------------------------------------------------------------------------


def test_sincos_2d_layout():
    dim, (H, W) = 32, (3, 5)
    pe = sincos_2d(dim, (H, W))
    assert pe.shape == (H * W, dim) and pe.dtype == torch.float32
    q = dim // 4
    assert torch.equal(pe[0], torch.tensor(([0.0] * q + [1.0] * q) * 2))
    grid = pe.reshape(H, W, dim)
    # Along a row (y fixed) only the first half changes; along a column (x fixed) only the second half.
    assert torch.equal(grid[:, :1, :].expand(H, W, dim)[..., dim // 2 :], grid[..., dim // 2 :])
    assert torch.equal(grid[:1, :, :].expand(H, W, dim)[..., : dim // 2], grid[..., : dim // 2])
    assert not torch.equal(grid[0, 0, : dim // 2], grid[0, 1, : dim // 2])
    # Position (y=2, x=1): first frequency (omega_0 = 1) is sin(1) / sin(2); the last is 10000^(-(q-1)/q).
    p = pe[2 * W + 1]
    assert p[0].item() == pytest.approx(math.sin(1.0)) and p[q].item() == pytest.approx(math.cos(1.0))
    assert p[2 * q].item() == pytest.approx(math.sin(2.0))
    assert p[q - 1].item() == pytest.approx(math.sin(10000 ** (-(q - 1) / q)))
    with pytest.raises(ValueError):
        sincos_2d(30, (2, 2))


# -- predictor --------------------------------------------------------------------------------------------------


def tiny_predictor(**kw) -> JEPAPredictor:
    torch.manual_seed(0)
    return JEPAPredictor(**{"embed_dim": 48, "pred_dim": 32, "depth": 2, "num_heads": 4, **kw})


@pytest.mark.parametrize("grid", [(4, 4), (16, 16), (6, 10)])
def test_predictor_shape_and_gradients(grid):
    model = tiny_predictor()
    B = 3
    ctx, tgt = multiblock_masks(B, grid, gen(1), MultiBlockSpec(min_keep=2))
    x = torch.randn(B, ctx.shape[1], 48)
    out = model(x, ctx, tgt, grid)
    assert out.shape == (B, tgt.shape[1], tgt.shape[2], 48)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.kwargs == dict(embed_dim=48, pred_dim=32, depth=2, num_heads=4, mlp_ratio=4.0)
    assert not any("pos" in k for k in model.state_dict())


def test_predictor_target_blocks_independent():
    model = tiny_predictor().eval()
    grid, B = (8, 8), 2
    ctx = torch.tensor([[0, 1, 2, 9, 10, 11], [5, 6, 7, 20, 21, 40]])
    tgt = torch.tensor([[[30, 31, 38, 39], [50, 51, 58, 59]], [[12, 13, 14, 15], [44, 45, 52, 53]]])
    x = torch.randn(B, 6, 48)
    out = model(x, ctx, tgt, grid)
    tgt2 = tgt.clone()
    tgt2[:, 1] = torch.tensor([60, 61, 62, 63])
    out2 = model(x, ctx, tgt2, grid)
    torch.testing.assert_close(out[:, 0], out2[:, 0], rtol=0, atol=1e-6)
    assert not torch.allclose(out[:, 1], out2[:, 1])
    # A single block alone gives the same predictions.
    torch.testing.assert_close(model(x, ctx, tgt[:, :1], grid)[:, 0], out[:, 0], rtol=0, atol=1e-6)


def test_predictor_init():
    model = tiny_predictor()
    assert model.mask_token.shape == (1, 1, 32)
    assert 0.01 < model.mask_token.std() < 0.03
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):  # trunc_normal(std 0.02); torch truncates at +-2 absolute
            assert 0.017 < m.weight.std() < 0.023 and (m.bias == 0).all()
        elif isinstance(m, torch.nn.LayerNorm):
            assert (m.weight == 1).all() and (m.bias == 0).all()


def test_predictor_vith_parameter_count():
    with torch.device("meta"):
        model = JEPAPredictor(1280, pred_dim=384, depth=12, num_heads=16)
    n = sum(p.numel() for p in model.parameters())
    assert n == 22_279_424  # (1280*384+384) + 384 + 12 * 1_774_464 + 768 + (384*1280+1280)
    assert abs(n - 22.3e6) < 0.2e6
