"""Shared test setup: fixture folders of the official outputs and small helpers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def fixture_dirs() -> list[Path]:
    """Folders listed in OPENDINO_FIXTURES (':'-separated), default ../shared/fixtures."""
    raw = os.environ.get("OPENDINO_FIXTURES", str(REPO.parent / "shared" / "fixtures"))
    return [Path(p) for p in raw.split(":") if p]


def fixture_files() -> list[Path]:
    return sorted(f for d in fixture_dirs() for f in d.glob("*.pt"))


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


def torchrun_train(preset: Path, run: Path, *overrides: str) -> None:
    """``opendino train`` in 2 CPU processes under torchrun (gloo), each aborting if it reaches interpreter
    teardown (tests/abort_at_exit.py)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += [str(REPO / "tests" / "abort_at_exit.py"), "train", str(preset), f"run.dir={run}", *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def train_then_kill_9(preset: Path, run: Path, overrides: list[str], records: int, timeout: float = 180) -> int:
    """``opendino train`` in a subprocess, killed with SIGKILL once ``records`` metric records are written
    (past a checkpoint); returns how many records it wrote. Same thread count as this process (float sums
    depend on it), whatever OMP_NUM_THREADS the shell has."""
    from opendino.train.logging import read_metrics

    cmd = [sys.executable, "-m", "opendino", "train", str(preset), f"run.dir={run}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO)
    deadline = time.time() + timeout
    while time.time() < deadline and len(read_metrics(run)) < records:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return len(read_metrics(run))
