"""The main job (`pathway experiment`) end to end at toy sizes (same code path as the full run): two screens of
the shipped donors, their placebos, and the paired intervals its verdict rests on."""

from __future__ import annotations

import json

import pytest
import torch

from pathway.screen.paired import paired_difference
from pathway.screen.weights import perturbed_copy
from pathway.train.jobs.experiment import SETTINGS, minilm_dir, run_experiment

QUERY = "layer.0.attention.self.query.weight"
CONDITIONS = ("baseline", "point-mae", "point-mae+align", "point-mae~gauss", "point-mae~rows", "minilm",
              "minilm~gauss", "minilm~rows")


@pytest.mark.slow
def test_quick_experiment_writes_both_screens_intervals_plots_and_folds(tmp_path):
    summary = run_experiment(tmp_path, quick=True)
    text = summary.read_text()
    for setting in SETTINGS:
        assert f"## {setting.name}: " in text
        result = json.loads((tmp_path / setting.name / "screen.json").read_text())
        assert [c["name"] for c in result["conditions"]] == list(CONDITIONS)
        assert all(c["per_seed"] and len(c["per_seed"]) == 2 for c in result["conditions"])
        assert {r["candidate"] for r in result["ranking"]} == {"point-mae", "point-mae+align", "minilm"}
        assert "minilm" in result["design"]["not_aligned"]
        assert (tmp_path / setting.name / "screen.png").stat().st_size > 10_000
        for c in result["conditions"][1:]:
            assert c["fold_max_abs_diff"] < 1e-4 and len(c["parameters"]) == 1
        assert {len(c["parameters"]) for c in result["conditions"]} == {1}
        assert len({c["parameters"][0] for c in result["conditions"]}) == 1  # folded models are plain-sized
    for comparison in ("minilm - baseline", "minilm - minilm~gauss", "point-mae+align - point-mae",
                       "point-mae - point-mae~rows"):
        assert text.count(f"| {comparison} |") == len(SETTINGS)
    assert "### Verdict" in text and "95 % CI" in text and "Bonferroni" in text
    runs = tmp_path / "fix-8x8" / "runs" / "fix"
    report = (runs / "minilm-seed0" / "report.txt").read_text()
    assert "attention.self.{query,key,value}.weight" in report and "24/24" in report
    # The fix setting trains only lambda and the classifier: on a shared seed the target starts from the same
    # weights, so a folded MiniLM run differs from the baseline's by exactly lambda * MiniLM's matrix.
    from safetensors.torch import load_file

    base = load_file(str(runs / "baseline-seed0" / "model.safetensors"))
    connected = load_file(str(runs / "minilm-seed0" / "model.safetensors"))
    aux = load_file(str(minilm_dir() / "model.safetensors"))
    fc1 = next(k for k in aux if k.endswith("layer.0.intermediate.dense.weight"))
    lambda_rows = (runs / "minilm-seed0" / "lambdas.jsonl").read_text().splitlines()
    scale = json.loads(lambda_rows[-1])["blocks.0.mlp.fc1.weight"]
    key = next(k for k in connected if k.endswith("blocks.0.mlp.fc1.weight"))
    assert scale != 0
    assert torch.allclose(connected[key] - base[key], scale * aux[fc1].float(), atol=1e-6)
    assert not (runs / "baseline-seed0" / "report.txt").exists()  # no aux, nothing connected
    alignment = json.loads((tmp_path / "fix-8x8" / "weights" / "point-mae+align-seed0.json").read_text())
    assert alignment["objective_after"] >= alignment["objective_before"]


@pytest.mark.parametrize("kind", ["random", "rows"])
def test_stand_ins_keep_shapes_and_norms_but_not_values(tmp_path, kind):
    from safetensors.torch import load_file

    copy = load_file(str(perturbed_copy(minilm_dir(), tmp_path / kind, kind) / "model.safetensors"))
    original = load_file(str(minilm_dir() / "model.safetensors"))
    name = next(k for k in original if k.endswith(QUERY))
    a, b = copy[name].float(), original[name].float()
    assert a.shape == b.shape
    assert abs(a.norm() - b.norm()) < 1e-3 * b.norm()
    assert (a - b).abs().mean() > 1e-3
    spectrum_a, spectrum_b = torch.linalg.svdvals(a), torch.linalg.svdvals(b)
    if kind == "rows":  # a permutation of rows: the same rows, the same singular values
        assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, b.tolist()))
        assert torch.allclose(spectrum_a, spectrum_b, rtol=1e-4, atol=1e-5)
    else:               # Gaussian: another spectrum (the pretrained one is far from flat)
        assert (spectrum_a - spectrum_b).abs().max() > 0.1 * spectrum_b.max()
    assert all(torch.equal(copy[k], original[k]) for k in original if original[k].dim() < 2)


def test_stand_in_is_rewritten_when_asked_for_another_kind(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "copy"
    perturbed_copy(minilm_dir(), out, "random")
    first = load_file(str(out / "model.safetensors"))
    perturbed_copy(minilm_dir(), out, "rows")
    second = load_file(str(out / "model.safetensors"))
    name = next(k for k in first if k.endswith(QUERY))
    assert not torch.equal(first[name], second[name])
    assert json.loads((out / "perturbation.json").read_text())["kind"] == "rows"
    with pytest.raises(ValueError, match="not one of"):
        perturbed_copy(minilm_dir(), out, "sideways")


def test_paired_interval_against_a_hand_computed_one_and_scipy():
    from scipy.stats import ttest_rel

    # differences 1, 2, 3: mean 2, std 1, t(0.975, 2) = 4.302653 -> half-width 4.302653 / sqrt(3) = 2.48414
    d = paired_difference({0: 1.0, 1: 2.0, 2: 3.0, 7: 9.0}, {0: 0.0, 1: 0.0, 2: 0.0})  # seed 7 has no pair
    assert d.n == 3 and d.mean == pytest.approx(2.0) and d.std == pytest.approx(1.0)
    assert (d.low, d.high) == (pytest.approx(2 - 2.48414, abs=1e-5), pytest.approx(2 + 2.48414, abs=1e-5))
    assert not d.excludes_zero and d.words() == "not distinguishable from zero"
    a = {s: v for s, v in enumerate([0.81, 0.84, 0.79, 0.86, 0.83])}
    b = {s: v for s, v in enumerate([0.78, 0.80, 0.78, 0.82, 0.80])}
    d = paired_difference(a, b)
    p = ttest_rel(list(a.values()), list(b.values())).pvalue
    assert d.excludes_zero == (p < 0.05) and d.words() == "distinguishable from zero: higher"
    assert paired_difference(a, b, confidence=1 - p).low == pytest.approx(0.0, abs=1e-9)  # the interval meets 0 at p
    with pytest.raises(ValueError, match="at least 2 shared seeds"):
        paired_difference({0: 1.0}, {0: 0.5, 1: 0.2})
