"""Samples/s of a training log window, and the share of it spent waiting for data.

The loop reads its batches through :meth:`Window.batches`, which times every ``next()``: the time the process
stood waiting for the loader. ``data_wait`` in a train row is that time over the window's wall time, the largest
over the ranks (one slow rank holds every other at the gradient all-reduce): near 0 when the step is the
bottleneck; a run whose ``data_wait`` stays well above 0 is input-bound (more ``data.num_workers``, a larger
``data.prefetch_factor``, faster storage). Evaluation and end-of-epoch checkpoints run inside
:meth:`Window.paused` and count in neither the wall time nor the wait.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Window"]


class Window:
    """The steps since the last log row: samples seen on all ranks, wall time, time spent waiting for data."""

    def __init__(self) -> None:
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self.start, self.samples, self.waited, self.excluded = now, 0, 0.0, 0.0

    def batches(self, loader: Iterable) -> Iterator[Any]:
        """``loader``'s batches, the wait for each added to the window."""
        iterator = iter(loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            finally:
                self.waited += time.perf_counter() - start
            yield batch

    def add(self, samples: int) -> None:
        self.samples += samples

    @contextmanager
    def paused(self):
        """Time spent inside (evaluation, checkpoints) is left out of the window."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - start

    def row(self, ctx: Any) -> dict[str, float]:
        """``samples_per_s`` and ``data_wait`` (share of the window, the largest over the ranks); starts a new
        window. Collective under DDP: every rank calls it at the same step."""
        now = time.perf_counter()
        seconds = max(now - self.start - self.excluded, 1e-9)
        wait = torch.tensor([self.waited / seconds])
        if ctx.world > 1:
            wait = wait.to(ctx.device)
            dist.all_reduce(wait, op=dist.ReduceOp.MAX)
        out = {"samples_per_s": self.samples / seconds, "data_wait": round(min(1.0, wait.item()), 4)}
        self._reset(now)
        return out
