"""``fold``: merge ``W + sum(lambda_i * W_aux_i)`` into ``W`` and remove every pathway tensor.

The merge runs in fp32 (fp64 for fp64 weights) and is cast back (PEFT saw merge drift in bf16), and it is
written into the original ``nn.Parameter`` object, so the model is the user's own class again with the original
``state_dict`` keys in their original order, optimizers holding that parameter stay valid, and
``requires_grad`` is what it was before ``connect``.

The parametrization is taken off by hand rather than with ``remove_parametrizations``: that
function deletes the property from the injected ``Parametrized*`` class, and ``copy.deepcopy``
(EMA copies, for one) shares that class between the copies, so it would break the other copy.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .errors import NonFiniteError, NotConnectedError, PathwayError
from .layer import PathwayWeight
from .modules import pathway_sites, plain_parameters


def fold(model: nn.Module) -> nn.Module:
    """Merge every pathway into its target weight, in place; returns ``model``.

    Raises:
        NotConnectedError: ``model`` carries no pathway.
        PathwayError: a module also carries parametrizations that are not pathways (e.g. weight
            norm); fold cannot know how to merge those.
        NonFiniteError: a merged weight would hold NaN or inf; the model is left connected.
    """
    sites = list(pathway_sites(model))
    if not sites:
        raise NotConnectedError(f"{type(model).__name__} is not connected (pathway.is_connected(model) is False): "
                                f"there is nothing to fold")
    for name, module, _, _ in sites:
        others = [type(p).__name__ for plist in module.parametrizations.values() for p in plist
                  if not isinstance(p, PathwayWeight)]
        if others:
            raise PathwayError(f"'{name}': its module also carries parametrizations that are not pathways "
                               f"({', '.join(others)}); remove them before fold")
    merged: dict[int, tuple[nn.Parameter, torch.Tensor, bool]] = {}
    with torch.no_grad():
        for _, module, tensor_name, pathways in sites:
            original = module.parametrizations[tensor_name].original
            if id(original) not in merged:
                # at least fp32: bf16/fp16 weights merge without drift, fp64 ones keep their precision
                dtype = torch.promote_types(original.dtype, torch.float32)
                total = original.to(dtype) + sum(p.delta(dtype) for p in pathways)
                merged[id(original)] = (original, total.to(original.dtype), pathways[0].target_requires_grad)
        _check_finite(model, merged)
        for module in {id(m): m for _, m, _, _ in sites}.values():
            originals = {n: plist.original for n, plist in module.parametrizations.items()}
            module.__class__ = parametrize.type_before_parametrizations(module)
            del module.parametrizations
            _restore_first(module, originals)
        for original, value, requires_grad in merged.values():
            original.copy_(value)
            original.requires_grad_(requires_grad)
    return model


def _check_finite(model: nn.Module, merged: dict[int, tuple[nn.Parameter, torch.Tensor, bool]]) -> None:
    """Refuse to write NaN or inf into the user's weights (a diverged run); nothing is changed then."""
    names = {id(p): n for n, p in plain_parameters(model).items()}
    bad = [f"{names.get(key, '?')} ({int((~torch.isfinite(value)).sum())} of {value.numel()})"
           for key, (_, value, _) in merged.items() if not torch.isfinite(value).all()]
    if bad:
        raise NonFiniteError(f"fold would write non-finite values (NaN or inf) into {len(bad)} weight(s): "
                             f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}. The run diverged (lower the "
                             f"learning rate, check the loss) or an aux tensor is broken: fold a checkpoint from "
                             f"before it; the model is left connected")


def _restore_first(module: nn.Module, originals: dict[str, nn.Parameter]) -> None:
    """Register the merged weights again *before* the module's other parameters.

    ``register_parametrization`` removed them from ``_parameters``, so registering them plainly
    would move each weight after its bias in ``named_parameters()`` and ``state_dict()``, and an
    optimizer state saved by position would no longer line up with a fresh model. Every layer
    pathway pairs (``nn.Linear``, the convolutions, ``nn.Embedding``, GPT-2's ``Conv1D``, MHA's
    ``in_proj_weight``) registers its weights first.
    """
    rest = dict(module._parameters)
    module._parameters.clear()
    for tensor_name, original in originals.items():
        module.register_parameter(tensor_name, original)
    module._parameters.update(rest)
