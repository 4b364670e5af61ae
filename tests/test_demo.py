"""The demo pipeline end to end, at reduced length (slow)."""

from __future__ import annotations

import pytest

from opendino.demo import run_demo


@pytest.mark.slow
def test_demo_runs_and_reports(tmp_path, capsys):
    results = run_demo(tmp_path, ["train.steps=20", "log.progress=false"])
    out = capsys.readouterr().out
    assert "k-NN on held-out scenes" in out and "timm Eva" in out
    assert set(results) == {"trained", "random init"}
    assert all(0.0 <= acc <= 1.0 for r in results.values() for acc in r.values())
