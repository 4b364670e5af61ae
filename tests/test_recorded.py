"""The metrics of short runs recorded before the recipe contract (tests/recorded_runs.py) are reproduced."""

from __future__ import annotations

import json
import math

from tests.recorded_runs import RECORDED, record_runs


def _close(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))
    return a == b


def test_recorded_runs_are_reproduced(tmp_path):
    recorded = json.loads(RECORDED.read_text())
    runs = record_runs(tmp_path)
    assert sorted(runs) == sorted(recorded)
    for name, old in recorded.items():
        new = runs[name]
        assert [sorted(r) for r in new["metrics"]] == [sorted(r) for r in old["metrics"]], name
        for old_row, new_row in zip(old["metrics"], new["metrics"], strict=True):
            differ = {k: (v, new_row[k]) for k, v in old_row.items() if not _close(v, new_row[k])}
            assert not differ, f"{name} step {old_row['step']}: {differ}"
        assert sorted(new["export"]) == sorted(old["export"]), name
        differ = {k: (v, new["export"][k]) for k, v in old["export"].items() if not _close(v, new["export"][k])}
        assert not differ, f"{name} export: {differ}"
