"""Run checkpoints: atomic writes, keep-last-N, full state, safe loading (``weights_only=True``)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"step_(\d+)\.pt")


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step_{step:08d}.pt"


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = [(int(m[1]), p) for p in folder.iterdir() if (m := _NAME.fullmatch(p.name))]
    return sorted(found)


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Writes ``state`` to a temporary file, fsyncs it, renames it into place, then prunes old ones:
    a crash at any moment leaves either the previous or the new checkpoint complete."""
    folder.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(folder, step)
    tmp = final.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    for _, old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def common_steps(folders: list[Path]) -> set[int] | None:
    """The checkpoint steps every folder has (the students of one run resume together); None when no
    folder has any checkpoint."""
    found = [{step for step, _ in list_checkpoints(f)} for f in folders]
    return set.intersection(*found) if any(found) else None


def load_latest(
    folder: Path, map_location: str | torch.device = "cpu", steps: set[int] | None = None
) -> tuple[int, dict] | None:
    """The newest readable checkpoint, among ``steps`` if given (a damaged newest file falls back to the
    one before)."""
    for step, path in reversed(list_checkpoints(folder)):
        if steps is not None and step not in steps:
            continue
        try:
            return step, torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # a truncated file from a crash during an earlier, non-atomic copy
            print(f"warning: skipping unreadable checkpoint {path}: {e}")
    return None
