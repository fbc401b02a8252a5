"""Seeds of a run: one for building the model (the same on every rank), then one stream per rank for the
randomness of training (mixup and CutMix, drop path, dropout, MAE masking).

A run is a pure function of ``(train.seed, world size)``:

* :func:`seed_everything` seeds python, numpy and torch (CPU and CUDA) before the model is built, the same on
  every rank, so every replica starts from the same weights (DDP also broadcasts rank 0's at the wrap).
* :func:`seed_rank_streams` then gives each rank its own stream. Seeding every rank alike drew one mixup lambda,
  one CutMix box and one drop-path pattern for the whole global batch instead of one per process (issue 19); the
  official code seeds ``seed + rank`` (M2PT ``main_finetune.py``, as MAE's). Rank 0 keeps the stream the build
  left it, so a one-process run draws exactly what it drew before ranks had streams of their own; rank ``r > 0``
  reseeds with :func:`rank_seed`. A checkpoint stores every rank's RNG state (``checkpoint.rng_state``) and a
  resume restores it, so a resumed run continues each rank's stream where it stopped.
* Data-loader workers need no seeds of their own: every item is loaded under seeds of ``(seed, epoch, index)``
  (``data.SeededItems``), distinct per item and so per rank and per worker, and independent of which rank or
  worker loads it, or of a restart.
"""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["RANK_STRIDE", "rank_seed", "seed_everything", "seed_rank_streams"]

RANK_STRIDE = 1_000_003  # a prime far above the seeds a study uses: rank r of seed s never reuses seed s + r's stream


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s training randomness: ``seed`` for rank 0, ``seed + RANK_STRIDE * rank`` after.

    The official ``seed + rank`` would give rank 1 of seed 0 the stream of rank 0 of seed 1, so two runs of a
    multi-seed study would share draws; the stride keeps them apart."""
    return seed + RANK_STRIDE * rank


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (the CPU generator and every CUDA device's)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_rank_streams(seed: int, rank: int) -> None:
    """After the model is built from :func:`seed_everything` ``(seed)``: give rank ``rank`` its own stream for the
    randomness of training. Rank 0 continues the stream it built the model with (see the module docstring)."""
    if rank > 0:
        seed_everything(rank_seed(seed, rank))
