"""The DINO / iBOT projection head (docs/design/recipe.md §2.1).

An MLP to a bottleneck, L2 normalisation, then a bias-free linear layer onto the prototypes. Unlike
DINOv2 there is no weight normalisation on the last layer.
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
    ) -> None:
        super().__init__()
        self.last_layer_std = last_layer_std
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
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
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

    def forward(self, x: Tensor, no_last_layer: bool = False, only_last_layer: bool = False) -> Tensor:
        """``no_last_layer`` returns the normalised bottleneck; ``only_last_layer`` applies the prototypes
        to an already normalised bottleneck (used to gather bottlenecks across ranks first)."""
        if not only_last_layer:
            x = self.mlp(x)
            x = F.normalize(x, p=2, dim=-1, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        if no_last_layer:
            return x
        return self.last_layer(x)
