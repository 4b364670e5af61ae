"""The DINOv3 Vision Transformer, with the official state-dict key names and forward API.

Every option of the released models is here (docs/design/recipe.md §1): cls / storage / mask tokens, axial RoPE,
masked-key qkv bias, LayerScale, MLP and SwiGLU FFNs, LayerNorm / RMSNorm, untied cls and local-crop
norms, the official "sample subset" stochastic depth and initialisation.

Input sizes: the patch embedding is a stride-``patch_size`` convolution, so an image whose sides are not
multiples of the patch size is floor-cropped (the last ``H % patch_size`` rows and ``W % patch_size``
columns are ignored), exactly like the official model. Resize to a multiple of the patch size to use
every pixel.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from opendino.models.rope import ROPE_DTYPES, RopePositionEmbedding, apply_rope

Rope = tuple[Tensor, Tensor] | None


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, weight only (the official ``rmsnorm`` layer)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


NORM_LAYERS: dict[str, Callable[[int], nn.Module]] = {
    "layernorm": lambda dim: nn.LayerNorm(dim, eps=1e-6),
    # The official name; it does not change the dtype, only the eps (all released models use it).
    "layernormbf16": lambda dim: nn.LayerNorm(dim, eps=1e-5),
    "rmsnorm": lambda dim: RMSNorm(dim, eps=1e-5),
}
SWIGLU_ALIGN = {"swiglu": 8, "swiglu32": 32, "swiglu64": 64, "swiglu128": 128}
FFN_LAYERS = ("mlp", *SWIGLU_ALIGN)


def swiglu_hidden_dim(hidden: int, align: int) -> int:
    """The official SwiGLU width: two thirds of the MLP width, rounded up to a multiple of ``align``."""
    d = int(hidden * 2 / 3)
    return d + (-d % align)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.proj.in_channels * self.patch_size**2)
        nn.init.uniform_(self.proj.weight, -bound, bound)
        nn.init.uniform_(self.proj.bias, -bound, bound)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        """``[B, h * w, D]`` patch embeddings. The stride-``p`` ``p x p`` convolution is computed as the
        matrix product it is: cuDNN's default algorithm for it in bf16 took 0.8 ms per ViT-S batch of 64
        global crops on an H200 (benchmarks/train_step.py); the weights keep the convolution's layout."""
        B, C, H, W = x.shape
        p = self.patch_size
        h, w = H // p, W // p
        patches = x[:, :, : h * p, : w * p].reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5)
        weight = self.proj.weight.reshape(self.proj.out_channels, -1)
        return F.linear(patches.reshape(B, h * w, C * p * p), weight, self.proj.bias), h, w


class LinearKMaskedBias(nn.Linear):
    """qkv projection whose key bias is forced to zero by a persistent ``bias_mask`` buffer."""

    def __init__(self, in_features: int, out_features: int, device=None) -> None:
        super().__init__(in_features, out_features, bias=True, device=device)
        self.register_buffer("bias_mask", torch.full((out_features,), math.nan, device=device))

    def reset_bias_mask(self) -> None:
        third = self.out_features // 3
        self.bias_mask.fill_(1.0)
        self.bias_mask[third : 2 * third] = 0.0

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias * self.bias_mask.to(self.bias.dtype))


def _cat_apply(fn: Callable[[Tensor], Tensor], xs: Sequence[Tensor]) -> list[Tensor]:
    """Applies a token-wise ``fn`` to several ``[B_i, N_i, D]`` tensors in one call (one big matmul)."""
    if len(xs) == 1:
        return [fn(xs[0])]
    flat = fn(torch.cat([x.flatten(0, 1) for x in xs]))
    sizes = [x.shape[0] * x.shape[1] for x in xs]
    return [y.unflatten(0, x.shape[:2]) for y, x in zip(flat.split(sizes), xs, strict=True)]


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, proj_bias: bool, mask_k_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        if qkv_bias and mask_k_bias:
            self.qkv = LinearKMaskedBias(dim, 3 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def _heads(self, qkv: Tensor, rope: Rope) -> tuple[Tensor, Tensor, Tensor]:
        B, N, _ = qkv.shape
        q, k, v = qkv.view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # [B, h, N, d]
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def _attend(self, qkv: Tensor, rope: Rope) -> Tensor:
        q, k, v = self._heads(qkv, rope)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)

    def attention_probs(self, x: Tensor, rope: Rope, queries: int | None = None) -> Tensor:
        """The attention probabilities ``[B, h, Q, N]`` of the first ``queries`` (default: all N) of the
        (normalised) tokens ``x`` ``[B, N, D]``: what the fused kernel computes without showing, for
        diagnostics."""
        q, k, _ = self._heads(self.qkv(x), rope)
        return (q[:, :, :queries] @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)

    def forward(self, xs: Sequence[Tensor], ropes: Sequence[Rope]) -> list[Tensor]:
        qkvs = _cat_apply(self.qkv, xs)
        out = [self._attend(qkv, rope) for qkv, rope in zip(qkvs, ropes, strict=True)]
        return _cat_apply(self.proj, out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=bias)
        self.w2 = nn.Linear(dim, hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_value)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block on a list of token groups (crops of different sizes)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        ffn_hidden: int,
        ffn_layer: str,
        norm_layer: str,
        qkv_bias: bool,
        proj_bias: bool,
        ffn_bias: bool,
        mask_k_bias: bool,
        layerscale_init: float | None,
    ) -> None:
        super().__init__()
        self.norm1 = NORM_LAYERS[norm_layer](dim)
        self.attn = SelfAttention(dim, num_heads, qkv_bias, proj_bias, mask_k_bias)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.norm2 = NORM_LAYERS[norm_layer](dim)
        if ffn_layer == "mlp":
            self.mlp = Mlp(dim, ffn_hidden, ffn_bias)
        else:
            self.mlp = SwiGLUFFN(dim, swiglu_hidden_dim(ffn_hidden, SWIGLU_ALIGN[ffn_layer]), ffn_bias)
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()

    def _attn_branch(self, xs: Sequence[Tensor], ropes: Sequence[Rope]) -> list[Tensor]:
        return _cat_apply(self.ls1, self.attn(_cat_apply(self.norm1, xs), ropes))

    def _ffn_branch(self, xs: Sequence[Tensor]) -> list[Tensor]:
        return _cat_apply(lambda t: self.ls2(self.mlp(self.norm2(t))), xs)

    def _residual(
        self, xs: list[Tensor], branch: Callable[[list[Tensor]], list[Tensor]], subsets: Sequence[Tensor] | None
    ) -> list[Tensor]:
        if subsets is None:
            return [x + y for x, y in zip(xs, branch(xs), strict=True)]
        # Official stochastic depth: the branch runs on a random subset of the batch and is added back
        # scaled by B / subset; the other samples skip it (docs/design/recipe.md §1.4).
        ys = branch([x[idx] for x, idx in zip(xs, subsets, strict=True)])
        out = []
        for x, y, idx in zip(xs, ys, subsets, strict=True):
            scale = x.shape[0] / len(idx)
            out.append(torch.index_add(x.flatten(1), 0, idx, y.flatten(1).to(x.dtype), alpha=scale).view_as(x))
        return out

    def forward(
        self, xs: list[Tensor], ropes: Sequence[Rope], subsets: tuple[Sequence[Tensor], Sequence[Tensor]] | None = None
    ) -> list[Tensor]:
        """``subsets``: with stochastic depth, the rows of each token group that run the attention and the
        FFN branch (``drop_path_subsets``); None runs both on every row."""
        attn_rows, ffn_rows = subsets if subsets is not None else (None, None)
        if attn_rows is not None:  # per-row rotations ([B, 1, K, d], forward_kept) follow their rows
            ropes = [
                r if r is None or r[0].dim() < 4 else (r[0][rows], r[1][rows])
                for r, rows in zip(ropes, attn_rows, strict=True)
            ]
        xs = self._residual(xs, lambda t: self._attn_branch(t, ropes), attn_rows)
        return self._residual(xs, self._ffn_branch, ffn_rows)


def drop_path_subsets(
    batch_sizes: Sequence[int], rate: float, n_draws: int, device: torch.device
) -> list[list[Tensor]]:
    """For each of ``n_draws`` residual branches, a random subset of ``max(int(B * (1 - rate)), 1)`` rows of
    each token group (batch ``B``). All draws of a group come from one ``rand`` and one ``argsort`` (a uniform
    random permutation per row): on a GPU, one ``randperm`` per block, branch and group cost 7-14 ms of host
    time per ViT-S training step (profiled on an H200), a tenth of the step."""
    per_group = []
    for b in batch_sizes:
        keep = max(int(b * (1 - rate)), 1)
        per_group.append(torch.rand(n_draws, b, device=device).argsort(dim=-1)[:, :keep].unbind(0))
    return [list(rows) for rows in zip(*per_group, strict=True)]


class DinoVisionTransformer(nn.Module):
    """DINOv3 ViT. Constructor arguments carry the official names, so official ``model_kwargs`` work."""

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        pos_embed_rope_base: float | None = 100.0,
        pos_embed_rope_min_period: float | None = None,
        pos_embed_rope_max_period: float | None = None,
        pos_embed_rope_normalize_coords: str = "separate",
        pos_embed_rope_shift_coords: float | None = None,
        pos_embed_rope_jitter_coords: float | None = None,
        pos_embed_rope_rescale_coords: float | None = None,
        pos_embed_rope_dtype: str = "bf16",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        ffn_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        layerscale_init: float | None = None,
        norm_layer: str = "layernorm",
        ffn_layer: str = "mlp",
        ffn_bias: bool = True,
        proj_bias: bool = True,
        n_storage_tokens: int = 0,
        mask_k_bias: bool = False,
        untie_cls_and_patch_norms: bool = False,
        untie_global_and_local_cls_norm: bool = False,
        global_pool: str = "token",
        device: torch.device | str | None = None,
    ) -> None:
        """``global_pool``: the image's global feature (:func:`global_feature`): the CLS token (DINO), or
        ``avg``, the mean patch token (a recipe whose CLS token is not trained, I-JEPA)."""
        super().__init__()
        _check_choice("norm_layer", norm_layer, NORM_LAYERS)
        _check_choice("ffn_layer", ffn_layer, FFN_LAYERS)
        _check_choice("pos_embed_rope_dtype", pos_embed_rope_dtype, ROPE_DTYPES)
        _check_choice("global_pool", global_pool, ("token", "avg"))
        self.global_pool = global_pool
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.img_size = img_size
        self.patch_size = self.feature_stride = patch_size  # feature_stride: pixels per output token
        self.embed_dim = self.num_features = embed_dim
        self.n_blocks = depth
        self.num_heads = num_heads
        self.n_storage_tokens = n_storage_tokens
        self.untie_cls_and_patch_norms = untie_cls_and_patch_norms
        self.untie_global_and_local_cls_norm = untie_global_and_local_cls_norm
        self.layerscale_init = layerscale_init
        self.drop_path_rate = drop_path_rate  # the same rate for every block, as the official recipe

        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            if n_storage_tokens > 0:
                self.storage_tokens = nn.Parameter(torch.zeros(1, n_storage_tokens, embed_dim))
            self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
            self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
            self.rope_embed = RopePositionEmbedding(
                embed_dim,
                num_heads=num_heads,
                base=pos_embed_rope_base,
                min_period=pos_embed_rope_min_period,
                max_period=pos_embed_rope_max_period,
                normalize_coords=pos_embed_rope_normalize_coords,
                shift_coords=pos_embed_rope_shift_coords,
                jitter_coords=pos_embed_rope_jitter_coords,
                rescale_coords=pos_embed_rope_rescale_coords,
                dtype=ROPE_DTYPES[pos_embed_rope_dtype],
            )
            block_kwargs = dict(
                ffn_hidden=int(embed_dim * ffn_ratio),
                ffn_layer=ffn_layer,
                norm_layer=norm_layer,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                mask_k_bias=mask_k_bias,
                layerscale_init=layerscale_init,
            )
            self.blocks = nn.ModuleList(Block(embed_dim, num_heads, **block_kwargs) for _ in range(depth))
            self.norm = NORM_LAYERS[norm_layer](embed_dim)
            if untie_cls_and_patch_norms:
                self.cls_norm = NORM_LAYERS[norm_layer](embed_dim)
            if untie_global_and_local_cls_norm:
                self.local_cls_norm = NORM_LAYERS[norm_layer](embed_dim)
            self.head = nn.Identity()
        if device is None or torch.device(device).type != "meta":
            self.init_weights()

    # -- initialisation ---------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """The official initialisation (docs/design/recipe.md §1.7)."""
        self.rope_embed.reset_parameters()
        nn.init.normal_(self.cls_token, std=0.02)
        if self.n_storage_tokens > 0:
            nn.init.normal_(self.storage_tokens, std=0.02)
        nn.init.zeros_(self.mask_token)
        self.patch_embed.reset_parameters()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
                if isinstance(m, LinearKMaskedBias):
                    m.reset_bias_mask()
            elif isinstance(m, (nn.LayerNorm, RMSNorm, LayerScale)):
                m.reset_parameters()

    # -- forward ----------------------------------------------------------------------------------
    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> tuple[Tensor, int, int]:
        x, h, w = self.patch_embed(x)
        B = x.shape[0]
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
            cls_token = self.cls_token
        else:
            # Keeps mask_token in the autograd graph (a numerical no-op), as the official model does.
            cls_token = self.cls_token + 0 * self.mask_token
        prefix = [cls_token.expand(B, -1, -1)]
        if self.n_storage_tokens > 0:
            prefix.append(self.storage_tokens.expand(B, -1, -1))
        return torch.cat([*prefix, x], dim=1), h, w

    def _block_ropes(self, grids: list[tuple[int, int]]) -> list[list[Rope]]:
        """The RoPE rotations of each block (outer list) and token group (inner list)."""
        n = len(self.blocks)
        if self.rope_embed.augments:
            # Every block and crop group gets its own draw (block-major, the official order), computed for
            # all blocks of a group at once.
            shift, scale = (t.unflatten(0, (n, len(grids))) for t in self.rope_embed.draw_augmentations(n * len(grids)))
            drawn = [self.rope_embed(h, w, shift[:, g], scale[:, g]) for g, (h, w) in enumerate(grids)]
            return [[(sin[i], cos[i]) for sin, cos in drawn] for i in range(n)]
        return [[self.rope_embed(h, w) for h, w in grids]] * n

    def _iter_blocks(
        self, xs: list[Tensor], grids: list[tuple[int, int]], kept: Sequence[Tensor | None] | None = None
    ) -> Iterator[list[Tensor]]:
        """Yields the token groups after each block. ``kept``: per group, the ``[B, K]`` patch positions
        its patch tokens hold (a subset of the grid, :meth:`forward_kept`), or None for the whole grid."""
        n = len(self.blocks)
        per_block = self._block_ropes(grids)
        if kept is not None:  # each row's rotations at its own positions: [B, 1, K, d] against [B, heads, K, d]
            per_block = [
                [
                    r if r is None or k is None else tuple(t[k].unsqueeze(1) for t in r)
                    for r, k in zip(row, kept, strict=True)
                ]
                for row in per_block
            ]
        subsets = [None] * n
        if self.training and self.drop_path_rate > 0:
            rows = drop_path_subsets([x.shape[0] for x in xs], self.drop_path_rate, 2 * n, xs[0].device)
            subsets = [(rows[2 * i], rows[2 * i + 1]) for i in range(n)]  # (attention, FFN) of block i
        for blk, ropes, rows in zip(self.blocks, per_block, subsets, strict=True):
            xs = blk(xs, ropes, rows)
            yield xs

    def _split_norm(self, x: Tensor, local_crops: bool = False) -> tuple[Tensor, Tensor]:
        """Normalised (cls + storage tokens, patch tokens) of a ``[B, 1+R+N, D]`` block output."""
        n_prefix = 1 + self.n_storage_tokens
        if self.untie_global_and_local_cls_norm and local_crops and self.training:
            prefix = self.local_cls_norm(x[:, :n_prefix])
        elif self.untie_cls_and_patch_norms:
            prefix = self.cls_norm(x[:, :n_prefix])
        else:
            prefix = self.norm(x[:, :n_prefix])
        return prefix, self.norm(x[:, n_prefix:])

    def forward_features_list(self, xs: Sequence[Tensor], masks_list: Sequence[Tensor | None]) -> list[dict]:
        tokens, grids = [], []
        for x, masks in zip(xs, masks_list, strict=True):
            t, h, w = self.prepare_tokens_with_masks(x, masks)
            tokens.append(t)
            grids.append((h, w))
        *_, tokens = self._iter_blocks(tokens, grids)
        outputs = []
        for idx, (x, masks) in enumerate(zip(tokens, masks_list, strict=True)):
            prefix, patches = self._split_norm(x, local_crops=idx == 1)
            outputs.append(
                {
                    "x_norm_clstoken": prefix[:, 0],
                    "x_storage_tokens": prefix[:, 1:],
                    "x_norm_patchtokens": patches,
                    "x_prenorm": x,
                    "masks": masks,
                }
            )
        return outputs

    def forward_kept(self, x: Tensor, kept: Tensor) -> dict:
        """Normalised outputs of the ``[B, K]`` kept patch positions of each image only (the other patches
        never enter the network: an I-JEPA context encoder); ``x_norm_patchtokens`` is ``[B, K, D]``."""
        tokens, h, w = self.prepare_tokens_with_masks(x)
        n_prefix = 1 + self.n_storage_tokens
        patches = tokens[:, n_prefix:].gather(1, kept.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        *_, (out,) = self._iter_blocks([torch.cat([tokens[:, :n_prefix], patches], 1)], [(h, w)], [kept])
        prefix, patches = self._split_norm(out)
        return {"x_norm_clstoken": prefix[:, 0], "x_storage_tokens": prefix[:, 1:], "x_norm_patchtokens": patches}

    def forward_features(
        self, x: Tensor | Sequence[Tensor], masks: Tensor | Sequence[Tensor | None] | None = None
    ) -> dict | list[dict]:
        """One dict for a tensor; a list of dicts for ``[x_global, x_local]`` (index 1 = local crops)."""
        if isinstance(x, torch.Tensor):
            return self.forward_features_list([x], [masks])[0]
        masks = [None] * len(x) if masks is None else masks
        return self.forward_features_list(x, masks)

    def forward(self, *args, is_training: bool = False, **kwargs) -> Tensor | dict | list[dict]:
        out = self.forward_features(*args, **kwargs)
        return out if is_training else self.head(global_feature(self, out))

    def _block_indices(self, n: int | Sequence[int]) -> list[int]:
        indices = list(range(self.n_blocks - n, self.n_blocks)) if isinstance(n, int) else list(n)
        bad = [i for i in indices if not 0 <= i < self.n_blocks]
        if bad or not indices:
            raise ValueError(f"block indices {bad or indices} out of range for a {self.n_blocks}-block model")
        return indices

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        return_extra_tokens: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of the last ``n`` blocks (or of the listed 0-based blocks, in block order)."""
        wanted = set(self._block_indices(n))
        tokens, h, w = self.prepare_tokens_with_masks(x)
        taken = []
        for i, xs in enumerate(self._iter_blocks([tokens], [(h, w)])):
            if i in wanted:
                taken.append(xs[0])
            if i == max(wanted):
                break
        n_prefix = 1 + self.n_storage_tokens
        outputs = []
        for out in taken:
            if norm:
                prefix, patches = self._split_norm(out)
            else:
                prefix, patches = out[:, :n_prefix], out[:, n_prefix:]
            if reshape:
                patches = patches.reshape(out.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()
            item = [patches]
            if return_class_token:
                item.append(prefix[:, 0])
            if return_extra_tokens:
                item.append(prefix[:, 1:])
            outputs.append(item[0] if len(item) == 1 else tuple(item))
        return tuple(outputs)


def global_feature(model: nn.Module, out: dict) -> Tensor:
    """The global feature of a backbone's output dict: its CLS token, or the mean patch token for a model
    built with ``global_pool="avg"`` (ConvNeXt's CLS entry is already its pooled feature)."""
    if getattr(model, "global_pool", "token") == "avg":
        return out["x_norm_patchtokens"].mean(1)
    return out["x_norm_clstoken"]


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of: {', '.join(choices)}")
