"""ModelNet40's voting test (Point-MAE ``validate_vote``) and its scale-and-translate augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pathway import adapters
from pathway.adapters.base import OptionError
from pathway.train.official.fixtures import MODELNET_CLASSES, write_modelnet40

SMALL = {"num_points": 64, "num_groups": 8, "group_size": 8}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("modelnet40")
    write_modelnet40(folder, np.random.default_rng(0), {"train": 1, "test": 2}, points=120)
    return folder


def test_each_cloud_is_scored_by_votes_that_repeat_run_to_run(root: Path):
    ad = adapters.get("point")(root, test_votes=3, jitter=0.0, **SMALL)
    votes = ad.multiview_dataset("test")
    clouds = 2 * len(MODELNET_CLASSES)
    assert ad.test_views() == [0, 1, 2] and len(votes) == 3 * clouds
    first = [votes[i] for i in range(3)]  # the three votes of cloud 0
    assert {(label, j) for _, label, j in first} == {(0, 0)}
    assert not torch.equal(first[0][0], first[1][0]) and not torch.equal(first[1][0], first[2][0])
    assert torch.equal(first[1][0], ad.multiview_dataset("test")[1][0])  # the same draw in every run
    # scaled and translated like training (PointcloudScaleAndTranslate), so no longer centred in the unit sphere
    assert any(x.mean(dim=0).abs().max() > 0.01 for x, _, _ in first)
    assert votes[3 * clouds - 1][2] == clouds - 1


def test_without_votes_there_is_no_multiview_test_and_bad_counts_are_refused(root: Path):
    from pathway.train.engine import multiview_test_set

    assert multiview_test_set(adapters.get("point")(root, **SMALL), "test") is None
    assert len(multiview_test_set(adapters.get("point")(root, test_votes=2, **SMALL), "test")) == 4 * 2 * 2
    with pytest.raises(OptionError, match="test_votes=0"):
        adapters.get("point")(root, test_votes=0, **SMALL)
