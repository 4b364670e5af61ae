"""Run metrics: one JSON object per logged step in ``metrics.jsonl`` and TensorBoard scalars; the paths of
unreadable images in ``skipped_images.txt``."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from opendino import runs


class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_step: int = 0) -> None:
        self.path = run_dir / runs.METRICS
        # On resume, drop what was logged after the checkpoint: those steps are run again.
        if self.path.exists():
            kept = [
                line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] < resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = self.path.open("a")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / runs.TENSORBOARD), purge_step=resume_step)

    def log(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


class SkippedImagesLog:
    """Names each unreadable image once, on stderr and as a line of ``skipped_images.txt`` in the run folder
    (kept across resumes); the metrics count every time one is met."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / runs.SKIPPED
        self.seen = set(self.path.read_text().splitlines()) if self.path.exists() else set()

    def add(self, paths: Iterable[str]) -> None:
        new = [p for p in dict.fromkeys(paths) if p not in self.seen]
        if not new:
            return
        self.seen.update(new)
        with self.path.open("a") as f:
            f.writelines(p + "\n" for p in new)
        for p in new:
            tqdm.write(f"skipped unreadable image: {p} (listed in {self.path})", file=sys.stderr)


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / runs.METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
