"""PartNet at level 3: data_v0's leaf ids mapped through the merging table, the sem_seg_h5 release, the sweep."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pathway import adapters
from pathway.adapters.base import LayoutError, OptionError
from pathway.adapters.partnet import LevelLabels, categories
from pathway.train.jobs.partnet_sweep import main as sweep_main
from pathway.train.official.fixtures import PARTNET_LEVEL3, write_partnet

SMALL = {"num_points": 64, "num_groups": 8, "group_size": 8}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Two categories in PartNet's data_v0 + stats layout (the rehearsal's writer)."""
    folder = tmp_path_factory.mktemp("partnet")
    for seed, category in enumerate(("Chair", "Table")):
        write_partnet(folder, np.random.default_rng(seed), {"train": 4, "test": 2}, category=category, points=96)
    return folder


def test_leaf_ids_map_to_level_3_through_the_merging_table(root: Path):
    labels = LevelLabels(root, "Chair", 3)
    tree = {"id": 1, "name": "chair", "children": [
        {"id": 2, "name": "chair_back", "children": [{"id": 3, "name": "back_surface", "objs": ["a"]},
                                                      {"id": 4, "name": "back_frame", "objs": ["b"]}]},
        {"id": 5, "name": "chair_seat", "objs": ["c"]},
        {"id": 6, "name": "chair_base", "children": [{"id": 7, "name": "leg", "objs": ["d"]},
                                                      {"id": 8, "name": "foot", "objs": ["e"]}]}]}
    # leg is renamed by the merging table onto level 3's regular_leg_base/leg; foot is on no level-3 line: other
    assert labels.leaf_labels(tree) == {3: 1, 4: 2, 5: 3, 7: 4}
    shape = sorted((root / "data_v0").iterdir())[0]
    leaf_of_point = np.loadtxt(shape / "point_sample" / "sample-points-all-label-10000.txt", dtype=np.int64)
    mapped = labels(shape / "result.json", leaf_of_point)
    assert set(np.unique(mapped)) == {0, 1, 2, 3, 4} and (mapped[leaf_of_point == 8] == 0).all()


def test_the_adapter_reads_data_v0_at_level_3(root: Path):
    ad = adapters.get("point_part")(root, layout="partnet", category="Chair", level=3, **SMALL)
    assert ad.num_classes == 1 + len(PARTNET_LEVEL3) and ad.metric == "partnet_miou"
    x, y = ad.dataset("test", False)[0]
    assert x.shape == (64, 3) and set(y.tolist()) <= set(range(ad.num_classes))
    with pytest.raises(LayoutError, match="Chair-level-2.txt not found.*Chair-level-3.txt"):
        adapters.get("point_part")(root, layout="partnet", category="Chair", level=2, **SMALL).find_classes()
    with pytest.raises(OptionError, match="level=4"):
        adapters.get("point_part")(root, layout="partnet", category="Chair", level=4, **SMALL)
    with pytest.raises(OptionError, match="category"):
        adapters.get("point_part")(root, layout="partnet_h5", **SMALL)
    with pytest.raises(OptionError, match="partnet_h5' needs level"):
        adapters.get("point_part")(root, layout="partnet_h5", category="Chair", **SMALL)
    assert categories(root, 3, "partnet") == ["Chair", "Table"]
    with pytest.raises(LayoutError, match="no PartNet category .* level 1"):
        categories(root, 1, "partnet")


def test_the_adapter_reads_the_sem_seg_h5_release(tmp_path: Path, root: Path):
    h5py = pytest.importorskip("h5py")  # not in the project's environment: see adapters/partnet.py
    folder = tmp_path / "sem_seg_h5" / "Chair-3"
    folder.mkdir(parents=True)
    (tmp_path / "stats").symlink_to(root / "stats")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (3, 100))
    with h5py.File(folder / "test-00.h5", "w") as f:  # the release's datasets (data_utils.py:160-163)
        f.create_dataset("data", data=rng.standard_normal((3, 100, 3)).astype(np.float32))
        f.create_dataset("data_num", data=np.full(3, 100, dtype=np.int32))
        f.create_dataset("label_seg", data=labels.astype(np.int32))
    (folder / "test_files.txt").write_text("test-00.h5\n")
    ad = adapters.get("point_part")(tmp_path, layout="partnet_h5", category="Chair", level=3, augment=False,
                                    num_points=100, num_groups=8, group_size=8)
    data = ad.dataset("test", False)
    assert len(data) == 3 and ad.num_classes == 5
    x, y = data[2]
    assert x.shape == (100, 3) and sorted(y.tolist()) == sorted(labels[2].tolist())


def test_the_sweep_runs_every_category_and_averages(root: Path, tmp_path: Path, capsys):
    recipe = tmp_path / "partnet_small.yaml"
    recipe.write_text(json.dumps({
        "data": {"adapter": "point_part", "root": str(root), "train_split": "train", "val_split": "test",
                 "options": {"layout": "partnet", "level": 3, **SMALL}, "batch_size": 4, "num_workers": 0},
        "model": {"embed_dim": 16, "depth": 1, "num_heads": 2, "checkpoint": ""},
        "aux": {"enabled": False},
        "train": {"epochs": 1, "device": "cpu", "log_every": 1},
        "output": {"dir": str(tmp_path / "runs"), "plots": False},
    }))
    assert sweep_main([str(recipe), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "runs" / "partnet_small-sweep.json").read_text())
    per = {c: r["last"]["part_miou"] for c, r in summary["categories"].items()}
    assert sorted(per) == ["Chair", "Table"]
    assert summary["mean_last"]["part_miou"] == pytest.approx(sum(per.values()) / 2)
    assert "mean over 2 categories: " in capsys.readouterr().out
    assert sweep_main([str(recipe), "--no-progress", "--categories", "Chair"]) == 0  # done before: skipped
    assert sweep_main([str(recipe), "--categories", "Bed"]) == 2
