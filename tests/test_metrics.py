"""Evaluation protocols against small references computed by hand: ShapeNetPart (Point-MAE), PartNet
part-category mIoU, VideoMAE's multi-view merge; the ShapeNetPart adapter's official splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import pathway.adapters.registry as adapters
from pathway.train.metrics import (
    MetricAccumulator,
    average_over_categories,
    merge_views,
    part_category_miou,
    shapenetpart_miou,
)


def scores(preds: list[list[int]], num_classes: int, decoys: dict[tuple[int, int], int] | None = None) -> torch.Tensor:
    """Logits ``[N, P, C]`` whose argmax is ``preds``; ``decoys[(i, point)] = label`` scores higher still."""
    logits = torch.zeros(len(preds), len(preds[0]), num_classes)
    for i, row in enumerate(preds):
        for j, label in enumerate(row):
            logits[i, j, label] = 5.0
    for (i, j), label in (decoys or {}).items():
        logits[i, j, label] = 10.0
    return logits


def test_shapenetpart_restricts_to_the_category_and_separates_instance_and_class_miou():
    # Bag owns parts 4, 5; Mug owns 36, 37 (Point-MAE seg_classes). Shape 0's first point scores Mug's part 36
    # highest, but a Bag shape can only be predicted Bag parts.
    target = torch.tensor([[4, 4, 5, 5], [4, 4, 4, 4], [36, 37, 37, 37]])
    logits = scores([[4, 5, 5, 5], [4, 4, 4, 4], [37, 37, 37, 37]], 50, decoys={(0, 0): 36})
    # by hand: shape 0 (Bag): part 4 IoU 1/2, part 5 IoU 2/3; shape 1 (Bag): part 4 IoU 1, part 5 absent and
    # unpredicted = 1; shape 2 (Mug): part 36 IoU 0, part 37 IoU 3/4
    shapes = [(1 / 2 + 2 / 3) / 2, 1.0, (0 + 3 / 4) / 2]
    expected_inst = 100 * sum(shapes) / 3
    expected_class = 100 * ((shapes[0] + shapes[1]) / 2 + shapes[2]) / 2
    got = shapenetpart_miou(logits, target)
    assert got["inst_miou"] == pytest.approx(expected_inst) and got["class_miou"] == pytest.approx(expected_class)
    assert got["inst_miou"] != pytest.approx(got["class_miou"])
    acc = MetricAccumulator("shapenetpart_miou")
    acc.add(logits[2:], target[2:])
    acc.add(logits[:2], target[:2])
    assert acc.compute() == pytest.approx(got)


def test_partnet_part_category_miou_accumulates_over_shapes_and_ignores_other():
    target = torch.tensor([[0, 1, 1, 2, 2], [1, 3, 3, 3, 0]])
    logits = scores([[1, 1, 2, 2, 2], [1, 3, 1, 3, 3]], 4)
    # by hand, label 0 ("other") left out: label 1: I 1 + 1, U 2 + 2; label 2: I 2, U 3; label 3: I 2, U 3
    got = part_category_miou(logits, target)
    assert got["part_miou"] == pytest.approx(100 * (2 / 4 + 2 / 3 + 2 / 3) / 3)
    assert got["inst_miou"] == pytest.approx(100 * ((1 / 2 + 2 / 3) / 2 + (1 / 2 + 2 / 3) / 2) / 2)
    assert MetricAccumulator("partnet_miou").compute() == {}
    assert average_over_categories({"Chair": {"part_miou": 40.0, "inst_miou": 50.0}, "Table": {"part_miou": 30.0}}) == {
        "part_miou": 35.0}


def test_multiview_merge_averages_probabilities_by_item_in_any_order():
    # item 7: one confident view for class 0, two for class 1: mean logits say 0, mean probabilities say 1
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0], [6.0, 0.0], [0.0, 3.0], [0.0, 2.0], [2.0, 0.0]])
    items = torch.tensor([7, 3, 7, 3, 7, 3])
    target = torch.tensor([1, 0, 1, 0, 1, 0])
    probs, merged = merge_views(logits, target, items)
    expected7 = logits[[0, 2, 4]].softmax(dim=1).mean(dim=0)
    torch.testing.assert_close(probs[1], expected7)  # ids ascending: 3, then 7
    assert merged.tolist() == [0, 1] and probs[1].argmax() == 1 and logits[[0, 2, 4]].mean(dim=0).argmax() == 0
    acc = MetricAccumulator("top1")
    for order in ([5, 0, 3], [1, 4, 2]):  # rows arriving from two ranks, interleaved
        acc.add(logits[order], target[order], item=items[order])
    assert acc.compute()["top1"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="unknown metric"):
        MetricAccumulator("iou")


def write_shapenetpart(root: Path) -> dict[str, list[str]]:
    """The release's layout: synsetoffset2category.txt, split lists, <synset>/<id>.txt with ``x y z nx ny nz label``."""
    (root / "synsetoffset2category.txt").write_text("Airplane\t02691156\nBag\t02773838\n")
    rng = np.random.default_rng(0)
    lists = {"train": ["02691156/a0", "02773838/b0"], "val": ["02691156/a1"], "test": ["02773838/b1"]}
    for split, ids in lists.items():
        for shape in ids:
            synset, name = shape.split("/")
            labels = rng.choice([0, 1, 2, 3] if synset == "02691156" else [4, 5], 64)
            data = np.concatenate([rng.standard_normal((64, 6)), labels[:, None]], axis=1)
            (root / synset).mkdir(parents=True, exist_ok=True)
            np.savetxt(root / synset / f"{name}.txt", data)
        (root / "train_test_split").mkdir(exist_ok=True)
        (root / "train_test_split" / f"shuffled_{split}_file_list.json").write_text(
            json.dumps([f"shape_data/{s}" for s in ids]))
    return lists


def test_shapenetpart_layout_trains_on_trainval_and_names_its_protocol(tmp_path: Path):
    write_shapenetpart(tmp_path)
    ad = adapters.get("point_part")(tmp_path, layout="shapenetpart", num_points=32, num_groups=4, group_size=8)
    assert ad.num_classes == 50 and ad.metric == "shapenetpart_miou"
    names = lambda split: sorted(p.stem for p, _ in ad.samples(split))  # noqa: E731
    assert names("trainval") == ["a0", "a1", "b0"] and names("test") == ["b1"]
    x, y = ad.dataset("trainval", train=True)[0]
    assert x.shape == (32, 3) and y.shape == (32,)
    with pytest.raises(ValueError, match="trainval = train \\+ val"):
        ad.samples("holdout")
    assert adapters.get("point_part").spec(5, layout="partnet", category="Chair").metric == "partnet_miou"


def test_shapenetpart_category_onehot_and_pointmae_head(tmp_path: Path):
    write_shapenetpart(tmp_path)
    ad = adapters.get("point_part")(tmp_path, layout="shapenetpart", num_points=32, num_groups=4, group_size=8,
                                    category_onehot=True, head="pointmae")
    ds = ad.dataset("test", train=False)  # b1, a Bag: synset 02773838, the second line of synsetoffset2category.txt
    x, _ = ds[0]
    assert ad.input_shape() == x.shape == (32, 3 + 2) and x[:, 3:].tolist() == [[0.0, 1.0]] * 32
    tok, head = ad.tokenizer(8).eval(), ad.head(8).eval()
    out = tok.encode(x[None])
    assert out.tokens.shape == (1, 4, 8) and out.extras["category"].tolist() == [[0.0, 1.0]]
    with pytest.raises(ValueError, match="block_features"):
        head(out.tokens, out)
    torch.manual_seed(0)
    out.extras["block_features"] = [torch.randn(1, 4, 8) for _ in head.feature_blocks]  # what the model supplies
    logits = head(out.tokens, out)
    assert logits.shape == (1, 32, 50)
    out.extras["category"] = torch.tensor([[1.0, 0.0]])
    assert not torch.allclose(head(out.tokens, out), logits)  # the category conditions every point
    with pytest.raises(ValueError, match="category_onehot needs layout='shapenetpart'"):
        adapters.get("point_part").spec(4, category_onehot=True)


def test_part_segmentation_augmentation_is_point_mae_segmentation():
    from pathway.adapters.point import augment

    ad = adapters.get("point_part").spec(4)
    o = ad.options
    assert (tuple(o["scale"]), o["isotropic_scale"], o["translate"], o["jitter"]) == ((0.8, 1.25), True, 0.1, 0.0)
    points = np.random.default_rng(0).standard_normal((100, 3)).astype(np.float32)
    out = augment(points, np.random.default_rng(1), None, False, 0.0, (0.8, 1.25), True, 0.1)
    centred = lambda p: p - p.mean(axis=0)  # noqa: E731
    ratio = centred(out) / centred(points)
    assert np.allclose(ratio, ratio[0, 0], atol=1e-4) and 0.8 <= ratio[0, 0] <= 1.25  # one scale for every axis
    shift = out.mean(axis=0) - ratio[0, 0] * points.mean(axis=0)
    assert np.all(np.abs(shift) <= 0.1 + 1e-5)
    assert adapters.get("point").spec(4).options["isotropic_scale"] is False  # classification keeps its own


def test_partnet_prediction_never_takes_the_other_label():
    """A point whose top score is "other" (label 0) is predicted as its best part, as PartNet's test does."""
    target = torch.tensor([[1, 2]])
    logits = torch.tensor([[[5.0, 1.0, 0.0], [5.0, 0.0, 1.0]]])  # "other" wins the plain argmax on both points
    assert part_category_miou(logits, target)["part_miou"] == pytest.approx(100.0)
