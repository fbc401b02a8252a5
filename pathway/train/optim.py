"""Optimizer, losses and batch regularisation for the engine.

* The optimizer over ``pathway.param_groups``: the lambdas in their own groups (no weight decay, own lr:
  a decayed lambda never opens the pathway, design README decision 5), no decay on 1-D params,
  optional layer-wise lr decay. Each group's ``lr_scale`` is applied by ``schedule.apply_lr``.

  - Layer decay reaches lambda too (``lambda_layer_decay``, default on): the lambda of a layer in block i
    gets block i's lr scale, as the official code, whose scalar lambda is a 1-D parameter of block i that
    MAE's ``param_groups_lrd`` puts in block i's group (M2PT ``multimodal_pathway.py:13``,
    ``Image/util/lr_decay.py:32-39, 74``); off, every lambda keeps the lambda lr.
  - ``adamw`` (default) for every group; ``lars`` is MAE's linear probe (``main_linprobe.py``): LARS
    (timm's, momentum 0.9, trust 0.001) on the weights, the trust ratio and weight decay on matrices only
    as MAE's ``util/lars.py``, while lambda -- which the official probe leaves out of its optimizer -- takes
    AdamW at ``optim.lambda_lr`` (LARS's lr, 6.4 at MAE's batch 16384, would throw a scale that starts at 0
    anywhere).
* The fix setting (``pathway.freeze_target``, paper Table 1 "fix acc") trains the classifier and lambda and
  nothing else, with or without a pathway: :func:`freeze_all_but_head_and_lambdas`.
* the loss of each task: cross-entropy (hard, label-smoothed, or soft targets after Mixup/CutMix),
  BCE-with-logits for multi-label, per-point cross-entropy for part segmentation.
* timm ``Mixup`` for classification. Options that do not fit the task are refused
  (:func:`pathway.train.config.check_task_options`); multi-label mixup is AudioMAE's, in the audio adapter
  (``data.options.mixup``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pathway.errors import OptionError

from .config import Recipe, check_task_options
from .schedule import scaled_lr

__all__ = ["adamw", "base_lr", "build_optimizer", "build_mixup", "compute_loss",
           "freeze_all_but_head_and_lambdas", "lambda_layer_groups", "LarsWithAdamW", "OPTIMIZERS"]

OPTIMIZERS = ("adamw", "lars")


def base_lr(recipe: Recipe, effective_batch: int) -> float:
    """``optim.lr`` when set, else MAE's ``blr * effective_batch / 256``."""
    o = recipe.optim
    return o.lr if o.lr is not None else scaled_lr(o.blr, effective_batch)


def freeze_all_but_head_and_lambdas(model: nn.Module) -> list[str]:
    """The fix setting: ``requires_grad`` only for ``model.head`` and the lambdas; returns the names that train.

    Everything else -- tokenizer, blocks, final norm, aux weights -- is frozen, in the baseline too (no
    pathway: only the head trains, MAE's linear probe)."""
    import pathway

    model = getattr(model, "_orig_mod", model)
    head = getattr(model, "head", None)
    if head is None:
        raise OptionError(f"pathway.freeze_target: {type(model).__name__} has no `head` module to train")
    keep = {id(p) for p in head.parameters()} | {id(p) for p in pathway.lambdas(model).values()}
    trained = []
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) in keep)
        if id(p) in keep:
            trained.append(name)
    return trained


def lambda_layer_groups(model: nn.Module, groups: list[dict[str, Any]], layer_decay: float) -> list[dict[str, Any]]:
    """``groups`` with the lambda group split by layer: block i's lambdas get block i's lr scale
    ``layer_decay ** (n_layers - (i + 1))`` (times the lambda group's own scale), as the official code; lambdas
    outside the body take the layer of their place, as ``pathway.param_groups`` numbers the other weights
    (before the body 0, after it the last)."""
    from pathway.modules import block_of, find_blocks

    model = getattr(model, "_orig_mod", model)
    blocks = find_blocks(model)
    n_layers = len(blocks) + 1
    layer_of: dict[int, int] = {}
    body_started = False
    for raw, p in model.named_parameters():
        block = block_of(raw, blocks)
        body_started = body_started or block is not None
        layer_of[id(p)] = block + 1 if block is not None else (n_layers if body_started else 0)
    out: list[dict[str, Any]] = []
    for g in groups:
        if g["name"] != "lambda":
            out.append(g)
            continue
        by_layer: dict[int, dict[str, Any]] = {}
        for p in g["params"]:
            layer = layer_of[id(p)]
            if layer not in by_layer:
                decay = layer_decay ** (n_layers - layer)
                by_layer[layer] = {**g, "name": f"lambda_layer{layer}", "params": [], "lr_scale": g["lr_scale"] * decay,
                                   "lr": g["lr"] * decay}
            by_layer[layer]["params"].append(p)
        out += [by_layer[k] for k in sorted(by_layer)]
    return out


class LarsWithAdamW:
    """MAE's linear-probe LARS on the weight groups and AdamW on the lambda groups, stepped as one optimizer.

    ``param_groups`` is the two optimizers' groups together (the same dicts), so ``schedule.apply_lr``,
    gradient clipping and ``GradScaler`` see every group; ``state_dict`` holds both.
    """

    def __init__(self, lars_groups: list[dict[str, Any]], adamw_groups: list[dict[str, Any]], lr: float,
                 betas: tuple[float, float], eps: float) -> None:
        from timm.optim import Lars

        self.lars = Lars(lars_groups, lr=lr, momentum=0.9, trust_coeff=0.001) if lars_groups else None
        self.adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps) if adamw_groups else None
        self.optimizers = [o for o in (self.lars, self.adamw) if o is not None]
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {k: v for o in self.optimizers for k, v in o.state.items()}

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"lars": self.lars.state_dict() if self.lars else None,
                "adamw": self.adamw.state_dict() if self.adamw else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, o in (("lars", self.lars), ("adamw", self.adamw)):
            if o is not None:
                o.load_state_dict(state[key])


def build_optimizer(model: nn.Module, recipe: Recipe, lr: float, log=print, *, kind: str | None = None,
                    lambda_layer_decay: bool | None = None):
    """The optimizer over the pathway-aware groups; prints their sizes as nanoGPT's ``configure_optimizers``.

    Args:
        kind: ``"adamw"`` or ``"lars"``; None reads ``optim.optimizer`` (default ``adamw``).
        lambda_layer_decay: lambdas take their block's layer-decay scale; None reads
            ``optim.lambda_layer_decay`` (default True, the official code).

    With ``pathway.freeze_target`` (the fix setting) only the head and the lambdas are left trainable first.
    """
    import pathway

    o = recipe.optim
    kind = kind or getattr(o, "optimizer", "adamw")
    if kind not in OPTIMIZERS:
        raise OptionError(f"optim.optimizer={kind!r} is not one of {list(OPTIMIZERS)}")
    if lambda_layer_decay is None:
        lambda_layer_decay = getattr(o, "lambda_layer_decay", True)
    if recipe.pathway.get("freeze_target", False):
        if recipe.aux.enabled and recipe.pathway.get("train_aux", True):
            raise OptionError("pathway.freeze_target (the fix setting) trains only the classifier and lambda, but "
                              "pathway.train_aux is true; set pathway.train_aux: false")
        freeze_all_but_head_and_lambdas(model)
    groups = pathway.param_groups(model, lr, o.weight_decay, lambda_lr=o.lambda_lr, layer_decay=o.layer_decay)
    if o.layer_decay is not None and lambda_layer_decay:
        groups = lambda_layer_groups(model, groups, o.layer_decay)
    groups = [g for g in groups if any(p.requires_grad for p in g["params"])]
    for g in groups:
        g["params"] = [p for p in g["params"] if p.requires_grad]
        n = sum(p.numel() for p in g["params"])
        log(f"  group {g['name']:<28} tensors {len(g['params']):>4}  params {n:>11,}  "
            f"wd {g['weight_decay']:<6g} lr_scale {g['lr_scale']:.4g}")
    if kind == "lars":
        return build_lars(groups, recipe, lr)
    return adamw(groups, recipe, lr)


def adamw(groups: list[dict[str, Any]], recipe: Recipe, lr: float) -> torch.optim.AdamW:
    """AdamW with the recipe's betas and eps, fused where every parameter is on one CPU or CUDA device: about
    10x faster than the per-tensor loop on the CPU at 10M parameters (the default fuses on neither)."""
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = len(devices) == 1 and devices <= {"cpu", "cuda"}
    o = recipe.optim
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas), eps=o.eps, fused=fused or None)


def build_lars(groups: list[dict[str, Any]], recipe: Recipe, lr: float) -> LarsWithAdamW:
    """LARS as MAE's probe for the weights (trust ratio and decay on matrices only), AdamW for the lambdas."""
    o = recipe.optim
    lambdas = [g for g in groups if g["name"].startswith("lambda")]
    if lambdas and o.lambda_lr is None:
        raise OptionError(
            f"optim.optimizer=lars trains lambda with AdamW at optim.lambda_lr, which is not set (LARS's lr {lr:.3g} "
            f"would be used); set optim.lambda_lr, e.g. 1.0e-3")
    weights = [g for g in groups if not g["name"].startswith("lambda")]
    for g in weights:
        g["always_adapt"] = g["name"].startswith("decay")  # MAE: p.ndim > 1 adapts, biases and norms do not
    return LarsWithAdamW(weights, lambdas, lr, tuple(o.betas), o.eps)


def build_mixup(recipe: Recipe, num_classes: int, task: str):
    """timm Mixup/CutMix (which also applies label smoothing) for classification, or None when off.

    Options that do not fit ``task`` raise :class:`OptionError` (:func:`pathway.train.config.check_task_options`)."""
    check_task_options(recipe, task)
    t = recipe.train
    if task != "classification" or (t.mixup <= 0 and t.cutmix <= 0):
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=t.mixup, cutmix_alpha=t.cutmix, prob=t.mixup_prob, switch_prob=t.mixup_switch_prob,
        label_smoothing=t.label_smoothing, num_classes=num_classes,
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
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.reshape(-1).long(), label_smoothing=label_smoothing
        )
    raise OptionError(f"unknown task {task!r}; allowed: 'classification', 'multilabel', 'segmentation'")
