"""Parameter groups of a student-teacher recipe (docs/design/recipe.md §3.8).

Per student submodule (backbone, DINO head, iBOT head): layer-wise lr decay ``decay ** (L + 1 - layer)``
for modules with ``blocks`` (patch embedding and tokens at layer 0, block ``i`` at ``i + 1``, final norms
at ``L + 1``), an extra multiplier for the patch embedding, no weight decay for biases, norms and
LayerScale, a separate (frozen at first) learning rate for the heads' last layers. Groups with equal
settings are fused (across submodules), so AdamW runs few, large multi-tensor groups. The loop applies its
lr and weight-decay schedules to each group through the multipliers (train/optim.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from torch import nn

_LAYER_ZERO = ("patch_embed", "cls_token", "storage_tokens", "mask_token", "pos_embed", "register_tokens")


@dataclasses.dataclass
class ParamSetting:
    name: str  # "<submodule>.<name relative to it>"
    param: nn.Parameter
    lr_multiplier: float
    wd_multiplier: float
    is_last_layer: bool


def param_settings(
    student: Mapping[str, nn.Module] | nn.Module, layerwise_decay: float = 0.9, patch_embed_lr_mult: float = 0.2
) -> list[ParamSetting]:
    """One setting per trainable parameter of the student's submodules (a module's children, or a mapping)."""
    settings = []
    for sub_name, module in student.items() if isinstance(student, Mapping) else student.named_children():
        n_blocks = len(module.blocks) if hasattr(module, "blocks") else 0
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            lr_mult = 1.0
            if n_blocks:
                if name.startswith(_LAYER_ZERO):
                    layer = 0
                elif name.startswith("blocks."):
                    layer = int(name.split(".")[1]) + 1
                else:
                    layer = n_blocks + 1
                lr_mult = layerwise_decay ** (n_blocks + 1 - layer)
            if name.startswith("patch_embed"):
                lr_mult *= patch_embed_lr_mult
            no_decay = name.endswith("bias") or any(k in name for k in ("norm", "gamma", "fourier_w"))
            settings.append(
                ParamSetting(f"{sub_name}.{name}", param, lr_mult, 0.0 if no_decay else 1.0, "last_layer" in name)
            )
    return settings


def param_groups(
    settings: list[ParamSetting],
    fuse: bool = True,
    frozen_until: dict[str, int] | None = None,
    ramp_steps: dict[str, int] | None = None,
    merge_submodules: bool = True,
) -> list[dict]:
    """Optimizer groups; fused ones merge the parameters of equal settings (lr and wd multipliers, last
    layer, freeze and ramp): one group per distinct setting across submodules (``merge_submodules``; the
    same update as a group per submodule, in fewer and larger multi-tensor kernels), or within each.
    ``frozen_until``: submodule name -> the step before which its lr is 0 (heads warming up);
    ``ramp_steps``: submodule name -> the steps over which its lr then ramps back (train/optim.py)."""
    groups: dict[tuple, dict] = {}
    for i, s in enumerate(settings):
        submodule = s.name.split(".")[0]
        frozen, ramp = (frozen_until or {}).get(submodule, 0), (ramp_steps or {}).get(submodule, 0)
        key = (s.lr_multiplier, s.wd_multiplier, s.is_last_layer, frozen, ramp)
        key = (i,) if not fuse else key if merge_submodules else (submodule, *key)
        group = groups.setdefault(
            key,
            {
                "params": [],
                "names": [],
                "lr_multiplier": s.lr_multiplier,
                "wd_multiplier": s.wd_multiplier,
                "is_last_layer": s.is_last_layer,
                "frozen_until": frozen,
                "ramp_steps": ramp,
            },
        )
        group["params"].append(s.param)
        group["names"].append(s.name)
    return list(groups.values())
