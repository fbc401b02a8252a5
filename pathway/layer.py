"""The pathway parametrization: ``W_eff = W + lambda * W_aux`` for one weight.

It is registered with ``torch.nn.utils.parametrize`` on the user's own module, so the module keeps
its class, its methods and its forward; every read of ``module.weight`` (its own forward,
``F.linear(x, self.qkv.weight)``, ``nn.MultiheadAttention``'s ``in_proj_weight``) sees the
effective weight. Connecting again stacks another ``PathwayWeight`` on the same weight:
``W + l1 * W1 + l2 * W2``.

``aux_weight`` is stored already in the target's storage layout (transposed for GPT-2
``Conv1D``, q/k/v concatenated or split as the pair requires), so the forward is one multiply-add.

Saving. A connected module's ``state_dict()`` holds ``<module>.parametrizations.<name>.original``
and each pathway's ``aux_weight`` and ``scale``, which load exactly into a connected copy; beside
them it holds the effective weight under the plain key ``<module>.<name>``, so whatever saves a
state dict (``save_pretrained``, the Trainer, ``torch.save(model.state_dict())``) writes a file that a
plain model (``from_pretrained``, ``load_state_dict(strict=False)``) loads to the connected model's
outputs. A connected model's own ``load_state_dict`` takes the plain key as that copy and ignores it.
Pickling the whole module (``torch.save(model)``) is refused by name: its classes are made at run time.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .errors import PathwayError

_PATHWAY_PREFIX = re.compile(r"^(?P<owner>(?:.*\.)?)parametrizations\.(?P<tensor>[^.]+)\.(?P<index>\d+)\.$")


class PathwayWeight(nn.Module):
    """One pathway into one target weight.

    Args:
        aux_weight: the aux tensor, already in the target weight's storage layout and dtype.
        scale_shape: ``()`` for one lambda per layer (the paper), or a shape that broadcasts over
            the output channels for one lambda per channel.
        lambda_init: initial lambda; 0 makes the connected model start exactly as the target.
        train_aux: whether ``aux_weight`` is trained (the official code trains it).
        train_lambda: whether lambda is trained (the paper's ablation fixes it).
        source: aux weight names the tensor was built from, kept for reports and checkpoints.
        transform: how the aux tensor was built (``identity``, ``transpose``, ``concat_out[q,k,v]``...).
        target_requires_grad: the target weight's ``requires_grad`` before connect, restored by fold.
    """

    def __init__(self, aux_weight: torch.Tensor, scale_shape: tuple[int, ...] = (), lambda_init: float = 0.0,
                 train_aux: bool = True, train_lambda: bool = True, source: str = "", transform: str = "identity",
                 target_requires_grad: bool = True):
        super().__init__()
        self.aux_weight = nn.Parameter(aux_weight.detach().clone(), requires_grad=train_aux)
        # lambda stays fp32 whatever the weights' dtype: it is one number whose small updates matter.
        self.scale = nn.Parameter(torch.full(scale_shape, float(lambda_init), device=aux_weight.device,
                                             dtype=torch.float32), requires_grad=train_lambda)
        self.source = source
        self.transform = transform
        self.target_requires_grad = target_requires_grad
        self.register_state_dict_post_hook(_write_effective)
        self.register_load_state_dict_pre_hook(_skip_effective)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return AddScaled.apply(weight, self.scale, self.aux_weight)

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``lambda * W_aux`` in ``dtype``, what fold adds to the target weight.

        lambda is first rounded to the weights' dtype, as the forward rounds it, so that a bf16 model
        folds to exactly what it computed in training.
        """
        return self.scale.to(self.aux_weight.dtype).to(dtype) * self.aux_weight.to(dtype)

    def extra_repr(self) -> str:
        shape = "scalar" if self.scale.dim() == 0 else f"per-channel {tuple(self.scale.shape)}"
        return f"aux={tuple(self.aux_weight.shape)} from {self.source} ({self.transform}), lambda {shape}"


class AddScaled(torch.autograd.Function):
    """``weight + scale * aux`` (scale fp32, rounded to the weights' dtype as the forward uses it).

    The backward keeps nothing beyond the inputs themselves and computes lambda's gradient as one
    reduction, ``sum(grad * aux)`` over the dimensions lambda is broadcast along (a dot product for a
    scalar lambda), instead of forming ``grad * aux`` in full and then summing it.
    """

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, scale: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scale, aux)
        return torch.addcmul(weight, scale.to(weight.dtype), aux)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        scale, aux = ctx.saved_tensors
        need_weight, need_scale, need_aux = ctx.needs_input_grad
        grad_scale = grad_aux = None
        if need_scale:
            grad_scale = _reduce_to(grad, aux, scale.shape).to(scale.dtype)
        if need_aux:
            grad_aux = grad * scale.to(grad.dtype)
        return (grad if need_weight else None), grad_scale, grad_aux


def _reduce_to(grad: torch.Tensor, aux: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``(grad * aux).sum_to_size(shape)`` without the full-size product: a dot or a batched dot."""
    aux = aux.to(grad.dtype)
    if len(shape) == 0:
        return torch.dot(grad.reshape(-1), aux.reshape(-1))
    if shape[0] == grad.shape[0] and all(s == 1 for s in shape[1:]):   # per output channel: [out, 1, ...]
        rows = grad.shape[0]
        return torch.bmm(grad.reshape(rows, 1, -1), aux.reshape(rows, -1, 1)).reshape(shape)
    return (grad * aux).sum_to_size(shape)   # per channel of a transposed weight: [1, in]


def _write_effective(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """Put ``W + sum(lambda_i * W_aux_i)`` beside the connected state, under the weight's plain key.

    Each pathway of a weight writes the sum over itself and the pathways before it, so the last one
    leaves the whole sum, computed as the forward computes it. A weight that also carries another
    parametrization (weight norm) gets no plain key: its effective weight is not this sum.
    """
    found = _PATHWAY_PREFIX.match(prefix)
    if found is None:
        return
    base = f"{found['owner']}parametrizations.{found['tensor']}."
    keys = [base + "original"] + [f"{base}{j}.{n}" for j in range(int(found["index"]) + 1)
                                  for n in ("scale", "aux_weight")]
    if not all(k in state_dict for k in keys):
        return
    with torch.no_grad():
        value = state_dict[keys[0]].detach()
        for j in range(int(found["index"]) + 1):
            scale, aux = state_dict[f"{base}{j}.scale"].detach(), state_dict[f"{base}{j}.aux_weight"].detach()
            value = torch.addcmul(value, scale.to(value.dtype), aux)
    state_dict[found["owner"] + found["tensor"]] = value


def _skip_effective(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
                    missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
    """Loading into a connected model: the plain key is the copy :func:`_write_effective` made; drop it.

    Only when the connected state itself was given (the weight's ``original`` is not missing): a plain
    state dict loaded into a connected model is still reported.
    """
    found = _PATHWAY_PREFIX.match(prefix)
    if found is None:
        return
    plain = found["owner"] + found["tensor"]
    original = f"{found['owner']}parametrizations.{found['tensor']}.original"
    if plain in unexpected_keys and original not in missing_keys:
        unexpected_keys.remove(plain)


class PicklingError(PathwayError):
    """``torch.save(model)`` / ``pickle`` of a connected model (its classes are made at run time)."""


def _refuse_pickling(self: nn.Module) -> Any:
    raise PicklingError(f"a connected model cannot be pickled whole (torch.save(model), pickle, spawn): its "
                        f"{type(self).__name__} modules carry pathways. pathway.fold(model) first gives the plain "
                        f"model (then torch.save works); to keep the pathways save model.state_dict() or "
                        f"pathway.save(model, path)")


def attach_pathway(owner: nn.Module, tensor_name: str, pathway: PathwayWeight) -> None:
    """Register ``pathway`` on ``owner.<tensor_name>``; the module then refuses pickling by name."""
    parametrize.register_parametrization(owner, tensor_name, pathway)
    type(owner).__getstate__ = _refuse_pickling
