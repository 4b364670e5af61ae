"""The I-JEPA predictor: a narrow transformer that predicts target-block features from context features.

Built from the facts in docs/design/peers.md §2: the context features are projected to ``pred_dim``,
given fixed 2-D sin-cos positions, and, for every target block separately, concatenated with mask tokens
(one shared learnable token plus the position of each target cell). The transformer runs on each
(image, target block) pair as its own sequence, so target blocks never see each other; the outputs at the
mask-token positions are normalised and projected back to the encoder width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from opendino.models.vit import NORM_LAYERS, Block


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """``[len(positions), dim]``: ``[sin(p * omega) || cos(p * omega)]`` with ``omega_i = 10000^(-i / (dim / 2))``,
    ``i < dim / 2``, computed in float64."""
    if dim % 2:
        raise ValueError(f"dim={dim} must be even")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid: tuple[int, int]) -> Tensor:
    """Fixed 2-D sin-cos position embedding ``[H * W, dim]`` (float32) of a ``grid = (H, W)`` in raster order.

    The first ``dim / 2`` channels encode the column index x, the last ``dim / 2`` the row index y, each with
    :func:`sincos_1d` at integer positions ``0 .. side - 1``. ``dim`` must be a multiple of 4.
    """
    if dim % 4:
        raise ValueError(f"dim={dim} must be a multiple of 4 (sin and cos for each of two axes)")
    H, W = grid
    if H < 1 or W < 1:
        raise ValueError(f"grid={grid} must have positive sides")
    rows, cols = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    x = sincos_1d(dim // 2, cols.flatten())
    y = sincos_1d(dim // 2, rows.flatten())
    return torch.cat([x, y], dim=1).float()


class JEPAPredictor(nn.Module):
    """I-JEPA predictor (``depth`` pre-norm blocks of width ``pred_dim``, heads = the encoder's heads).

    ``forward(context_tokens [B, K_ctx, embed_dim], context_idx [B, K_ctx], target_idx [B, n_targets, K_tgt],
    grid)`` returns ``[B, n_targets, K_tgt, embed_dim]``: the predictions of each target block's cells.
    Indices are raster positions ``row * W + col`` on ``grid = (H, W)``; any grid works (the sin-cos table
    is computed per grid and device and cached, not stored in the state dict).
    """

    def __init__(
        self, embed_dim: int, pred_dim: int = 384, depth: int = 12, num_heads: int = 16, mlp_ratio: float = 4.0
    ) -> None:
        super().__init__()
        if pred_dim % num_heads:
            raise ValueError(f"pred_dim={pred_dim} is not divisible by num_heads={num_heads}")
        if pred_dim % 4:
            raise ValueError(f"pred_dim={pred_dim} must be a multiple of 4 for the 2-D sin-cos positions")
        self.kwargs = dict(
            embed_dim=embed_dim, pred_dim=pred_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio
        )
        self.embed_dim, self.pred_dim = embed_dim, pred_dim
        self.predictor_embed = nn.Linear(embed_dim, pred_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, pred_dim))
        block_kwargs = dict(
            ffn_hidden=int(pred_dim * mlp_ratio),
            ffn_layer="mlp",
            norm_layer="layernorm",
            qkv_bias=True,
            proj_bias=True,
            ffn_bias=True,
            mask_k_bias=False,
            layerscale_init=None,
        )
        self.blocks = nn.ModuleList(Block(pred_dim, num_heads, **block_kwargs) for _ in range(depth))
        self.norm = NORM_LAYERS["layernorm"](pred_dim)
        self.predictor_proj = nn.Linear(pred_dim, embed_dim)
        self._pos_cache: dict[tuple[int, int, torch.device], Tensor] = {}
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """trunc_normal(0.02) for the mask token and every Linear weight, zero biases, LayerNorm (1, 0)."""
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()

    def pos_embed(self, grid: tuple[int, int], device: torch.device) -> Tensor:
        """The cached ``[H * W, pred_dim]`` float32 sin-cos table of ``grid`` on ``device``."""
        key = (int(grid[0]), int(grid[1]), torch.device(device))
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_2d(self.pred_dim, grid).to(device)
        return self._pos_cache[key]

    def forward(self, context_tokens: Tensor, context_idx: Tensor, target_idx: Tensor, grid: tuple[int, int]) -> Tensor:
        B, K_ctx, D = context_tokens.shape
        if D != self.embed_dim:
            raise ValueError(f"context_tokens have width {D}, the predictor expects embed_dim={self.embed_dim}")
        if context_idx.shape != (B, K_ctx):
            raise ValueError(f"context_idx {tuple(context_idx.shape)} must be [B, K_ctx] = {(B, K_ctx)}")
        if target_idx.dim() != 3 or target_idx.shape[0] != B:
            raise ValueError(f"target_idx {tuple(target_idx.shape)} must be [B={B}, n_targets, K_tgt]")
        n_tgt, K_tgt = target_idx.shape[1:]
        pos = self.pos_embed(grid, context_tokens.device)

        x = self.predictor_embed(context_tokens)
        x = x + pos[context_idx].to(x.dtype)
        # One sequence per (image, target block): the image's context followed by that block's mask tokens.
        x = x.unsqueeze(1).expand(B, n_tgt, K_ctx, self.pred_dim).reshape(B * n_tgt, K_ctx, self.pred_dim)
        m = self.mask_token.to(x.dtype) + pos[target_idx.reshape(B * n_tgt, K_tgt)].to(x.dtype)
        tokens = torch.cat([x, m], dim=1)
        for blk in self.blocks:
            (tokens,) = blk([tokens], [None])
        out = self.predictor_proj(self.norm(tokens[:, K_ctx:]))
        return out.reshape(B, n_tgt, K_tgt, self.embed_dim)
