"""The dense peak of a run (``monitor.keep_peak``): the monitored backbone (the EMA teacher) at the best
dense-monitor score so far, kept as ``dense_peak.safetensors`` in the run folder.

A Gram teacher taken from it (``gram.checkpoint=dense_peak``) is the model from before the dense
degradation, found by the monitor instead of a hand-picked step. The step, the score and the monitor's
settings live in the weights file's own metadata (``runs.dense_peak_record``; ``dense_peak.json`` is a copy
to read), so weights and record cannot disagree.

A new best is held in memory and written, atomically, just before the next checkpoint: a run killed
between two checkpoints resumes with the peak its checkpoint knew, and recomputes the rest (the only
window is a crash between writing the peak and writing the checkpoint, where the file can be the one of
the first few steps the resumed run repeats). A run that continues another (``init.from_run``) starts from
the other's peak when its monitor measures the same scenes, so that the peak is the best of the chain.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

from torch import Tensor, nn

from opendino import runs
from opendino.models import save_model
from opendino.train.monitor import SCORE


class DensePeak:
    """The best point of one member's dense monitor. Only the main rank reads and writes files."""

    def __init__(self, run_dir: Path, continued: str | None, monitor: dict, say: Callable[[str], None]) -> None:
        self.run_dir, self.monitor = Path(run_dir), monitor
        self.best, self.pending = -math.inf, None
        own = runs.dense_peak_record(self.run_dir)
        theirs = runs.dense_peak_record(continued) if continued and own is None else None
        if own is not None:  # resumed (or restarted) in its own folder
            self.best = own[SCORE]
        elif theirs is not None and theirs["monitor"] != monitor:
            say(f"not carrying the dense peak of {continued}: its monitor had {theirs['monitor']}, this one {monitor}")
        elif theirs is not None:  # the chain's peak so far becomes this run's
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for name in (runs.DENSE_PEAK, runs.DENSE_PEAK_RECORD):
                source = Path(continued) / name
                runs.write_atomic(self.run_dir / name, lambda tmp, source=source: shutil.copyfile(source, tmp))
            self.best = theirs[SCORE]

    def beats(self, score: float) -> bool:
        return score > self.best

    def hold(self, step: int, score: float, state: dict[str, Tensor] | None) -> None:
        """A new best: ``state`` (the full backbone state, main rank; None elsewhere) waits for the next
        checkpoint."""
        self.best = score
        self.pending = (step, score, None if state is None else {k: v.detach().clone() for k, v in state.items()})

    def write(self, backbone: nn.Module) -> None:
        """The held best, if any, written as the run's dense peak (main rank)."""
        if self.pending is None:
            return
        step, score, state = self.pending
        record = {"step": step, SCORE: score, "monitor": self.monitor}
        meta = {runs.PEAK_METADATA_KEY: json.dumps(record)}
        runs.write_atomic(self.run_dir / runs.DENSE_PEAK, lambda tmp: save_model(backbone, tmp, state, meta))
        runs.write_atomic(self.run_dir / runs.DENSE_PEAK_RECORD, lambda tmp: tmp.write_text(json.dumps(record)))
        self.pending = None
