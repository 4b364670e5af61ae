"""Scale-out on torch.distributed: 2 CPU processes under torchrun (gloo) train exactly like 1 process
with the global batch, with DDP and FSDP2; a checkpoint written by 2 ranks resumes on 1."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from opendino.models import load_model
from opendino.train.config import ConfigError, load_train_config
from opendino.train.logging import read_metrics
from opendino.train.trainer import Trainer
from tests.conftest import torchrun_train
from tests.recorded_runs import RANK_OVERRIDES, assert_reproduces, summary

B = 4  # images per rank; the single process takes 2 * B
STEPS = 5
TERMS = ("loss", "dino_local", "dino_global", "koleo", "ibot", "grad_norm_backbone", "grad_norm_dino_head")
TINY = {
    "data": {"source": "synthetic", "synthetic_n": 64, "synthetic_size": 48},
    # No stochastic depth: its draws are per rank by design, so they cannot match one process. LayerScale
    # 0.1: with the official 1e-5 all CLS tokens start equal, and KoLeo's -log(distance) of near-equal
    # features turns float rounding (batch 4 vs 8 matmuls) into large differences.
    "model": {
        "arch": "vit_small",
        "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2, "layerscale_init": 0.1},
        "drop_path_rate": 0.0,
    },
    "dino_head": {"prototypes": 64, "hidden_dim": 32, "bottleneck_dim": 16, "last_layer_std": 0.3},
    "ibot_head": {"prototypes": 48, "hidden_dim": 32, "bottleneck_dim": 16, "last_layer_std": 0.3},
    "crops": {"global_size": 32, "local_size": 16, "n_local": 2},
    # KoLeo over the whole global batch: the same loss at any world size (per rank is the official default).
    "loss": {"koleo_group_size": -1},
    "optim": {"epochs": 2, "layerwise_decay": 0.9},
    "train": {"batch_size": B, "epoch_length": 5, "steps": STEPS},
    "checkpoint": {"every": 3, "keep": 2},
    "log": {"every": 1, "progress": False, "tensorboard": False},
    "schedules": {
        "lr": {"start": 0.0, "peak": 2e-3, "end": 1e-4, "warmup_epochs": 0.4},
        "weight_decay": {"start": 0.04, "peak": 0.04, "end": 0.1},
        "teacher_temp": {"start": 0.04, "peak": 0.07, "end": 0.07, "warmup_epochs": 1},
        "momentum": {"start": 0.9, "peak": 0.9, "end": 1.0},
    },
}


@pytest.fixture(scope="module")
def preset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dist") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture(scope="module")
def single(preset, tmp_path_factory) -> Path:
    """The reference: one process, batch 2B."""
    run = tmp_path_factory.mktemp("single") / "run"
    Trainer(load_train_config(preset, [f"run.dir={run}", f"train.batch_size={2 * B}"])).run()
    return run


def _assert_same_losses(a: Path, b: Path, tolerance: float = 1e-5) -> None:
    ra, rb = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(STEPS))
    for x, y in zip(ra, rb, strict=True):
        for key in TERMS:
            assert abs(x[key] - y[key]) <= tolerance * max(1.0, abs(y[key])), (x["step"], key, x[key], y[key])
    ta = load_model(a / "teacher.safetensors").state_dict()
    tb = load_model(b / "teacher.safetensors").state_dict()
    assert max((ta[k] - tb[k]).abs().max().item() for k in ta) < 1e-5


@pytest.mark.parametrize("data_parallel", ["ddp", "fsdp"])
def test_two_ranks_train_like_one_process_with_the_global_batch(preset, single, tmp_path, data_parallel):
    run = tmp_path / data_parallel
    torchrun_train(preset, run, *RANK_OVERRIDES[data_parallel])
    _assert_same_losses(run, single)
    assert_reproduces(data_parallel, summary(run))  # the metrics recorded before the recipe contract
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["parallel"]["data_parallel"] == data_parallel
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002.pt", "step_00000004.pt"]
    state = torch.load(run / "checkpoints" / "step_00000004.pt", weights_only=True)
    assert len(state["rng"]) == 2  # one random state per rank
    assert state["model"]["student.backbone.cls_token"].shape == (1, 1, 32)  # full, not sharded


def test_a_checkpoint_of_two_ranks_resumes_on_one(preset, single, tmp_path):
    run = tmp_path / "resumed"
    torchrun_train(preset, run, "train.steps=3", "parallel.data_parallel=fsdp", "parallel.param_dtype=fp32")
    assert len(read_metrics(run)) == 3
    Trainer(load_train_config(preset, [f"run.dir={run}", f"train.batch_size={2 * B}"])).run()
    _assert_same_losses(run, single)


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_checkpointing_changes_memory_not_results(preset, tmp_path, mode):
    def losses(run, *overrides):
        cfg = load_train_config(preset, [f"run.dir={run}", "train.steps=2", *overrides])
        Trainer(cfg).run()
        return [r["loss"] for r in read_metrics(run)]

    plain = losses(tmp_path / "none")
    assert losses(tmp_path / mode, f"parallel.activation_checkpointing={mode}") == pytest.approx(plain, abs=1e-6)


def test_koleo_groups_must_fit_the_batch(preset, tmp_path):
    cfg = load_train_config(preset, [f"run.dir={tmp_path / 'bad'}", "loss.koleo_group_size=3"])
    with pytest.raises(ValueError, match="KoLeo group size 3"):
        Trainer(cfg).run()


@pytest.mark.parametrize(
    "override,valid",
    [
        ("parallel.activation_checkpointing=some", "none, selective, full"),
        ("parallel.data_parallel=zero3", "ddp, fsdp"),
        ("parallel.param_dtype=fp16", "bf16, fp32"),
    ],
)
def test_unknown_parallel_modes_are_clear_errors(preset, tmp_path, override, valid):
    with pytest.raises(ConfigError, match=f"valid: {valid}"):
        load_train_config(preset, [f"run.dir={tmp_path / 'bad'}", override])


def test_submit_runs_one_task_per_rank(preset, single, tmp_path):
    pytest.importorskip("submitit")
    from opendino.train.submit import submit

    run = tmp_path / "submitted"
    job = submit(str(preset), [f"run.dir={run}"], run, cluster="local", tasks_per_node=2, timeout_min=10)
    assert job.results() == [str(run)] * 2
    _assert_same_losses(run, single)


def test_submit_requeues_a_signalled_job_and_it_resumes(preset, tmp_path):
    pytest.importorskip("submitit")
    from opendino.train.submit import submit

    overrides = ["train.steps=30", "checkpoint.every=4"]
    reference = tmp_path / "reference"
    Trainer(load_train_config(preset, [f"run.dir={reference}", *overrides])).run()
    run = tmp_path / "requeued"
    job = submit(str(preset), [f"run.dir={run}", *overrides], run, cluster="local", timeout_min=10)
    deadline = time.time() + 120
    while time.time() < deadline and len(read_metrics(run)) < 6:  # past the first checkpoint (step 3)
        time.sleep(0.05)
    # The signal SLURM sends before a time-out or preemption, to the task (the local executor's
    # controller forwards it only at its own time-out).
    task = subprocess.run(["pgrep", "-P", str(job._process.pid)], capture_output=True, text=True).stdout.split()
    os.kill(int(task[0]), signal.SIGUSR2)
    assert job.result() == str(run)
    log = "".join(p.read_text() for p in (run / "submitit").rglob("*_log.*"))
    assert "Requeued job" in log and "resuming" in log
    values = [{k: v for k, v in r.items() if k != "images_per_s"} for r in read_metrics(run)]
    assert values == [{k: v for k, v in r.items() if k != "images_per_s"} for r in read_metrics(reference)]


def test_gram_and_high_resolution_stages_shard_like_one_process(preset, tmp_path):
    stage = [
        "gram.enabled=true",
        "gram.img_level=true",  # per-image Grams: the same at any world size (batch-level ones are per rank)
        "monitor.every=2",
        "monitor.n_fit=16",
        "monitor.n_eval=8",
        "crops.resolution_sets=[[32, 16, 64, 0.5], [48, 16, 96, 0.5]]",
        "loss.koleo_group_size=8",  # KoLeo groups that span both ranks
    ]
    single = tmp_path / "single"
    Trainer(load_train_config(preset, [f"run.dir={single}", f"train.batch_size={2 * B}", *stage])).run()
    run = tmp_path / "sharded"
    torchrun_train(preset, run, "parallel.data_parallel=fsdp", "parallel.param_dtype=fp32", *stage)
    _assert_same_losses(run, single)
    records = read_metrics(run)
    assert all("gram" in r for r in records) and sum("monitor_gram_distance" in r for r in records) == 2


def test_submit_command_runs_a_local_job_to_the_end(preset, tmp_path, capsys):
    pytest.importorskip("submitit")
    from opendino.cli import main

    run = tmp_path / "cli"
    args = ["submit", "--cluster", "local", "--gpus-per-node", "0", "--time", "10", "--wait", str(preset)]
    assert main([*args, f"run.dir={run}", "train.steps=2"]) == 0
    assert "submitted job" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(run)] == [0, 1] and (run / "teacher.safetensors").exists()


def test_submit_writes_the_slurm_job_the_options_describe(preset, tmp_path, monkeypatch, capsys):
    pytest.importorskip("submitit")
    from opendino.cli import main

    # Stand-ins for SLURM's commands: `sbatch` keeps the script it is given and answers like SLURM.
    bin_dir, script = tmp_path / "bin", tmp_path / "job.sh"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {script}\necho "Submitted batch job 4242"\n')
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    run = tmp_path / "slurm-run"
    args = ["submit", "--nodes", "2", "--gpus-per-node", "8", "--partition", "learn", "--time", "600"]
    assert main([*args, str(preset), f"run.dir={run}"]) == 0
    assert "submitted job 4242" in capsys.readouterr().out
    lines = script.read_text().splitlines()
    for expected in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=learn", "--time=600"):
        assert f"#SBATCH {expected}" in lines
    assert any(line.startswith("#SBATCH --signal=USR2@") for line in lines)  # warned before the time-out
