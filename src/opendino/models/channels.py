"""Fitting released weights to a model with another number of input channels (multispectral, microscopy).

Only the first layer sees the channels: the ViT patch embedding (``patch_embed.proj.weight``) or the
ConvNeXt stem (``downsample_layers.0.0.weight``), both ``[out, C, k, k]``. A file with C channels is
fitted to a model with N by one of two rules (``init.new_channels``):

- ``mean``: the N filters are the C file filters followed by N - C copies of their mean (N < C: N copies of
  the mean), the whole weight rescaled by C / N. The layer's response to an image whose channels are all
  equal is then unchanged, whatever N, so the first activations keep their scale.
- ``zero``: the new channels' filters are zero and nothing is rescaled (N > C only): the fitted model
  gives exactly the file's features on the first C channels whatever the others hold, and learns the
  others from there.

A file whose patch size (first-layer kernel) differs from the model's is refused: resampling a patch
embedding changes what every later layer sees.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from opendino.models.checkpoint import CheckpointError, closest_architecture

INPUT_LAYERS = ("patch_embed.proj.weight", "downsample_layers.0.0.weight")  # ViT, ConvNeXt
NEW_CHANNEL_RULES = ("mean", "zero")


def input_layer(state: Mapping[str, Tensor]) -> str | None:
    """The key of the first layer's weight in an official-layout state dict (None if it has neither)."""
    return next((k for k in INPUT_LAYERS if k in state), None)


def expand_channels(weight: Tensor, channels: int, rule: str = "mean") -> Tensor:
    """``[out, C, k, k]`` -> ``[out, channels, k, k]`` by ``rule`` (module docstring)."""
    have = weight.shape[1]
    if rule not in NEW_CHANNEL_RULES:
        raise ValueError(f"new-channel rule {rule!r}; valid: {', '.join(NEW_CHANNEL_RULES)}")
    if channels == have:
        return weight
    if rule == "zero":
        if channels < have:
            raise CheckpointError(
                f"init.new_channels=zero adds channels; the model takes {channels} < the file's {have}: use mean"
            )
        return torch.cat([weight, weight.new_zeros(weight.shape[0], channels - have, *weight.shape[2:])], 1)
    mean = weight.mean(1, keepdim=True)
    kept = weight if channels > have else weight[:, :0]
    filled = torch.cat([kept, mean.expand(-1, channels - kept.shape[1], -1, -1)], 1)
    return filled * (have / channels)


def fit_input_layer(
    state: Mapping[str, Tensor], model: nn.Module, source: str, rule: str = "mean"
) -> dict[str, Tensor]:
    """``state`` with its first layer fitted to ``model``'s input channels; a clear error when the
    patch size (kernel) differs. Other mismatches are left to the strict load that follows."""
    state = dict(state)
    key = input_layer(state)
    own = model.state_dict().get(key) if key is not None else None
    if own is None:
        return state
    weight = state[key]
    if weight.shape[2:] != own.shape[2:]:
        what = "patch size" if key.startswith("patch_embed") else "stem kernel"
        closest, _ = closest_architecture(state)
        raise CheckpointError(
            f"{source} has {what} {weight.shape[-1]} but the model has {own.shape[-1]}: a checkpoint fits only "
            f"a model of its own {what}; the closest known architecture to the file is {closest} "
            f"(model.arch={closest})"
        )
    if weight.shape[1] != own.shape[1]:
        state[key] = expand_channels(weight, own.shape[1], rule)
    return state
