"""Evaluation metrics, as pure functions of logits and labels.

* classification: top-1 / top-5 accuracy (%);
* multi-label (AudioSet): mean average precision over classes that have a positive (%);
* part segmentation (ShapeNetPart): instance mIoU (mean over shapes) and class mIoU (mean over
  shape categories of their instances' mIoU), IoU of an absent-and-unpredicted part counted as 1,
  as Point-MAE and PointNet++ do;
* video / multi-view testing: logits of V views (clips x crops) averaged per item.

Metrics accumulate on the CPU in a :class:`MetricAccumulator` so that distributed runs can gather
the raw predictions and compute the same numbers as a single process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["topk_accuracy", "mean_average_precision", "part_miou", "average_views", "MetricAccumulator"]


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
        categories: ``[N]`` shape category of each item (class mIoU groups by it); None = one category.
        parts_of: category -> the part labels it may have (ShapeNetPart); predictions are restricted to
            them, and IoU is averaged over them. None = every part label seen in the item's target or prediction.
    """
    n = logits.shape[0]
    if categories is None:
        categories = torch.zeros(n, dtype=torch.long)
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
    return {"inst_miou": 100 * ious_t.mean().item() if n else 0.0, "class_miou": 100 * sum(by_cat) / max(1, len(by_cat))}


def average_views(logits: Tensor, views: int) -> Tensor:
    """``[B * V, C]`` logits of V consecutive views per item -> ``[B, C]`` mean (video: clips x crops).

    Softmax is not applied first: the average of logits is what VideoMAE's multi-view test reports.
    """
    if views == 1:
        return logits
    if logits.shape[0] % views:
        raise ValueError(f"{logits.shape[0]} rows of logits are not a whole number of {views}-view items")
    return logits.view(-1, views, *logits.shape[1:]).mean(dim=1)


@dataclass
class MetricAccumulator:
    """Collects logits and targets over an evaluation pass, then computes the adapter's metric."""

    metric: str  # "top1" | "map" | "miou"
    logits: list[Tensor] = field(default_factory=list)
    targets: list[Tensor] = field(default_factory=list)
    extras: list[Tensor] = field(default_factory=list)  # categories for miou

    def add(self, logits: Tensor, target: Tensor, extra: Tensor | None = None) -> None:
        self.logits.append(logits.detach().float().cpu())
        self.targets.append(target.detach().cpu())
        if extra is not None:
            self.extras.append(extra.detach().cpu())

    def compute(self, parts_of: dict[int, list[int]] | None = None) -> dict[str, float]:
        if not self.logits:
            return {}
        logits, target = torch.cat(self.logits), torch.cat(self.targets)
        if self.metric == "top1":
            return topk_accuracy(logits, target)
        if self.metric == "map":
            return mean_average_precision(logits, target)
        if self.metric == "miou":
            cats = torch.cat(self.extras) if self.extras else None
            return part_miou(logits, target, cats, parts_of)
        raise ValueError(f"unknown metric {self.metric!r}; allowed: 'top1', 'map', 'miou'")
