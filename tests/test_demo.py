"""The demo pipeline end to end, at reduced length, and the margins over random init that the README
states (slow: about 8 minutes on 2 cores), the text stage's over chance included."""

from __future__ import annotations

import pytest

from opendino.demo import MARGINS, README_TABLE, TEXT_MARGINS, run_demo


@pytest.mark.slow
def test_demo_beats_random_init_by_the_stated_margins(tmp_path, capsys):
    results = run_demo(tmp_path, ["train.steps=200", "log.progress=false"], n_train=600, n_val=300, gram_steps=30)
    out = capsys.readouterr().out
    assert "evaluation on held-out scenes" in out and "timm Eva" in out and "Gram anchoring" in out
    assert set(results["trained"]) == {"knn", "linear", "logreg", "seg", "depth", "corr"}
    assert (tmp_path / "eval" / "report.md").exists() and (tmp_path / "gram" / "teacher.safetensors").exists()
    failed = []
    for (task, metric), margin in MARGINS.items():
        trained, floor = results["trained"][task][metric], results["random_init"][task][metric]
        gain = floor - trained if metric == "rmse" else trained - floor
        print(f"{task} {metric}: {trained:.3f} vs random {floor:.3f}, gain {gain:+.3f} (margin {margin})")
        if gain < margin:
            failed.append(f"{task} {metric}")
    text = results["text"]
    for (task, metric), margin in TEXT_MARGINS.items():
        trained = text["trained"][task][metric]
        chance = text["trained"][task]["chance_" + metric.replace("image_to_text_", "")]
        print(f"text {task} {metric}: {trained:.3f}, chance {chance:.3f} (margin {margin})")
        if trained - chance < margin:
            failed.append(f"text {task} {metric}")
    assert (tmp_path / "text" / "text.safetensors").exists() and "text alignment" in out
    assert "| text: zero-shot" in (tmp_path / README_TABLE).read_text()
    assert not failed, f"margins not met: {failed} (see the captured output; `pytest -rP` shows it always)"
