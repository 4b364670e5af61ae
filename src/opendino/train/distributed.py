"""The process group of a run: rank, world size and device from the environment torchrun (or submitit on
SLURM) sets, and the few collectives the trainer needs outside the losses. One process without those
variables is a world of one, and every helper here is then a no-op."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from typing import NoReturn

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class DistributedEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` is the GPU of this process's local rank when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available; valid here: auto, cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def init_distributed(device_name: str) -> tuple[DistributedEnv, torch.device]:
    """Joins the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_*``):
    NCCL on GPUs, gloo on CPUs. Without those variables: one process, no group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    env = DistributedEnv(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_name, env.local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return env, device


def close_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()  # no rank tears the group down while another still talks to it
        dist.destroy_process_group()


def exit_finished_rank(code: int = 0) -> NoReturn:
    """Ends a rank of a finished multi-process run at once, without interpreter teardown. Once functional
    collectives (FSDP2, DTensor) have used the process group, PyTorch keeps it and gloo's worker threads alive
    after ``destroy_process_group``, and a worker thread that frees a tensor while the interpreter finalizes
    aborts the process (SIGABRT, "terminate called without an active exception"; pytorch/pytorch#179291):
    a failed exit status for a run whose work is all written. Call it after every file is closed."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Averages scalar tensors over all ranks in one collective and reads them on the host."""
    if not values:
        return {}
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(values, stacked.tolist(), strict=True))


def sum_over_ranks(value: int, device: torch.device) -> int:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return int(t.item())


def gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
