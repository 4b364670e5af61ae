"""The run folder: the one place that knows how a training run is laid out on disk.

``<run.dir>/`` holds ``config.yaml`` (the resolved configuration), ``metrics.jsonl``, ``tb/``,
``skipped_images.txt``, ``checkpoints/step_XXXXXXXX.pt`` (full training state, atomic writes, newest N
kept), with ``monitor.keep_peak`` ``dense_peak.safetensors`` and, once finished, ``teacher.safetensors``
(the exported model). The trainer writes runs; the trainer, the recipes (a run as an initialisation, a
Gram teacher or a distillation teacher) and the evaluation suite read them through this module only.
docs/design/run-folder.md describes the lifecycle.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

CONFIG, METRICS, CHECKPOINTS, EXPORT = "config.yaml", "metrics.jsonl", "checkpoints", "teacher.safetensors"
# the monitored backbone at the best dense score (train/dense_peak.py), its record in its own metadata
# (so that weights and record cannot disagree) and a copy of the record for people
DENSE_PEAK, DENSE_PEAK_RECORD, PEAK_METADATA_KEY = "dense_peak.safetensors", "dense_peak.json", "opendino_dense_peak"
TENSORBOARD, SKIPPED = "tb", "skipped_images.txt"
# Where the recipe keeps the exported model inside its state dict, for checkpoints written before a
# checkpoint recorded it (every run of the SSL recipe: its EMA teacher's backbone).
DEFAULT_EXPORT_PREFIX = "teacher.backbone."
_NAME = re.compile(r"step_(\d+)\.pt")
# Settings a resumed run may change without changing what it computes.
FREE_ON_RESUME = ("run.", "train.steps", "train.device", "log.", "checkpoint.", "data.num_workers", "monitor.")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; earlier checkpoints are intact and the run resumes from them."""


def is_run(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)``, then the temporary file renamed onto ``path``: a crash leaves the old file or the new
    one, never a part; a failed write removes its temporary file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def dense_peak_record(run: str | Path) -> dict | None:
    """``{"step", "monitor_seg_miou", "monitor"}`` of a run folder's dense peak (``monitor.keep_peak``), read
    from the weights file's metadata; None when the run has none."""
    from safetensors import safe_open

    file = Path(run) / DENSE_PEAK
    if not file.exists():
        return None
    with safe_open(str(file), "pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta[PEAK_METADATA_KEY]) if PEAK_METADATA_KEY in meta else None


def read_config(run: str | Path) -> dict:
    """The resolved configuration a run was started with, as a mapping."""
    return yaml.safe_load((Path(run) / CONFIG).read_text()) or {}


def write_config(run: Path, tree: dict) -> dict | None:
    """Writes ``config.yaml``; returns the configuration it replaces (None for a new run)."""
    run.mkdir(parents=True, exist_ok=True)
    previous = read_config(run) if is_run(run) else None
    (run / CONFIG).write_text(yaml.safe_dump(tree, sort_keys=False))
    return previous


def changed_settings(before: dict, after: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for each setting that differs, other than those of FREE_ON_RESUME."""
    changes = []
    for key in sorted(set(before) | set(after)):
        name, old, new = f"{prefix}{key}", before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += changed_settings(old, new, f"{name}.")
        elif old != new and not name.startswith(FREE_ON_RESUME):
            changes.append(f"{name}: {old} -> {new}")
    return changes


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step_{step:08d}.pt"


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = [(int(m[1]), p) for p in folder.iterdir() if (m := _NAME.fullmatch(p.name))]
    return sorted(found)


def _state_bytes(state: Any) -> int:
    if isinstance(state, Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_bytes(v) for v in state)
    return 0


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Writes ``state`` to a temporary file, fsyncs it, renames it into place, then prunes old ones:
    a crash at any moment leaves either the previous or the new checkpoint complete. A failed write
    (disk full, no permission) removes its partial file and raises :class:`CheckpointWriteError` naming
    the folder, the bytes needed and the newest intact checkpoint."""
    final = checkpoint_path(folder, step)
    tmp = final.with_suffix(".tmp")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        tmp.unlink(missing_ok=True)
        newest = list_checkpoints(folder)
        kept = f"the newest intact checkpoint is {newest[-1][1]}" if newest else "no earlier checkpoint exists"
        free, needed = (shutil.disk_usage(folder).free if folder.is_dir() else 0), _state_bytes(state)
        code = getattr(e, "errno", None)
        if isinstance(e, PermissionError):
            cause = "no permission to write there"
        elif code in (errno.ENOSPC, errno.EDQUOT) or free < needed:
            cause = "the disk is full"
        elif code == errno.EFBIG or "unexpected pos" in str(e):  # torch.save's words for a short write
            cause = "the write stopped short (the disk filled up, or a quota or file-size limit was reached)"
        else:
            cause = f"{type(e).__name__}: {e}"
        raise CheckpointWriteError(
            f"could not write the checkpoint of step {step} to {folder}: {cause} (it needs about "
            f"{needed:,} bytes, {free:,} are free); the partial file was removed and {kept}. "
            "Free space (or fix the permissions) and run the same command again: the run resumes from it."
        ) from e
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


def newest_state(run: str | Path, setting: str) -> tuple[int, dict]:
    """The newest readable checkpoint of the run folder that ``setting`` (e.g. ``init.from_run``) names."""
    run = Path(run)
    if not is_run(run):
        raise FileNotFoundError(f"{setting}={run}: not an `opendino train` run folder (no {CONFIG})")
    found = load_latest(run / CHECKPOINTS)
    if found is None:
        raise FileNotFoundError(f"{setting}={run}: no readable checkpoint in its {CHECKPOINTS}/")
    return found


def prefixed(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of ``state`` under ``prefix``, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_backbone(source: str, setting: str = "init.backbone") -> nn.Module:
    """A backbone from a checkpoint file or a model name, or from a run folder (the model its newest
    checkpoint would export), built as the run's ``model`` section says."""
    from opendino.models import build_model, load_model

    if not is_run(source):
        return load_model(source)
    _, state = newest_state(source, setting)
    model = read_config(source).get("model", {})
    backbone = build_model(model["arch"], **model.get("kwargs", {}))
    backbone.load_state_dict(prefixed(state["model"], state.get("export_prefix", DEFAULT_EXPORT_PREFIX)))
    return backbone
