"""Learning-rate schedule: linear warm-up then half-cosine, as a pure function of the step.

Counted in optimizer steps (not micro-batches), so resuming only needs the step number. As MAE's
``util/lr_sched.py`` and nanoGPT's ``get_lr``, but stateless: ``lr_at(step, ...)`` can be plotted,
tested and recomputed after a resume without any scheduler object.
"""

from __future__ import annotations

import math

import torch

__all__ = ["lr_at", "scaled_lr", "apply_lr"]


def scaled_lr(blr: float, effective_batch: int) -> float:
    """MAE's rule: the absolute lr grows linearly with the batch, ``blr * batch / 256``."""
    return blr * effective_batch / 256


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0) -> float:
    """Learning rate after ``step`` optimizer steps.

    ``step`` in ``[0, warmup_steps)`` rises linearly from ``base_lr / warmup_steps`` to ``base_lr``; the
    rest follows half a cosine from ``base_lr`` down to ``min_lr`` at ``total_steps``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def step_plan(steps_per_epoch: int, epochs: int, max_steps: int | None, warmup_epochs: float) -> tuple[int, int]:
    """(total optimizer steps, warm-up steps) of a run: ``epochs`` of ``steps_per_epoch``, capped by ``max_steps``."""
    total = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    return total, round(warmup_epochs * steps_per_epoch)


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set each group's lr to ``lr * group['lr_scale']``.

    ``lr_scale`` carries layer decay and the lambda group's own base (``pathway.param_groups``),
    so one schedule drives every group.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
