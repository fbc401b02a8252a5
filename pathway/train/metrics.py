"""Evaluation metrics, as pure functions of logits and labels.

* classification: top-1 / top-5 accuracy (%);
* multi-label (AudioSet): mean average precision over classes that have a positive (%);
* part segmentation (ShapeNetPart, Point-MAE ``segmentation/main.py`` test loop): each shape's
  prediction restricted to the parts of its category, the category being the one that owns the label of
  its first point (``seg_label_to_cat[target[i, 0]]``); per shape the mean IoU over the category's parts,
  an absent-and-unpredicted part counting 1; instance mIoU = mean over shapes, class mIoU = mean over
  categories of their shapes' mean (:func:`shapenetpart_miou`);
* PartNet (one category per model): part-category mIoU, each part label's IoU accumulated over all
  shapes of the split, then averaged over the labels, the unlabelled/"other" label 0 left out
  (:func:`part_category_miou`); :func:`average_over_categories` averages the per-category runs;
* video / multi-view testing: the softmax probabilities of the views of one video averaged
  (VideoMAE ``engine_for_finetuning.py`` ``merge``), by item id, so views may arrive in any order and
  from any rank (:func:`merge_views`).

Metrics accumulate on the CPU in a :class:`MetricAccumulator` so that distributed runs can gather
the raw predictions and compute the same numbers as a single process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from pathway.errors import OptionError

__all__ = ["topk_accuracy", "mean_average_precision", "part_miou", "shapenetpart_miou", "part_category_miou",
           "average_over_categories", "average_views", "merge_views", "MetricAccumulator", "METRICS"]


def topk_accuracy(logits: Tensor, target: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent. ``logits [N, C]``, ``target [N]`` class indices; k > C is skipped."""
    out = {}
    if logits.shape[0] == 0:
        return {f"top{k}": 0.0 for k in ks if k <= logits.shape[1]}
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices  # [N, maxk]
    hit = pred.eq(target.view(-1, 1))
    for k in ks:
        if k <= logits.shape[1]:
            out[f"top{k}"] = hit[:, :k].any(dim=1).float().mean().item() * 100
    return out


def average_precision(scores: Tensor, labels: Tensor) -> float:
    """AP of one class: mean of the precision at the rank of each positive (sklearn's definition)."""
    order = scores.argsort(descending=True)
    hits = labels[order].float()
    positives = hits.sum()
    if positives == 0:
        return float("nan")
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1, dtype=torch.float32)
    return (precision * hits).sum().item() / positives.item()


def mean_average_precision(logits: Tensor, target: Tensor) -> dict[str, float]:
    """mAP in percent over classes with at least one positive. ``logits, target [N, C]`` (multi-hot)."""
    aps = [average_precision(logits[:, c], target[:, c] > 0.5) for c in range(logits.shape[1])]
    valid = [a for a in aps if a == a]
    return {"map": 100 * sum(valid) / max(1, len(valid))}


def part_miou(
    logits: Tensor, target: Tensor, categories: Tensor | None = None, parts_of: dict[int, list[int]] | None = None
) -> dict[str, float]:
    """Instance and class mIoU in percent.

    Args:
        logits: ``[N, P, C]`` per-point part scores.
        target: ``[N, P]`` per-point part labels.
        categories: ``[N]`` shape category of each item (class mIoU groups by it); None with ``parts_of``:
            the category owning the item's first target label (Point-MAE); None without: one category.
        parts_of: category -> the part labels it may have (ShapeNetPart); predictions are restricted to
            them, and IoU is averaged over them. None = every part label seen in the item's target or prediction.
    """
    n = logits.shape[0]
    if categories is None:
        owner = {part: cat for cat, parts in (parts_of or {}).items() for part in parts}
        categories = torch.tensor([owner.get(int(t[0]), 0) for t in target], dtype=torch.long)
    ious = []
    for i in range(n):
        cat = int(categories[i])
        scores = logits[i]
        if parts_of is not None:
            parts = parts_of[cat]
            pred = torch.tensor(parts)[scores[:, parts].argmax(dim=1)]
        else:
            pred = scores.argmax(dim=1)
            parts = sorted(set(target[i].tolist()) | set(pred.tolist()))
        per_part = []
        for part in parts:
            t, p = target[i] == part, pred == part
            union = (t | p).sum().item()
            per_part.append(1.0 if union == 0 else (t & p).sum().item() / union)
        ious.append(sum(per_part) / len(per_part))
    ious_t = torch.tensor(ious)
    by_cat = [ious_t[categories == c].mean().item() for c in categories.unique().tolist()]
    return {
        "inst_miou": 100 * ious_t.mean().item() if n else 0.0,
        "class_miou": 100 * sum(by_cat) / max(1, len(by_cat)),
    }


def shapenetpart_miou(logits: Tensor, target: Tensor) -> dict[str, float]:
    """ShapeNetPart's protocol (Point-MAE): :func:`part_miou` over the 16 categories' part labels."""
    from pathway.adapters.point import SHAPENETPART_PARTS

    return part_miou(logits, target, None, dict(enumerate(SHAPENETPART_PARTS.values())))


def part_category_miou(logits: Tensor, target: Tensor, ignore: tuple[int, ...] = (0,)) -> dict[str, float]:
    """PartNet's part-category mIoU in percent, plus the mean per-shape IoU (``inst_miou``).

    ``part_miou``: for each part label except ``ignore``, intersection and union summed over every point of
    every shape, IoU = their ratio; the mean over the labels that occur in the target or the prediction.
    ``inst_miou``: per shape, the mean IoU over the labels it has or is predicted to have (``ignore`` left out).
    Points whose target is in ``ignore`` are left out of both, and the prediction never takes an ``ignore`` label:
    PartNet's own test predicts among the parts only (``argmax(logits[..., 1:]) + 1``, partnet_dataset
    sem_seg/test_general_seg.py:124). ``logits [N, P, C]``, ``target [N, P]``.
    """
    scores = logits.detach().clone()
    scores[..., list(ignore)] = float("-inf")
    pred, target = scores.argmax(dim=-1), target.long()
    keep = ~torch.isin(target, torch.tensor(ignore, dtype=torch.long))
    num_classes = logits.shape[-1]
    labels = [c for c in range(num_classes) if c not in ignore]
    inter = torch.zeros(num_classes, dtype=torch.float64)
    union = torch.zeros(num_classes, dtype=torch.float64)
    shape_ious = []
    for i in range(pred.shape[0]):
        t, p = target[i][keep[i]], pred[i][keep[i]]
        ious = []
        for c in labels:
            tc, pc = t == c, p == c
            inter_c, union_c = (tc & pc).sum().item(), (tc | pc).sum().item()
            inter[c] += inter_c
            union[c] += union_c
            if union_c:
                ious.append(inter_c / union_c)
        if ious:
            shape_ious.append(sum(ious) / len(ious))
    present = [c for c in labels if union[c] > 0]
    part = sum((inter[c] / union[c]).item() for c in present) / max(1, len(present))
    return {"part_miou": 100 * part, "inst_miou": 100 * sum(shape_ious) / max(1, len(shape_ious))}


def average_over_categories(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over per-category results (PartNet: one run per category), e.g.
    ``{"Chair": {"part_miou": 40.1}, "Table": {"part_miou": 38.0}} -> {"part_miou": 39.05}``."""
    if not results:
        raise OptionError("average_over_categories: no per-category results given")
    keys = set.intersection(*(set(r) for r in results.values()))
    return {k: sum(r[k] for r in results.values()) / len(results) for k in sorted(keys)}


def average_views(logits: Tensor, views: int) -> Tensor:
    """``[B * V, C]`` logits of V consecutive views per item -> ``[B, C]`` mean (video: clips x crops).

    Softmax is not applied first: the average of logits is what VideoMAE's multi-view test reports.
    """
    if views == 1:
        return logits
    if logits.shape[0] % views:
        raise ValueError(f"{logits.shape[0]} rows of logits are not a whole number of {views}-view items")
    return logits.view(-1, views, *logits.shape[1:]).mean(dim=1)


def merge_views(logits: Tensor, target: Tensor, items: Tensor) -> tuple[Tensor, Tensor]:
    """Per-view rows -> per-item rows: the mean softmax probability of the views sharing an item id
    (VideoMAE's multi-view test), and that item's target; items in ascending id order.

    ``logits [V_total, C]``, ``target [V_total]``, ``items [V_total]`` (e.g. the video index of each view).
    """
    ids, inverse = items.long().unique(return_inverse=True)
    probs = torch.zeros(len(ids), logits.shape[1], dtype=torch.float32)
    probs.index_add_(0, inverse, logits.float().softmax(dim=1))
    counts = torch.zeros(len(ids)).index_add_(0, inverse, torch.ones(len(items)))
    merged_target = torch.empty(len(ids), dtype=target.dtype)
    merged_target[inverse] = target
    return probs / counts[:, None], merged_target


METRICS = ("top1", "map", "miou", "shapenetpart_miou", "partnet_miou")


@dataclass
class MetricAccumulator:
    """Collects logits and targets over an evaluation pass, then computes the adapter's metric.

    ``add(logits, target, item=ids)`` marks rows as views of items (video multi-view test): ``compute``
    merges them per item (:func:`merge_views`) before the metric. Each row keeps its own ids, so lists
    gathered from several ranks in any order give the same result.
    """

    metric: str  # one of METRICS (an adapter's ``metric``)
    logits: list[Tensor] = field(default_factory=list)
    targets: list[Tensor] = field(default_factory=list)
    extras: list[Tensor] = field(default_factory=list)  # categories for miou
    items: list[Tensor] = field(default_factory=list)  # item id of each row, for multi-view tests

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise OptionError(f"unknown metric {self.metric!r}; allowed: {list(METRICS)}")

    def add(self, logits: Tensor, target: Tensor, extra: Tensor | None = None, item: Tensor | None = None) -> None:
        self.logits.append(logits.detach().float().cpu())
        self.targets.append(target.detach().cpu())
        if extra is not None:
            self.extras.append(extra.detach().cpu())
        if item is not None:
            self.items.append(torch.as_tensor(item).detach().cpu())

    def compute(self, parts_of: dict[int, list[int]] | None = None) -> dict[str, float]:
        if not self.logits:
            return {}
        logits, target = torch.cat(self.logits), torch.cat(self.targets)
        if self.items:
            logits, target = merge_views(logits, target, torch.cat(self.items))
        if self.metric == "top1":
            return topk_accuracy(logits, target)
        if self.metric == "map":
            return mean_average_precision(logits, target)
        if self.metric == "shapenetpart_miou":
            return shapenetpart_miou(logits, target)
        if self.metric == "partnet_miou":
            return part_category_miou(logits, target)
        cats = torch.cat(self.extras) if self.extras else None
        return part_miou(logits, target, cats, parts_of)
