"""``fold``: merge ``W + sum(lambda_i * W_aux_i)`` into ``W`` and remove every pathway tensor.

The merge runs in fp32 and is cast back (PEFT saw merge drift in bf16), and it is written into the
original ``nn.Parameter`` object, so the model is the user's own class again with the original
``state_dict`` keys, optimizers holding that parameter stay valid, and ``requires_grad`` is what it
was before ``connect``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .errors import NotConnectedError, PathwayError
from .modules import pathway_sites


def fold(model: nn.Module) -> nn.Module:
    """Merge every pathway into its target weight, in place; returns ``model``.

    Raises:
        NotConnectedError: ``model`` carries no pathway.
        PathwayError: a weight also carries parametrizations that are not pathways (e.g. weight
            norm); fold cannot know how to merge those.
    """
    sites = list(pathway_sites(model))
    if not sites:
        raise NotConnectedError(f"{type(model).__name__} is not connected (pathway.is_connected(model) is False): "
                                f"there is nothing to fold")
    merged: dict[int, tuple[nn.Parameter, torch.Tensor, bool]] = {}
    with torch.no_grad():
        for name, module, tensor_name, pathways in sites:
            plist = module.parametrizations[tensor_name]
            if len(pathways) != len(plist):
                others = [type(p).__name__ for p in plist if p not in pathways]
                raise PathwayError(f"'{name}' also carries parametrizations {others}; remove them before fold")
            original = plist.original
            if id(original) not in merged:
                total = original.float() + sum(p.delta() for p in pathways)
                merged[id(original)] = (original, total.to(original.dtype), pathways[0].target_requires_grad)
        for name, module, tensor_name, _ in sites:
            parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)
        for original, value, requires_grad in merged.values():
            original.copy_(value)
            original.requires_grad_(requires_grad)
    return model
