"""The tokenizer contract: a modality tensor in, tokens with their position embedding out.

Every modality's tokenizer is an ``nn.Module`` subclass of :class:`Tokenizer`. The transformer blocks
only ever see ``tokens [B, N, D]``; MAE pretraining also needs what was added as position
(decoders reuse it) and what each token should reconstruct, so :meth:`Tokenizer.encode` returns all
of it in one :class:`TokenizerOutput` (docs/contracts.md, section 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from pathway.errors import PathwayError


class TokenizerInputError(PathwayError):
    """An input, grid or table the tokenizer cannot take (wrong rank, channels, size); the message says the fix."""


@dataclass
class TokenizerOutput:
    """What a tokenizer produces for one batch.

    Attributes:
        tokens: ``[B, N, D]``, position embedding already added.
        pos: ``[B or 1, N, D]``, the position embedding that was added (MAE decoders reuse it).
        extras: modality-specific tensors, e.g. ``{"centers": [B, G, 3], "neighbours": [B, G, K]}``.
    """

    tokens: Tensor
    pos: Tensor
    extras: dict[str, Any] = field(default_factory=dict)


class Tokenizer(nn.Module):
    """Base class of every tokenizer: subclasses set ``embed_dim``, ``reconstruction_loss`` and implement ``encode``."""

    embed_dim: int
    reconstruction_loss: str  # "mse" (patches) or "chamfer" (point groups); read by MAE pretraining

    def encode(self, x: Tensor) -> TokenizerOutput:
        raise NotImplementedError(f"{type(self).__name__} must implement encode(x) -> TokenizerOutput")

    def reconstruction_targets(self, x: Tensor, out: TokenizerOutput) -> Tensor:
        """``[B, N, P]``: what MAE reconstructs per token of ``encode(x)`` (patch pixels, group points, ...).

        A method rather than a field of the output, so that fine-tuning, which never reads it, never builds it.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement reconstruction_targets(x, out) for MAE")

    def forward(self, x: Tensor) -> Tensor:
        """Tokens ``[B, N, D]`` with the position embedding added."""
        return self.encode(x).tokens
