"""The metrics of short runs recorded before the recipe contract (tests/recorded_runs.py) are reproduced;
the 2-rank runs are compared by tests/test_distributed.py's parity tests."""

from __future__ import annotations

import json

from tests.recorded_runs import RECORDED, assert_reproduces, single_process_runs


def test_recorded_single_process_runs_are_reproduced(tmp_path):
    runs = single_process_runs(tmp_path)
    assert sorted(runs) == sorted(set(json.loads(RECORDED.read_text())) - {"ddp", "fsdp"})
    for name, new in runs.items():
        assert_reproduces(name, new)
