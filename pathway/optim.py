"""Optimizer parameter groups that keep the pathway open.

lambda gets its own group without weight decay: under AdamW decay at lr 5e-4 a probe left lambda
at about 0.002 after 30 epochs, i.e. the pathway never opened. The groups are found by identity
(the ``PathwayWeight.scale`` tensors), not by an ``ndim`` rule: MAE's ``p.ndim == 1`` rule decays
a 0-d lambda. Layer-wise lr decay follows MAE/BEiT: parameters before the body are layer 0,
block i is layer i + 1, everything after is the last layer; the lr scale is
``layer_decay ** (n_layers - layer)``. lambda itself is new (initialised at 0, nothing to
preserve), so it takes no layer decay.
"""

from __future__ import annotations

import math
from typing import Any

import torch.nn as nn

from .errors import OptionError
from .modules import block_of, find_blocks, pathway_sites, plain_name


def param_groups(model: nn.Module, lr: float, weight_decay: float, *, lambda_lr: float | None = None,
                 layer_decay: float | None = None) -> list[dict[str, Any]]:
    """Parameter groups for ``torch.optim.AdamW`` (or any optimizer taking groups).

    Args:
        model: a connected or plain model; parameters with ``requires_grad=False`` are left out
            (frozen aux weights get no optimizer state).
        lr: base learning rate.
        weight_decay: decay for matrices (target and aux weights); 1-D parameters, biases and the
            model's ``no_weight_decay()`` names get none.
        lambda_lr: learning rate of lambda (default ``lr``).
        layer_decay: layer-wise lr decay factor (e.g. 0.65 for ViT-B fine-tuning), or None.

    Returns:
        Groups with ``params``, ``lr``, ``weight_decay``, ``lr_scale`` (a scheduler sets
        ``lr = base_lr_now * lr_scale``) and ``name``.

    Raises:
        OptionError: a rate that is not a finite number >= 0 (``layer_decay`` > 0).
    """
    _check_rates(lr=lr, weight_decay=weight_decay, lambda_lr=lambda_lr, layer_decay=layer_decay)
    model = getattr(model, "_orig_mod", model)   # torch.compile wrapper
    scales = {id(p.scale) for *_, pathways in pathway_sites(model) for p in pathways}
    blocks = find_blocks(model)
    n_layers = len(blocks) + 1
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[str, int], dict[str, Any]] = {}
    body_started = False
    for raw, p in model.named_parameters():
        block = block_of(raw, blocks)
        body_started = body_started or block is not None
        if not p.requires_grad:
            continue
        layer = block + 1 if block is not None else (n_layers if body_started else 0)
        if id(p) in scales:
            kind, decay, scale = "lambda", 0.0, (lambda_lr / lr if lambda_lr is not None else 1.0)
            layer = -1
        else:
            name = plain_name(raw) or raw
            no_decay = p.ndim <= 1 or name.endswith(".bias") or name in skip
            kind, decay = ("no_decay", 0.0) if no_decay else ("decay", weight_decay)
            scale = layer_decay ** (n_layers - layer) if layer_decay is not None else 1.0
            layer = layer if layer_decay is not None else 0
        key = (kind, layer)
        if key not in groups:
            suffix = f"_layer{layer}" if layer_decay is not None and kind != "lambda" else ""
            groups[key] = {"name": kind + suffix, "params": [], "weight_decay": decay, "lr_scale": scale,
                           "lr": lr * scale}
        groups[key]["params"].append(p)
    return list(groups.values())


def _check_rates(**rates: float | None) -> None:
    """Every rate a finite number, none negative, layer_decay above 0 (lambda_lr and layer_decay may be None)."""
    for key, value in rates.items():
        if value is None and key in ("lambda_lr", "layer_decay"):
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value < 0 or (value == 0 and key == "layer_decay"):
            raise OptionError(f"param_groups: {key}={value!r} must be a finite number "
                              f"{'> 0' if key == 'layer_decay' else '>= 0'}")
