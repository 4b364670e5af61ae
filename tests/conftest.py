"""Shared test setup: fixture folders of the official outputs and small helpers."""

from __future__ import annotations

import os
import subprocess
import sys
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
