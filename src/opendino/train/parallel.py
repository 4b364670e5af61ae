"""Where a recipe's modules are wrapped for speed and scale, in one place and in the order PyTorch's
composable APIs expect (docs/design/recipe.md §3.11): activation checkpointing per block, then
``torch.compile`` per block (and per head), then data parallelism: DDP (``replicate``) or FSDP2
(``fully_shard`` per block, per backbone and at the root). What may be wrapped is the recipe's
``parallel_plan()`` (recipes/base.py). All of them work in place, so parameter names and checkpoints do
not change.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed._composable.replicate import replicate
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from opendino.recipes.base import ParallelPlan
from opendino.train.config import ParallelConfig

# Selective checkpointing keeps the outputs of the expensive ops and recomputes the cheap ones.
_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _save_expensive(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _backbone(model: nn.Module) -> nn.Module:
    """A model's backbone (``model.backbone``), or the model itself when it is one."""
    return getattr(model, "backbone", model)


def _blocks(backbone: nn.Module) -> list[nn.Module]:
    """The repeated units of a backbone: ViT blocks, or ConvNeXt stages with their downsampling layers."""
    if hasattr(backbone, "blocks"):
        return list(backbone.blocks)
    return [m for name in ("downsample_layers", "stages") for m in getattr(backbone, name, [])]


def apply_activation_checkpointing(plan: ParallelPlan, mode: str) -> None:
    """``full``: every block recomputes its forward in the backward; ``selective``: only the cheap ops do;
    ``none`` (the modes are checked with the configuration)."""
    if mode == "none" or plan.trained is None:
        return
    kwargs = {} if mode == "full" else {"context_fn": lambda: create_selective_checkpoint_contexts(_save_expensive)}
    for block in _blocks(_backbone(plan.trained)):  # only the trained module keeps activations for a backward
        checkpoint(block, **kwargs)


def compile_modules(owner: nn.Module, plan: ParallelPlan, heads: bool = True, methods: bool = True) -> None:
    """Compiles every transformer block of the plan's ``compiled`` modules (one graph serves all blocks of
    a depth, so compilation time does not grow with depth) and, with ``heads``, its ``dynamic`` modules
    (heads see a varying number of rows: the masked tokens). ``methods``: the plan's loss regions
    (Sinkhorn-Knopp and the cross-entropies over the ``[M, K]`` logits, many float32 passes in eager
    mode), only for a single process: under data parallelism they hold all-reduces."""
    for model in plan.compiled:
        for block in getattr(_backbone(model), "blocks", []):
            block.compile()
    if heads:
        for head in plan.dynamic:
            head.compile(dynamic=True)
    if methods:
        for name in plan.compiled_methods:
            setattr(owner, name, torch.compile(getattr(owner, name)))


def _precision(cfg: ParallelConfig) -> MixedPrecisionPolicy:
    """FSDP2 compute in ``parallel.param_dtype``, gradients reduced in fp32."""
    bf16 = cfg.param_dtype == "bf16"
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)


def _fully_shard(model: nn.Module, policy: MixedPrecisionPolicy) -> None:
    backbone = _backbone(model)
    for block in _blocks(backbone):
        fully_shard(block, mp_policy=policy, reshard_after_forward=True)
    if backbone is not model:
        fully_shard(backbone, mp_policy=policy, reshard_after_forward=True)
    fully_shard(model, mp_policy=policy, reshard_after_forward=True)
    if hasattr(backbone, "forward_kept"):  # called by I-JEPA's model instead of forward: unshard around it too
        register_fsdp_forward_method(backbone, "forward_kept")


def apply_data_parallel(plan: ParallelPlan, cfg: ParallelConfig, device: torch.device) -> None:
    """DDP replicates the trained module (companions stay plain: no gradients, identical updates on every
    rank). FSDP2 shards the plan's ``sharded`` modules, the trained one and its companions alike (so an
    EMA update is local to each shard), without optimizer state for the companions."""
    if cfg.data_parallel == "ddp":
        if plan.trained is not None:
            replicate(plan.trained, device_ids=[device.index] if device.type == "cuda" else None)
        return
    policy = _precision(cfg)
    for model in [plan.trained, *plan.sharded] if plan.trained is not None else plan.sharded:
        _fully_shard(model, policy)


def parallelize(owner: nn.Module, cfg: ParallelConfig, compile: bool, world_size: int, device: torch.device) -> None:
    """Activation checkpointing -> compile -> data parallelism (only with more than one rank), for a recipe
    or a shared pass (``owner.parallel_plan()``)."""
    cfg.check()  # the modes' one rule, also for callers that built the section themselves
    plan = owner.parallel_plan()
    apply_activation_checkpointing(plan, cfg.activation_checkpointing)
    if compile:
        compile_modules(owner, plan, methods=world_size == 1)
    if world_size > 1:
        apply_data_parallel(plan, cfg, device)
