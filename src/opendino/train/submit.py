"""``opendino submit``: a training run as a SLURM job array of one, through submitit.

One task per GPU on each node; submitit exports the torch.distributed environment (rank, world size,
master address) from SLURM's, and the trainer joins the group as under torchrun. On preemption or
time-out SLURM signals the job, submitit requeues it, and the requeued job resumes from the run's last
checkpoint (every start of a run in a folder with checkpoints resumes). ``cluster="local"`` runs the same
job in local processes (for tests and for trying a submission on a workstation).
"""

from __future__ import annotations

from pathlib import Path

import submitit


class TrainJob(submitit.helpers.Checkpointable):
    """The callable submitit pickles: a config path and its overrides. ``Checkpointable`` requeues the
    same call on preemption, which is all a resuming trainer needs."""

    def __init__(self, config: str | None, overrides: list[str]) -> None:
        self.config, self.overrides = config, list(overrides)

    def __call__(self) -> str:
        from opendino.train.config import load_train_config
        from opendino.train.trainer import Trainer

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return str(Trainer(load_train_config(self.config, self.overrides)).run())


def submit(
    config: str | None,
    overrides: list[str],
    run_dir: Path,
    *,
    nodes: int = 1,
    gpus_per_node: int = 0,
    tasks_per_node: int | None = None,
    cpus_per_task: int = 8,
    timeout_min: int = 60 * 24,
    partition: str | None = None,
    account: str | None = None,
    qos: str | None = None,
    cluster: str | None = None,
) -> submitit.Job:
    """Submits the run (``cluster``: ``slurm``, or ``local`` processes); logs go to ``<run.dir>/submitit/``.
    Returns the submitit job."""
    folder = run_dir / "submitit" / "%j"
    tasks = tasks_per_node or max(1, gpus_per_node)
    if cluster == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=timeout_min, gpus_per_node=gpus_per_node, tasks_per_node=tasks)
    elif cluster in (None, "slurm"):
        executor = submitit.SlurmExecutor(folder=folder)
        optional = {"partition": partition, "account": account, "qos": qos}
        executor.update_parameters(
            job_name=f"opendino-{run_dir.name}",
            nodes=nodes,
            ntasks_per_node=tasks,
            gpus_per_node=gpus_per_node,
            cpus_per_task=cpus_per_task,
            time=timeout_min,
            signal_delay_s=120,  # time to finish the step in flight before the requeue
            **{k: v for k, v in optional.items() if v is not None},
        )
    else:
        raise ValueError(f"cluster={cluster!r}; valid: slurm, local")
    return executor.submit(TrainJob(config, overrides))
