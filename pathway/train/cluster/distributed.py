"""What the engine does differently when ``torchrun`` started several processes (DDP).

* :func:`agreed_loss`: the loss of an optimizer step and whether it is finite on every rank, read with one host
  sync per optimizer step (not per micro-batch), so every rank stops together on a NaN or infinite loss; the same
  all-reduce carries the stop request and the checkpoint clock (``preempt.StopAgreement``).
* :func:`gather_rows`: an evaluation's rows from every rank, back in the data set's order, so a metric scored
  on ``world`` shards equals the metric of one process scoring the whole split.
* :func:`sync_batchnorm`: BatchNorm layers (the point tokenizer's mini-PointNet, the point heads) as
  ``SyncBatchNorm`` under DDP on GPUs, so their statistics cover the global batch as the official single-GPU
  runs' do, not 2-4 shapes per GPU.
* :func:`release`: the process group is destroyed by whoever created it, at the end of the run.

The ``ctx`` arguments are the engine's ``Context`` (device, rank, world, whether it created the group).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["agreed_loss", "gather_rows", "release", "sync_batchnorm"]


def agreed_loss(loss_sum: Tensor, ctx: Any, agreement: Any = None) -> tuple[float, bool]:
    """``(loss, finite on every rank)`` of a step whose micro-batch losses were added up on the device.

    One collective and one host sync for the step: the device tensor of non-finite counts is reduced over the
    ranks and read together with the loss. A rank whose own loss is finite still returns False when another
    rank's is not, so every rank stops at the same step. ``agreement`` (a ``preempt.StopAgreement``): its local
    flags (a stop signal received, a checkpoint due) are counted in the same all-reduce and it gets the agreed
    ones, true on every rank where one rank's is."""
    flags = agreement.local() if agreement is not None else ()
    counts = (~torch.isfinite(loss_sum)).float().reshape(1)
    if ctx.world > 1:
        if flags:
            counts = torch.cat([counts, torch.tensor([float(f) for f in flags], device=counts.device)])
        dist.all_reduce(counts)
    value, bad_ranks, *reduced = torch.cat([loss_sum.detach().float().reshape(1), counts]).tolist()
    if agreement is not None:
        stop, due = (count > 0 for count in reduced) if reduced else flags  # one process: its own flags
        agreement.agree(stop, due)
    return value, bad_ranks == 0


def gather_rows(rows: list[Tensor], ctx: Any) -> list[Tensor]:
    """Every rank's evaluation rows, in the data set's order (on every rank).

    ``rows``: this rank's batches of one kind (logits, targets or item ids), the rows of items ``rank, rank +
    world, ...`` (the evaluation sampler's ``rank::world`` share, which has no padding, so no item is counted
    twice). The result is one tensor, row ``i`` being item ``i``: the same rows, in the same order, as one process
    scoring the whole split; metrics that depend on the order of ties (average precision) agree too. Items left out
    of an evaluation (unreadable files) shorten a rank's rows: every kind of row is still reordered by the same
    permutation, so logits stay paired with their targets and items, but the order of the rows read after a gap
    is interleaved differently from one process's (only the order of ties can differ)."""
    mine = torch.cat(rows) if rows else torch.empty(0)
    if ctx.world == 1:
        return [mine] if rows else []
    parts: list[Any] = [None] * ctx.world
    dist.all_gather_object(parts, mine)
    index = torch.cat([torch.arange(len(p)) * ctx.world + rank for rank, p in enumerate(parts)])
    filled = [p for p in parts if len(p)]  # a split smaller than the world leaves the last ranks without rows
    return [torch.cat(filled)[index.argsort()]] if filled else []


def sync_batchnorm(model: nn.Module, ctx: Any) -> nn.Module:
    """``model`` with its BatchNorm layers converted to ``SyncBatchNorm`` when DDP runs on GPUs (the layers are
    replaced in place and keep their parameters and state-dict keys; checkpoints load either way).

    Not on the CPU: ``SyncBatchNorm`` runs on GPUs only (torch refuses a CPU input while training under a process
    group), so a gloo run keeps per-process statistics."""
    if ctx.world == 1 or ctx.device.type != "cuda":
        return model
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def release(ctx: Any) -> None:
    """Destroy the process group if this run's ``setup`` created it (a group the caller started, as the rehearsal
    under ``torchrun`` does, is left to the caller)."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()
