"""Nothing of the user's is ever lost: the project writes into, clears and prunes only folders it marked itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pathway.train import checkpoint as ckpt
from pathway.train.cli import main
from pathway.train.demo_data import make_demo_data
from pathway.train.owned import MARKER, FolderNotOwnedError, claim, owner

ROOT = Path(__file__).resolve().parents[1]


def test_claim_marks_new_and_empty_folders_and_refuses_anything_else(tmp_path):
    assert owner(claim(tmp_path / "new", "run")) == "run"
    (tmp_path / "empty").mkdir()
    assert owner(claim(tmp_path / "empty", "run")) == "run"
    assert claim(tmp_path / "new", "run") == tmp_path / "new"  # reused by the same kind
    with pytest.raises(FolderNotOwnedError, match="belongs to another pathway command \\(run\\)"):
        claim(tmp_path / "new", "demo-data:image")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work\n")
    with pytest.raises(FolderNotOwnedError, match=f"{mine} holds files pathway did not write"):
        claim(mine, "run")
    assert (mine / "thesis.tex").read_text() == "years of work\n" and not (mine / MARKER).exists()


def test_demo_data_rebuilds_only_its_own_half_written_folder(tmp_path):
    root = tmp_path / "demo"
    make_demo_data("timeseries", root, per_class=2)
    first = sorted(p.relative_to(root) for p in root.rglob("*.npy"))
    assert owner(root) == "demo-data:timeseries" and len(first) == 8
    (root / ".complete").unlink()  # as if the run that made it had been killed
    (root / "train" / "sine" / "0000.npy").write_bytes(b"half")
    (root / "train" / "NOTES.md").write_text("the user's\n")
    make_demo_data("timeseries", root, per_class=2)
    assert sorted(p.relative_to(root) for p in root.rglob("*.npy")) == first  # its files deleted, written again
    assert (root / "train" / "sine" / "0000.npy").read_bytes() != b"half"
    assert (root / "train" / "NOTES.md").read_text() == "the user's\n"  # not the project's: left as it is
    with pytest.raises(FolderNotOwnedError, match="belongs to another pathway command"):
        make_demo_data("image", root)  # another modality's demo data is not overwritten either


def test_demo_data_made_before_markers_is_reused_untouched(tmp_path):
    root = tmp_path / "old"
    (root / "train" / "sine").mkdir(parents=True)
    (root / "train" / "sine" / "0000.npy").write_bytes(b"old demo file")
    (root / ".complete").write_text("timeseries per_class=100 seed=0\n")  # what earlier versions wrote
    assert make_demo_data("timeseries", root) == root
    assert (root / "train" / "sine" / "0000.npy").read_bytes() == b"old demo file" and owner(root) is None


def test_dry_run_of_a_demo_recipe_writes_nothing(tmp_path, capsys):
    root = tmp_path / "not-yet"
    argv = ["train", str(ROOT / "recipes/demo/timeseries.yaml"), "--dry-run", "--set", f"data.root={root}",
            "--set", f"output.dir={tmp_path / 'runs'}"]
    assert main(argv) == 0
    assert "the demo data is made there on the first real run" in capsys.readouterr().out
    assert not root.exists() and not (tmp_path / "runs").exists()


def test_checkpoint_pruning_deletes_only_checkpoints(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "README.txt").write_text("a note the user left\n")
    (folder / "ckpt-final.pt").write_text("not ours: the name does not follow ckpt-<step>.pt\n")
    for step in range(1, 5):
        ckpt.save_checkpoint(folder, {"step": step, "w": torch.zeros(1)}, step, keep_last=2)
    assert sorted(p.name for p in folder.iterdir()) == ["README.txt", "ckpt-00000003.pt", "ckpt-00000004.pt",
                                                        "ckpt-final.pt"]


def test_demo_data_of_another_size_is_rewritten_in_its_own_folder(tmp_path):
    root = tmp_path / "demo"
    make_demo_data("timeseries", root, per_class=2)
    (root / "NOTES.md").write_text("what I changed\n")  # the user's, in the experiment's data folder
    (root / "val" / "sine" / "mine.npy").write_bytes(b"the user's")
    make_demo_data("timeseries", root, per_class=3)  # e.g. `pathway experiment` after `--quick`
    assert len(list(root.rglob("[0-9]*.npy"))) == 12
    assert (root / "NOTES.md").read_text() == "what I changed\n"
    assert (root / "val" / "sine" / "mine.npy").read_bytes() == b"the user's"
    (root / "val" / "sine" / "mine.npy").unlink()
    assert (root / ".complete").read_text() == "timeseries per_class=3 seed=0\n"
    make_demo_data("timeseries", root)  # a recipe's run asks for no size: what is there is used as it is
    assert len(list(root.rglob("*.npy"))) == 12
    legacy = tmp_path / "old"
    (legacy / "train").mkdir(parents=True)
    (legacy / ".complete").write_text("timeseries per_class=100 seed=0\n")  # unmarked: not ours to clear
    with pytest.raises(FolderNotOwnedError, match="another size or seed"):
        make_demo_data("timeseries", legacy, per_class=2)
    assert (legacy / "train").is_dir()


def test_a_folder_holding_a_recipe_and_a_log_is_not_taken_for_a_run(tmp_path, capsys):
    """An unmarked folder with recipe.yaml and metrics.jsonl is the user's: never guessed to be an old run."""
    mine = tmp_path / "myexp"
    mine.mkdir()
    (mine / "recipe.yaml").write_text("my notes on a recipe\n")
    (mine / "metrics.jsonl").write_text('{"my": "numbers"}\n')
    argv = ["train", str(ROOT / "recipes/demo/timeseries.yaml"), "--set", f"output.dir={tmp_path}",
            "--set", "output.name=myexp", "--set", f"data.root={tmp_path / 'data'}"]
    assert main(argv) == 2
    assert "holds files pathway did not write" in capsys.readouterr().err
    assert (mine / "recipe.yaml").read_text() == "my notes on a recipe\n"
    assert (mine / "metrics.jsonl").read_text() == '{"my": "numbers"}\n' and not (mine / MARKER).exists()


def test_a_run_folder_under_a_file_is_refused_before_anything_runs(tmp_path):
    from pathway.train.owned import check_run_dir

    (tmp_path / "notes.txt").write_text("mine\n")
    with pytest.raises(FolderNotOwnedError, match="which is a file"):
        check_run_dir(tmp_path / "notes.txt" / "run1")


def test_a_torn_last_log_line_is_dropped_and_a_damaged_one_named(tmp_path):
    from pathway.train.engine import JsonlLog, LogError

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # killed while appending
    log = JsonlLog(path, main=True)
    assert log.rows() == [{"step": 1, "loss": 2.0}]
    log.truncate_after(1)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n'
    path.write_text('{"step": 1\n{"step": 2}\n')
    with pytest.raises(LogError, match="line 1 is not a JSON row"):
        log.rows()
