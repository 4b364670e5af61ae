"""ConvNeXt backbones with the DINOv3 output API and the official state-dict keys (docs/design/recipe.md §1.11).

``forward_features`` returns the same dict as the ViT (the "cls" token is the normalised global average
pool, there are no storage tokens, patch tokens are at stride 32). With ``patch_size`` set, the maps of
``get_intermediate_layers`` are resized to the ``H / patch_size x W / patch_size`` grid of a patch-16 ViT,
so that ConvNeXt students line up with ViT teachers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import StochasticDepth

CONVNEXT_SIZES: dict[str, tuple[list[int], list[int]]] = {
    "tiny": ([3, 3, 9, 3], [96, 192, 384, 768]),
    "small": ([3, 3, 27, 3], [96, 192, 384, 768]),
    "base": ([3, 3, 27, 3], [128, 256, 512, 1024]),
    "large": ([3, 3, 27, 3], [192, 384, 768, 1536]),
}


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dimension of an NCHW map."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, drop_path: float, layer_scale_init_value: float) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.layer_scale_init_value = layer_scale_init_value
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init_value)) if layer_scale_init_value > 0 else None
        self.drop_path = StochasticDepth(drop_path, mode="row")

    def forward(self, x: Tensor) -> Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        if self.gamma is not None:
            y = y * self.gamma
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class ConvNeXt(nn.Module):
    """ConvNeXt with the official constructor arguments, keys and DINOv3 outputs."""

    def __init__(
        self,
        in_chans: int = 3,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        patch_size: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"ConvNeXt needs 4 stages; got depths={list(depths)}, dims={list(dims)}")
        self.depths, self.dims = list(depths), list(dims)
        self.patch_size = patch_size
        self.feature_stride = 32  # pixels per token of forward_features (the last stage)
        self.embed_dim = self.num_features = dims[-1]
        self.n_storage_tokens = 0
        self.n_blocks = 4  # get_intermediate_layers counts stages
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.downsample_layers = nn.ModuleList(
                [nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6))]
            )
            for i in range(3):
                self.downsample_layers.append(
                    nn.Sequential(LayerNorm2d(dims[i], eps=1e-6), nn.Conv2d(dims[i], dims[i + 1], 2, stride=2))
                )
            self.stages = nn.ModuleList()
            start = 0
            for depth, dim in zip(depths, dims, strict=True):
                self.stages.append(
                    nn.Sequential(*(ConvNeXtBlock(dim, rates[start + j], layer_scale_init_value) for j in range(depth)))
                )
                start += depth
            self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
            # The final norm is registered twice, as in the official model: the state dict carries both
            # `norm.*` and `norms.3.*` and strict loading of official checkpoints needs both.
            self.norms = nn.ModuleList([nn.Identity(), nn.Identity(), nn.Identity(), self.norm])
            self.head = nn.Identity()
        if device is None or torch.device(device).type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
            elif isinstance(m, ConvNeXtBlock) and m.gamma is not None:
                m.gamma.fill_(m.layer_scale_init_value)

    def _stage_outputs(self, x: Tensor, last: int) -> list[Tensor]:
        outs = []
        for i in range(last + 1):
            x = self.stages[i](self.downsample_layers[i](x))
            outs.append(x)
        return outs

    def _features(self, x: Tensor, masks: Tensor | None) -> dict:
        x = self._stage_outputs(x, 3)[-1]
        pooled = x.mean(dim=(-2, -1))
        patches = x.flatten(2).transpose(1, 2)
        normed = self.norm(torch.cat([pooled.unsqueeze(1), patches], dim=1))
        return {
            "x_norm_clstoken": normed[:, 0],
            "x_storage_tokens": normed[:, 1:1],
            "x_norm_patchtokens": normed[:, 1:],
            "x_prenorm": patches,
            "masks": masks,
        }

    def forward_features(
        self, x: Tensor | Sequence[Tensor], masks: Tensor | Sequence[Tensor | None] | None = None
    ) -> dict | list[dict]:
        """Masks are accepted for API compatibility and ignored (a ConvNeXt has no mask token)."""
        if isinstance(x, torch.Tensor):
            return self._features(x, masks)
        masks = [None] * len(x) if masks is None else masks
        return [self._features(t, m) for t, m in zip(x, masks, strict=True)]

    def forward(self, *args, is_training: bool = False, **kwargs) -> Tensor | dict | list[dict]:
        out = self.forward_features(*args, **kwargs)
        return out if is_training else self.head(out["x_norm_clstoken"])

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        return_extra_tokens: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of the last ``n`` stages (or of the listed 0-based stages). Only stage 3 is normalised."""
        stages = list(range(4 - n, 4)) if isinstance(n, int) else sorted(set(n))
        if not stages or any(not 0 <= s < 4 for s in stages):
            raise ValueError(f"stage indices {list(stages)} out of range for a 4-stage ConvNeXt")
        H, W = x.shape[-2:]
        maps = self._stage_outputs(x, max(stages))
        outputs = []
        for s in stages:
            fmap = maps[s]
            pooled = fmap.mean(dim=(-2, -1))
            if self.patch_size is not None:
                size = (H // self.patch_size, W // self.patch_size)
                fmap = F.interpolate(fmap, size=size, mode="bilinear", antialias=True)
            h, w = fmap.shape[-2:]
            patches = fmap.flatten(2).transpose(1, 2)
            if norm:
                normed = self.norms[s](torch.cat([pooled.unsqueeze(1), patches], dim=1))
                pooled, patches = normed[:, 0], normed[:, 1:]
            if reshape:
                patches = patches.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()
            item = [patches]
            if return_class_token:
                item.append(pooled)
            if return_extra_tokens:
                item.append(patches.new_zeros(x.shape[0], 0, patches.shape[1] if reshape else patches.shape[-1]))
            outputs.append(item[0] if len(item) == 1 else tuple(item))
        return tuple(outputs)
