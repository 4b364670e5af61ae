"""benchmarks/gram_search.py and benchmarks/gram_experiment.py: the degradation verdict, and a smoke run
of every arm of the Gram experiment (``--quick``, slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gram_experiment  # noqa: E402
import gram_search  # noqa: E402


def _curve(values: list[float]) -> list[dict]:
    return [{"step": 10 * i, **dict.fromkeys(gram_search.CURVES, v)} for i, v in enumerate(values)]


RISE = [0.1, 0.2, 0.3, 0.35, 0.3, 0.25, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2]  # a peak at step 30, an end of 0.2


def test_a_curve_that_falls_beyond_the_seed_spread_degrades():
    summary = gram_search.summarize([_curve(RISE), _curve([v + 0.01 for v in RISE]), _curve([v - 0.005 for v in RISE])])
    assert summary["peak_step"] == 30
    assert summary["peak"] == pytest.approx(0.35 + 0.005 / 3)
    assert summary["drop"] == pytest.approx(0.15) and summary["drop_sd"] == pytest.approx(0.0, abs=1e-12)
    assert summary["degrades"]


def test_a_rising_curve_or_a_drop_within_the_spread_does_not_degrade():
    rising = [0.1 + 0.01 * i for i in range(12)]
    assert not gram_search.summarize([_curve(rising), _curve([v + 0.01 for v in rising])])["degrades"]
    # one seed falls, the other rises at the end: the mean falls, but not beyond the seeds' disagreement
    other = RISE[:9] + [0.45, 0.45, 0.45]
    noisy = gram_search.summarize([_curve(RISE), _curve(other)])
    assert noisy["drop"] > 0 and not noisy["degrades"]
    assert not gram_search.summarize([_curve(RISE)])["degrades"]  # one seed has no spread
    with pytest.raises(ValueError, match="different steps"):
        gram_search.summarize([_curve(RISE), _curve(RISE)[:-1]])


def test_every_search_setting_and_arm_builds_a_valid_config(tmp_path):
    from opendino.train.config import load_train_config

    for _, overrides in gram_search.SETTINGS.values():
        cfg = load_train_config(gram_search.PRESET, [*gram_search.geometry(600, 30), *overrides])
        cfg.check()
        assert cfg.monitor.every == 30
    assert set(gram_experiment.ARMS) >= {"peak x2 refresh", "peak x2 fixed", "peak x1 refresh"}
    assert {teacher for teacher, _, _ in gram_experiment.ARMS.values()} == {"peak", "early", "late"}


@pytest.mark.slow
def test_quick_experiment_runs_every_arm(tmp_path):
    out = tmp_path / "gram"
    command = [sys.executable, str(REPO / "benchmarks" / "gram_experiment.py"), "--quick", "--jobs", "1"]
    command += ["--threads", "2", "--out", str(out)]
    subprocess.run(command, check=True, cwd=tmp_path, timeout=1800)
    results = json.loads((out / "results.json").read_text())
    for model in ["peak", "branch", "baseline", *gram_experiment.ARMS]:
        assert set(results[f"{model}|0"]) == set(gram_experiment.METRICS)
    # the peak teacher is the best monitor point before the branch, and the arms continue past it
    peak = json.loads((out / "seed0" / "branch" / "dense_peak.json").read_text())
    before = [r for r in results["curves"]["0"]["baseline"] if r["step"] < 20]
    assert peak["monitor_seg_miou"] == max(r["monitor_seg_miou"] for r in before)
    assert results["peak_step"]["0"] == peak["step"] < 20
    for arm in gram_experiment.ARMS:
        steps = [r["step"] for r in results["curves"]["0"][arm]]
        assert steps == [9, 19, 29, 39]
        gram = yaml.safe_load((out / "seed0" / arm.replace(" ", "-") / "config.yaml").read_text())["gram"]
        teacher, scale, refresh = gram_experiment.ARMS[arm]
        assert gram["enabled"] and gram["crop_scale"] == scale and (gram["refresh_from"] is not None) == refresh
        assert (gram["checkpoint"] == "dense_peak") == (teacher == "peak")
    table = (out / "table.md").read_text()
    assert all(f"Gram: {arm}" in table for arm in gram_experiment.ARMS)
    assert (out / "curves.png").stat().st_size > 10_000 and (out / "pictures.png").stat().st_size > 10_000
