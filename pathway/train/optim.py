"""Optimizer, losses and batch regularisation for the engine.

* AdamW over ``pathway.param_groups``: the lambdas in their own group (no weight decay, own lr:
  a decayed lambda never opens the pathway, design README decision 5), no decay on 1-D params,
  optional layer-wise lr decay. Each group's ``lr_scale`` is applied by ``schedule.apply_lr``.
* the loss of each task: cross-entropy (hard, label-smoothed, or soft targets after Mixup/CutMix),
  BCE-with-logits for multi-label, per-point cross-entropy for part segmentation.
* timm ``Mixup`` (classification and multi-label only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Recipe
from .schedule import scaled_lr

__all__ = ["base_lr", "build_optimizer", "build_mixup", "compute_loss"]


def base_lr(recipe: Recipe, effective_batch: int) -> float:
    """``optim.lr`` when set, else MAE's ``blr * effective_batch / 256``."""
    o = recipe.optim
    return o.lr if o.lr is not None else scaled_lr(o.blr, effective_batch)


def build_optimizer(model: nn.Module, recipe: Recipe, lr: float, log=print) -> torch.optim.AdamW:
    """AdamW over the pathway-aware groups; prints their sizes as nanoGPT's ``configure_optimizers``."""
    import pathway

    o = recipe.optim
    groups = pathway.param_groups(
        model, lr, o.weight_decay, lambda_lr=o.lambda_lr, layer_decay=o.layer_decay
    )
    groups = [g for g in groups if any(p.requires_grad for p in g["params"])]
    for g in groups:
        g["params"] = [p for p in g["params"] if p.requires_grad]
        n = sum(p.numel() for p in g["params"])
        log(f"  group {g['name']:<28} tensors {len(g['params']):>4}  params {n:>11,}  "
            f"wd {g['weight_decay']:<6g} lr_scale {g['lr_scale']:.4g}")
    fused = torch.cuda.is_available() and all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas), eps=o.eps, fused=fused or None)


def build_mixup(recipe: Recipe, num_classes: int, task: str):
    """timm Mixup/CutMix (which also applies label smoothing), or None when off or not applicable."""
    t = recipe.train
    if task not in ("classification", "multilabel") or (t.mixup <= 0 and t.cutmix <= 0):
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=t.mixup, cutmix_alpha=t.cutmix, prob=t.mixup_prob, switch_prob=t.mixup_switch_prob,
        label_smoothing=t.label_smoothing if task == "classification" else 0.0, num_classes=num_classes,
    )


def compute_loss(logits: Tensor, y: Tensor, task: str, label_smoothing: float = 0.0) -> Tensor:
    """The task's loss. ``y`` may be soft targets ``[B, C]`` (after Mixup) for classification."""
    logits = logits.float()
    if task == "classification":
        if y.dtype.is_floating_point:  # soft targets from Mixup (smoothing already inside)
            return torch.sum(-y * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, y.float())
    if task == "segmentation":  # logits [B, P, C], y [B, P]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1).long(), label_smoothing=label_smoothing)
    raise ValueError(f"unknown task {task!r}; allowed: 'classification', 'multilabel', 'segmentation'")
