"""Paired differences over seeds, with a t-distribution confidence interval.

The embedded experiment runs every condition on the same seeds (same initial target weights, same data
order, same augmentation), so a condition is compared with another seed by seed: the differences
``a_s - b_s`` remove what the seed does to both, and their mean gets a Student-t interval with ``n - 1``
degrees of freedom. The interval is the whole claim: zero inside it means the data do not tell the two apart.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

__all__ = ["PairedDifference", "paired_difference"]


@dataclass(frozen=True)
class PairedDifference:
    """``mean(a - b)`` over paired seeds and its two-sided confidence interval."""

    differences: tuple[float, ...]
    mean: float
    std: float  # of the differences (n - 1 in the denominator)
    low: float
    high: float
    confidence: float

    @property
    def n(self) -> int:
        return len(self.differences)

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def words(self) -> str:
        """Whether the difference is told apart from zero, in plain words."""
        if not self.excludes_zero:
            return "not distinguishable from zero"
        return "distinguishable from zero: " + ("higher" if self.mean > 0 else "lower")


def paired_difference(a: dict[int, float], b: dict[int, float], confidence: float = 0.95) -> PairedDifference:
    """``a - b`` over the seeds both have; ``a`` and ``b`` map seed -> value.

    Raises ``ValueError`` when fewer than two seeds are shared (no spread, no interval) rather than
    reporting an interval that is not one.
    """
    from scipy.stats import t as student_t

    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        raise ValueError(f"a paired interval needs at least 2 shared seeds; got {seeds}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")
    diffs = tuple(a[s] - b[s] for s in seeds)
    mean, std = statistics.fmean(diffs), statistics.stdev(diffs)
    half = float(student_t.ppf(0.5 + confidence / 2, len(diffs) - 1)) * std / math.sqrt(len(diffs))
    return PairedDifference(diffs, mean, std, mean - half, mean + half, confidence)
