"""Data order that can be resumed exactly: a permutation per (seed, epoch), a start position,
and per-item RNG seeds; loaders whose workers live for the whole run.

* :class:`EpochSampler` yields this rank's share of ``randperm(n, seed + epoch)`` from a given
  position, as ``(epoch, index)`` pairs, so a resumed run skips the consumed indices without loading them
  and the epoch travels with each index into the workers.
* :class:`SeededItems` loads item ``i`` of epoch ``e`` under RNG seeds derived from
  ``(seed, e, i)``: random augmentation gives the same result whatever the worker count, the
  worker that loads it, or a restart in the middle of the epoch. The caller's RNG state is
  restored afterwards, so loading in the main process does not disturb dropout or mixup.
* :class:`Repeated`: an item that is several augmented samples of one file (VideoMAE's repeated
  augmentation, ``num_sample``); :func:`collate` flattens them into the batch, so a batch of B items
  holds ``B * num_sample`` samples (VideoMAE's ``multiple_samples_collate``); a batch left with no sample
  (its files all unreadable in evaluation) is None, which every evaluation loop skips.
* :func:`make_loader`: workers are started once and kept (``persistent_workers``): forking them again at
  every epoch and every evaluation cost the first log window of each epoch ~90 % of its samples/s on a GPU
  (issue 19). Nothing an item depends on is set on the data set after they start: the epoch comes with
  the index.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

__all__ = ["EpochSampler", "Repeated", "SeededItems", "collate", "make_loader", "set_epoch", "default_workers"]

GPU_MAX_WORKERS = 16  # more workers per GPU than this rarely pay (14 fed ViT-B/16 at ~2,300 images/s on an H200)
CPU_MAX_WORKERS = 4  # on the CPU the workers take cores from the training step itself


class Repeated(tuple):
    """Several ``(x, y)`` samples made from one file, flattened into the batch by :func:`collate`."""


def collate(items: list):
    """``default_collate``, after replacing each :class:`Repeated` item by the samples it holds; None when no
    sample is left (every file of an evaluation batch unreadable, each a ``LeftOut`` item): the evaluation
    loops skip such a batch."""
    flat = [sample for item in items for sample in (item if isinstance(item, Repeated) else (item,))]
    return default_collate(flat) if flat else None


class EpochSampler(Sampler[tuple[int, int]]):
    """``(epoch, index)`` of one epoch's items for one rank, from ``start`` (in this rank's items).

    Training (``shuffle=True``) drops the tail so every rank gets the same count (DDP steps stay in
    lock-step); evaluation keeps every item once across ranks (``rank::world``, no padding, so no item
    is scored twice; ``cluster.distributed.gather_rows`` puts the rows back in the data set's order).
    """

    def __init__(self, n: int, *, seed: int, shuffle: bool, rank: int = 0, world: int = 1) -> None:
        self.n, self.seed, self.shuffle, self.rank, self.world = n, seed, shuffle, rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
            per_rank = self.n // self.world
            return order[self.rank * per_rank:(self.rank + 1) * per_rank]
        return list(range(self.rank, self.n, self.world))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, i) for i in self.indices()[self.start:])

    def __len__(self) -> int:
        return max(0, len(self.indices()) - self.start)


class SeededItems(Dataset):
    """``dataset[i]`` under RNG seeds that depend only on (seed, epoch, i)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]):
        """Item ``key`` of epoch 0, or ``key = (epoch, index)`` as :class:`EpochSampler` yields it."""
        epoch, i = key if isinstance(key, tuple) else (0, key)
        item_seed = (self.seed * 1_000_003 + epoch) * 10_000_019 + i
        py, npy = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also (re)seed CUDA -- whose state fork_rng(devices=[])
            # does not restore -- and, before CUDA starts, record a stack trace per item (about 1 ms each)
            torch.random.default_generator.manual_seed(item_seed)
            random.seed(item_seed)
            np.random.seed(item_seed % 2**32)
            try:
                return self.dataset[i]
            finally:
                random.setstate(py)
                np.random.set_state(npy)


def default_workers(cuda: bool) -> int:
    """Loader workers per process when ``data.num_workers`` is not set: the CPU cores this process may use,
    shared among the processes ``torchrun`` started on this machine, less one for the process itself; at most
    ``GPU_MAX_WORKERS`` on a GPU and ``CPU_MAX_WORKERS`` on the CPU."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(per_process - 1, GPU_MAX_WORKERS if cuda else CPU_MAX_WORKERS))


def make_loader(
    dataset: Dataset, *, batch_size: int, num_workers: int | None, seed: int, shuffle: bool, rank: int = 0,
    world: int = 1, prefetch_factor: int = 2
) -> tuple[DataLoader, EpochSampler]:
    """A DataLoader over :class:`SeededItems` with an :class:`EpochSampler`.

    ``num_workers`` None: :func:`default_workers`. Workers are started at the first epoch and kept for the
    whole run; each loads ``prefetch_factor`` batches ahead, and leaves the stop signals (SIGTERM, SIGUSR1,
    Ctrl-C) to the main process (``cluster.preempt.ignore_stop_signals``), whichever loader it serves (training,
    evaluation, the final multi-view test). The DataLoader gets its own generator, so creating an iterator does
    not consume the global torch RNG (which would shift dropout/drop-path after a resume).
    """
    from .cluster.preempt import ignore_stop_signals

    cuda = torch.cuda.is_available()
    workers = default_workers(cuda) if num_workers is None else num_workers
    items = SeededItems(dataset, seed)
    sampler = EpochSampler(len(items), seed=seed, shuffle=shuffle, rank=rank, world=world)
    loader = DataLoader(
        items,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        drop_last=shuffle,
        pin_memory=cuda,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=workers > 0,
        worker_init_fn=ignore_stop_signals,
        prefetch_factor=prefetch_factor if workers else None,
    )
    return loader, sampler


def set_epoch(loader: DataLoader, sampler: EpochSampler, epoch: int, start_batch: int = 0) -> None:
    """Position the loader at ``start_batch`` of ``epoch`` (before creating its iterator)."""
    sampler.set_epoch(epoch, start_batch * loader.batch_size)  # type: ignore[operator]
