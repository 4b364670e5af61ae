"""Shared test setup: fixture folders of the official outputs and small helpers."""

from __future__ import annotations

import os
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
