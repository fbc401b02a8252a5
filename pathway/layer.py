"""The pathway parametrization: ``W_eff = W + lambda * W_aux`` for one weight.

It is registered with ``torch.nn.utils.parametrize`` on the user's own module, so the module keeps
its class, its methods and its forward; every read of ``module.weight`` (its own forward,
``F.linear(x, self.qkv.weight)``, ``nn.MultiheadAttention``'s ``in_proj_weight``) sees the
effective weight. Connecting again stacks another ``PathwayWeight`` on the same weight:
``W + l1 * W1 + l2 * W2``.

``aux_weight`` is stored already in the target's storage layout (transposed for GPT-2
``Conv1D``, q/k/v concatenated or split as the pair requires), so the forward is one multiply-add.
"""

from __future__ import annotations

import torch
import torch.nn as nn


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

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # one fused op: weight + scale * aux_weight
        return torch.addcmul(weight, self.scale.to(weight.dtype), self.aux_weight)

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``lambda * W_aux`` in ``dtype``, what fold adds to the target weight.

        lambda is first rounded to the weights' dtype, as the forward rounds it, so that a bf16 model
        folds to exactly what it computed in training.
        """
        return self.scale.to(self.aux_weight.dtype).to(dtype) * self.aux_weight.to(dtype)

    def extra_repr(self) -> str:
        shape = "scalar" if self.scale.dim() == 0 else f"per-channel {tuple(self.scale.shape)}"
        return f"aux={tuple(self.aux_weight.shape)} from {self.source} ({self.transform}), lambda {shape}"
