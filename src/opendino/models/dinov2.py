"""The DINOv2 Vision Transformer (with and without registers) as a variant of the DINOv3 ViT.

What differs from :class:`~opendino.models.vit.DinoVisionTransformer` (docs/design/peers.md §1):

- positions are a learned absolute embedding ``pos_embed [1, 1 + N0, D]`` over the cls token and the patch
  grid of ``img_size`` (no RoPE), added after masked patches are replaced by ``mask_token``; the register
  tokens are inserted after the cls token afterwards, so they carry no position;
- other grids resample the patch part of ``pos_embed`` in float32 with bicubic interpolation, either by
  ``scale_factor = (grid + interpolate_offset) / stored grid`` (the non-register releases, offset 0.1,
  no antialiasing) or to the exact grid size (offset 0; the register releases, with antialiasing);
- the ViT-g FFN ``swiglufused`` packs both SwiGLU input projections into one ``mlp.w12`` layer (its first
  half goes through SiLU) followed by ``mlp.w3``;
- the state-dict keys are the released DINOv2 ones (``register_tokens`` rather than ``storage_tokens``).

The register tokens play the part of DINOv3's storage tokens everywhere else: ``n_storage_tokens`` is the
register count and the outputs carry them under ``"x_storage_tokens"``.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from opendino.models.vit import (
    Block,
    DinoVisionTransformer,
    LayerScale,
    Rope,
    _check_choice,
    swiglu_hidden_dim,
)

DINOV2_FFN_LAYERS = ("mlp", "swiglufused")


class PackedSwiGLU(nn.Module):
    """SwiGLU with both input projections in one layer: ``w3(silu(a) * b)`` for ``[a, b] = w12(x)``."""

    def __init__(self, dim: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


def packed_swiglu_hidden_dim(dim: int, mlp_ratio: float) -> int:
    """The DINOv2 ``swiglufused`` width: two thirds of ``int(dim * mlp_ratio)``, rounded up to a multiple of
    8 (4096 for ViT-g, D = 1536)."""
    return swiglu_hidden_dim(int(dim * mlp_ratio), 8)


class DinoV2VisionTransformer(DinoVisionTransformer):
    """DINOv2 ViT. Constructor arguments carry the DINOv2 names (``mlp_ratio``, ``init_values``,
    ``num_register_tokens``, ``interpolate_offset``, ``interpolate_antialias``)."""

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop_path_rate: float = 0.0,
        init_values: float | None = None,
        ffn_layer: str = "mlp",
        num_register_tokens: int = 0,
        interpolate_offset: float = 0.1,
        interpolate_antialias: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        _check_choice("ffn_layer", ffn_layer, DINOV2_FFN_LAYERS)
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not a multiple of patch_size={patch_size}")
        # The parent builds the tokens, patch embedding and final norm (LayerNorm, eps 1e-6); the blocks,
        # the position embedding and the registers are built here. Its RoPE module is removed below.
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depth=0,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            proj_bias=proj_bias,
            ffn_bias=ffn_bias,
            # Stochastic depth: the parent's per-branch batch-subset algorithm at one rate for all blocks.
            # DINOv2 uses it above 0.1 only; at 0 < rate <= 0.1 it uses Bernoulli DropPath per sample
            # instead (docs/design/peers.md §1), which this model does not reproduce.
            drop_path_rate=drop_path_rate,
            layerscale_init=init_values,
            norm_layer="layernorm",
            n_storage_tokens=0,
            device=device,
        )
        del self.rope_embed  # learned absolute positions only; no RoPE buffers in the state dict
        self.n_blocks = depth
        self.n_storage_tokens = num_register_tokens
        self.init_values = init_values
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        self.ffn_layer = ffn_layer
        grid = img_size // patch_size
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
            if num_register_tokens > 0:
                self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
            # Released key order: cls_token, pos_embed, register_tokens, mask_token, patch_embed, blocks, norm.
            self._parameters["mask_token"] = self._parameters.pop("mask_token")
            self.blocks = nn.ModuleList(
                self._make_block(embed_dim, num_heads, mlp_ratio, ffn_layer, qkv_bias, proj_bias, ffn_bias, init_values)
                for _ in range(depth)
            )
        if device is None or torch.device(device).type != "meta":
            self.init_weights()

    @staticmethod
    def _make_block(
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        ffn_layer: str,
        qkv_bias: bool,
        proj_bias: bool,
        ffn_bias: bool,
        init_values: float | None,
    ) -> Block:
        packed = ffn_layer == "swiglufused"
        block = Block(
            dim,
            num_heads,
            # A one-unit placeholder MLP for the packed SwiGLU, replaced right below.
            ffn_hidden=1 if packed else int(dim * mlp_ratio),
            ffn_layer="mlp",
            norm_layer="layernorm",
            qkv_bias=qkv_bias,
            proj_bias=proj_bias,
            ffn_bias=ffn_bias,
            mask_k_bias=False,
            layerscale_init=init_values,
        )
        if packed:
            block.mlp = PackedSwiGLU(dim, packed_swiglu_hidden_dim(dim, mlp_ratio), ffn_bias)
        return block

    # -- initialisation ---------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """The DINOv2 initialisation: pos_embed truncated normal (0.02), cls and register tokens N(0, 1e-6),
        mask_token 0, every Linear truncated normal (0.02) with zero bias, LayerScale at ``init_values``;
        the patch embedding keeps PyTorch's default convolution init."""
        if not hasattr(self, "pos_embed"):
            return  # called from the parent constructor, before the DINOv2 parts exist
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.n_storage_tokens > 0:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        self.patch_embed.reset_parameters()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, LayerScale)):
                m.reset_parameters()

    # -- positions --------------------------------------------------------------------------------
    @property
    def pos_grid(self) -> int:
        """Side of the square patch grid ``pos_embed`` is stored for."""
        return math.isqrt(self.pos_embed.shape[1] - 1)

    def interpolate_pos_encoding(self, h: int, w: int, dtype: torch.dtype | None = None) -> Tensor:
        """``pos_embed`` for an ``h x w`` patch grid, ``[1, 1 + h * w, D]``: the stored one for its own
        square grid, else its patch part resampled in float32 (bicubic) and the cls slot kept."""
        pos = self.pos_embed
        dtype = dtype or pos.dtype
        m = self.pos_grid
        if h == w == m:
            return pos.to(dtype)
        cls_pos, grid_pos = pos[:, :1].float(), pos[:, 1:].float()
        grid_pos = grid_pos.reshape(1, m, m, -1).permute(0, 3, 1, 2)  # [1, D, m, m]
        if self.interpolate_offset:
            # The offset shifts the sampling positions as well (PyTorch maps coordinates by the scale).
            off = self.interpolate_offset
            resize = dict(scale_factor=((h + off) / m, (w + off) / m))
        else:
            resize = dict(size=(h, w))
        grid_pos = F.interpolate(grid_pos, mode="bicubic", antialias=self.interpolate_antialias, **resize)
        if grid_pos.shape[-2:] != (h, w):
            raise RuntimeError(f"position embedding resampled to {tuple(grid_pos.shape[-2:])}, expected {(h, w)}")
        grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([cls_pos, grid_pos], dim=1).to(dtype)

    # -- forward ----------------------------------------------------------------------------------
    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> tuple[Tensor, int, int]:
        """``[cls, registers, patches]`` tokens: masked patches become ``mask_token``, then cls and patches get
        their position embedding, then the registers (no position) go in after the cls token."""
        x, h, w = self.patch_embed(x)
        B = x.shape[0]
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
            cls_token = self.cls_token
        else:
            # Keeps mask_token in the autograd graph (a numerical no-op), as the parent does.
            cls_token = self.cls_token + 0 * self.mask_token
        x = torch.cat([cls_token.expand(B, -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(h, w, x.dtype)
        if self.n_storage_tokens > 0:
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)
        return x, h, w

    def _block_ropes(self, grids: list[tuple[int, int]]) -> list[list[Rope]]:
        return [[None] * len(grids) for _ in self.blocks]
