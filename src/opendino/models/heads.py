"""The DINO / iBOT projection heads (docs/design/recipe.md §2.1, docs/design/peers.md).

``DINOHead``: an MLP to a bottleneck, L2 normalisation, then a bias-free linear layer onto the prototypes;
DINOv2's weight-normalised prototype layer is an option. ``MatryoshkaHead`` (Franca): one such head per
nested granularity of the backbone embedding, the prototypes scaled with it; the logits of all levels are
concatenated, ``level_sizes`` says where each level's are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DINOHead(nn.Module):
    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        mlp_bias: bool = True,
        last_layer_std: float = 0.02,
        normalize: bool = True,
        bottleneck_gelu: bool = False,
        weight_norm: bool = False,
    ) -> None:
        """``normalize``: L2-normalise the bottleneck (DINO; Franca's nested heads do not);
        ``bottleneck_gelu``: a GELU after the bottleneck layer too (Franca); ``weight_norm``: the prototype
        layer is weight-normalised, its norms starting at 1 (DINOv2, Franca)."""
        super().__init__()
        self.last_layer_std, self.normalize = last_layer_std, normalize
        if nlayers < 1:
            raise ValueError(f"DINOHead needs nlayers >= 1, got {nlayers}")
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim, bias=mlp_bias)
        else:
            layers: list[nn.Module] = []
            dims = [in_dim] + [hidden_dim] * (nlayers - 1)
            for a, b in zip(dims[:-1], dims[1:], strict=True):
                layers.append(nn.Linear(a, b, bias=mlp_bias))
                if use_bn:
                    layers.append(nn.BatchNorm1d(b))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=mlp_bias))
            self.mlp = nn.Sequential(*layers)
        if bottleneck_gelu:
            self.mlp = nn.Sequential(self.mlp, nn.GELU())
        self.last_layer = (
            WeightNormLinear(bottleneck_dim, out_dim) if weight_norm else nn.Linear(bottleneck_dim, out_dim, bias=False)
        )
        self.level_sizes = [out_dim]
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The official init (truncated normal, std 0.02); ``last_layer_std`` can start the prototypes
        larger, which makes small, short runs leave the uniform-output start sooner."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=self.last_layer_std if m is self.last_layer else 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if isinstance(self.last_layer, WeightNormLinear):
            self.last_layer.reset_parameters(self.last_layer_std)

    def forward(self, x: Tensor, no_last_layer: bool = False, only_last_layer: bool = False) -> Tensor:
        """``no_last_layer`` returns the normalised bottleneck; ``only_last_layer`` applies the prototypes
        to an already normalised bottleneck (used to gather bottlenecks across ranks first)."""
        if not only_last_layer:
            x = self.mlp(x)
            if self.normalize:
                x = F.normalize(x, p=2, dim=-1, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        if no_last_layer:
            return x
        return self.last_layer(x)


class WeightNormLinear(nn.Module):
    """A bias-free linear layer ``W = g * V / ||V||`` (one norm per output row), with DINOv2's names
    ``weight_g [K, 1]`` and ``weight_v [K, D]``: plain parameters, so that sharding sees two tensors."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.trunc_normal_(self.weight_v, std=std)
        self.weight_g.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True))


class MatryoshkaHead(nn.Module):
    """Franca's nested heads: level ``i`` of ``n`` sees ``d_i = D / 2^(n-1-i)`` features of the backbone
    token, through a learned projection ``D -> d_i`` (Franca's code) or as its first ``d_i`` features
    (``mode="prefix"``, the paper's Matryoshka slicing), and has its own head with ``K d_i / D`` prototypes."""

    def __init__(self, in_dim: int, out_dim: int, levels: int, mode: str = "projection", **head_kwargs) -> None:
        super().__init__()
        if mode not in ("projection", "prefix"):
            raise ValueError(f"MatryoshkaHead mode={mode!r}; valid: projection, prefix")
        if levels < 1 or in_dim % 2 ** (levels - 1) or out_dim % 2 ** (levels - 1):
            raise ValueError(
                f"{levels} nested levels need the width {in_dim} and {out_dim} prototypes divisible by 2^{levels - 1}"
            )
        self.mode = mode
        self.dims = [in_dim >> (levels - 1 - i) for i in range(levels)]
        self.level_sizes = [out_dim >> (levels - 1 - i) for i in range(levels)]
        self.projections = nn.ModuleList(
            nn.Linear(in_dim, d) if mode == "projection" else nn.Identity() for d in self.dims
        )
        self.heads = nn.ModuleList(
            DINOHead(d, k, **head_kwargs) for d, k in zip(self.dims, self.level_sizes, strict=True)
        )
        for proj in self.projections:
            if isinstance(proj, nn.Linear):
                nn.init.trunc_normal_(proj.weight, std=0.02)
                nn.init.zeros_(proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        """The logits of every level, concatenated: ``[M, sum(level_sizes)]``."""
        outs = []
        for d, proj, head in zip(self.dims, self.projections, self.heads, strict=True):
            outs.append(head(proj(x) if self.mode == "projection" else x[..., :d]))
        return torch.cat(outs, dim=-1)
