"""The main job (`pathway experiment`) end to end at toy sizes: same code path as the full run."""

from __future__ import annotations

import json

import pytest

from pathway.train.experiment import CONDITIONS, make_control, minilm_dir, run_experiment


@pytest.mark.slow
def test_quick_experiment_writes_table_plots_and_folds(tmp_path):
    summary = run_experiment(tmp_path, quick=True)
    text = summary.read_text()
    for condition in CONDITIONS:
        assert f"| {condition} |" in text
    assert text.count("(= baseline)") == len(CONDITIONS)           # folded models are plain-sized
    assert "## Verdict" in text and "spread" in text
    assert (tmp_path / "experiment.png").stat().st_size > 10_000
    lambdas = json.loads((tmp_path / "lambdas.json").read_text())
    assert len(lambdas["minilm-seed0"]) == 24                      # 6 blocks x (qkv, proj, fc1, fc2)
    report = (tmp_path / "runs" / "minilm-seed0" / "report.txt").read_text()
    assert "attention.self.{query,key,value}.weight" in report and "24/24" in report
    for run in ("point-mae-seed1", "minilm-seed1", "control-seed1"):
        result = json.loads((tmp_path / "runs" / run / "result.json").read_text())
        assert result["fold_max_abs_diff"] < 1e-4


def test_control_keeps_shapes_and_norms_but_not_values(tmp_path):
    from safetensors.torch import load_file

    control = load_file(str(make_control(minilm_dir(), tmp_path / "control") / "model.safetensors"))
    original = load_file(str(minilm_dir() / "model.safetensors"))
    name = "encoder.layer.0.attention.self.query.weight"
    name = name if name in original else next(k for k in original if k.endswith("layer.0.attention.self.query.weight"))
    assert control[name].shape == original[name].shape
    assert abs(control[name].norm() - original[name].norm()) < 1e-3 * original[name].norm()
    assert (control[name] - original[name]).abs().mean() > 1e-3
