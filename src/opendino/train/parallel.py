"""Where a recipe's modules are wrapped for speed and scale, in one place and in the order PyTorch's
composable APIs expect (recipe.md §3.11): activation checkpointing per block, then ``torch.compile`` per
block (and per head), then data parallelism: DDP (``replicate``) or FSDP2 (``fully_shard`` per block, per
backbone and at the root). All of them work in place, so parameter names and checkpoints do not change.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed._composable.replicate import replicate
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

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


def _blocks(backbone: nn.Module) -> list[nn.Module]:
    """The repeated units of a backbone: ViT blocks, or ConvNeXt stages with their downsampling layers."""
    if hasattr(backbone, "blocks"):
        return list(backbone.blocks)
    return [m for name in ("downsample_layers", "stages") for m in getattr(backbone, name, [])]


def apply_activation_checkpointing(recipe: nn.Module, mode: str) -> None:
    """``full``: every block recomputes its forward in the backward; ``selective``: only the cheap ops do;
    ``none`` (the modes are checked with the configuration)."""
    if mode == "none":
        return
    kwargs = {} if mode == "full" else {"context_fn": lambda: create_selective_checkpoint_contexts(_save_expensive)}
    for block in _blocks(recipe.student.backbone):  # only the student keeps activations for a backward
        checkpoint(block, **kwargs)


def compile_recipe(recipe: nn.Module, heads: bool = True, losses: bool = True) -> None:
    """Compiles every transformer block of the student and teacher backbones (one graph serves all blocks
    of a depth, so compilation time does not grow with depth) and, with ``heads``, the projection heads.
    Heads see a varying number of rows (the masked tokens), so they are compiled with dynamic shapes.
    ``losses``: the loss region (Sinkhorn-Knopp and the cross-entropies over the ``[M, K]`` logits, many
    float32 passes in eager mode); its row count ``M`` becomes dynamic after the first change. Only for a
    single process: under data parallelism the region holds the Sinkhorn-Knopp all-reduces."""
    for model in (recipe.student, recipe.teacher):
        _compile(model, heads)
    if losses:
        recipe.loss_terms = torch.compile(recipe.loss_terms)


def _compile(model: nn.Module, heads: bool = True) -> None:
    for block in getattr(model.backbone, "blocks", []):
        block.compile()
    if heads:
        for head in (model.dino_head, model.ibot_head):
            head.compile(dynamic=True)


def _precision(cfg: ParallelConfig) -> MixedPrecisionPolicy:
    """FSDP2 compute in ``parallel.param_dtype``, gradients reduced in fp32."""
    bf16 = cfg.param_dtype == "bf16"
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)


def _fully_shard(model: nn.Module, backbone: nn.Module, policy: MixedPrecisionPolicy) -> None:
    for block in _blocks(backbone):
        fully_shard(block, mp_policy=policy, reshard_after_forward=True)
    if backbone is not model:
        fully_shard(backbone, mp_policy=policy, reshard_after_forward=True)
    fully_shard(model, mp_policy=policy, reshard_after_forward=True)


def apply_data_parallel(recipe: nn.Module, cfg: ParallelConfig, device: torch.device) -> None:
    """DDP replicates the student (the EMA and Gram teachers stay plain: no gradients, identical updates on
    every rank). FSDP2 shards the student and, identically, the EMA teacher (so the EMA update is local to
    each shard) and the Gram teacher, without optimizer state for the teachers."""
    if cfg.data_parallel == "ddp":
        replicate(recipe.student, device_ids=[device.index] if device.type == "cuda" else None)
        return
    policy = _precision(cfg)
    for model in (recipe.student, recipe.teacher):
        _fully_shard(model, model.backbone, policy)
    if recipe.gram_teacher is not None:
        _fully_shard(recipe.gram_teacher, recipe.gram_teacher, policy)


def parallelize_frozen(model: nn.Module, cfg: ParallelConfig, compile: bool, world_size: int) -> None:
    """A frozen model outside the recipe (the distillation teacher): compiled per block and head like the
    students, then sharded like them under FSDP (over all ranks), replicated as it is under DDP."""
    if compile:
        _compile(model)
    if world_size > 1 and cfg.data_parallel == "fsdp":
        _fully_shard(model, model.backbone, _precision(cfg))


def parallelize(recipe: nn.Module, cfg: ParallelConfig, compile: bool, world_size: int, device: torch.device) -> None:
    """Activation checkpointing -> compile -> data parallelism (only with more than one rank)."""
    apply_activation_checkpointing(recipe, cfg.activation_checkpointing)
    if compile:
        compile_recipe(recipe, losses=world_size == 1)
    if world_size > 1:
        apply_data_parallel(recipe, cfg, device)
