"""The demo pipeline end to end, at reduced length (slow)."""

from __future__ import annotations

import pytest

from opendino.demo import run_demo


@pytest.mark.slow
def test_demo_runs_and_reports(tmp_path, capsys):
    results = run_demo(tmp_path, ["train.steps=20", "log.progress=false"], n_train=60, n_val=30)
    out = capsys.readouterr().out
    assert "evaluation on held-out scenes" in out and "timm Eva" in out
    assert set(results) == {"trained", "random_init", "meta"}
    assert set(results["trained"]) == {"knn", "linear", "logreg", "seg", "depth", "corr"}
    assert (tmp_path / "eval" / "report.md").exists()
