"""Audio spectrogram patches: log-mel ``[B, 1, frames, mel]`` (or ``[B, frames, mel]``) -> tokens, AudioMAE layout.

AudioMAE cuts a 1024-frame x 128-bin Kaldi fbank into 16x16 patches (a 64 x 8 grid, 512 tokens) with a
one-channel Conv2d ``proj`` and adds MAE's fixed 2-D sin-cos table over that grid.

Fine-tuning masking (AudioMAE ``models_vit.py``, ``random_masking_2d``; ``ft_as.sh`` uses 0.2 and 0.2): in
training mode, ``mask_t_prob`` of the grid's time rows and ``mask_f_prob`` of its frequency columns are
dropped from the tokens, drawn per clip, after the position embedding is added; the blocks see
``int(T * (1 - mask_t_prob)) * int(F * (1 - mask_f_prob))`` tokens. Evaluation keeps every token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import TokenizerOutput
from .patch import PatchTokenizer


class AudioSpectrogramTokenizer(PatchTokenizer):
    """AudioMAE patch embedding (default 1024 frames x 128 mel bins, 16x16 patches, width 768)."""

    def __init__(
        self,
        num_frames: int = 1024,
        num_mel_bins: int = 128,
        patch_size: int = 16,
        embed_dim: int = 768,
        pos_embed: str = "sincos",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        mask_t_prob: float = 0.0,
        mask_f_prob: float = 0.0,
    ) -> None:
        super().__init__(
            (num_frames, num_mel_bins), (patch_size, patch_size), 1, embed_dim,
            pos_embed=pos_embed, device=device, dtype=dtype,
        )
        self.mask_t_prob, self.mask_f_prob = mask_t_prob, mask_f_prob

    def encode(self, x: Tensor) -> TokenizerOutput:
        out = super().encode(x.unsqueeze(1) if x.ndim == 3 else x)  # [B, T, F] -> [B, 1, T, F]
        if self.training and (self.mask_t_prob > 0 or self.mask_f_prob > 0):
            out.tokens = drop_time_freq(out.tokens, out.extras["grid"], self.mask_t_prob, self.mask_f_prob)
        return out

    def reconstruction_targets(self, x: Tensor, out: TokenizerOutput) -> Tensor:
        return super().reconstruction_targets(x.unsqueeze(1) if x.ndim == 3 else x, out)


def drop_time_freq(tokens: Tensor, grid: tuple[int, int], mask_t_prob: float, mask_f_prob: float) -> Tensor:
    """``[B, T*F, D]`` (row-major over the ``(T, F)`` grid) -> ``[B, T'*F', D]``: per row, a random subset of
    ``T' = int(T * (1 - mask_t_prob))`` time rows, then of ``F' = int(F * (1 - mask_f_prob))`` frequency
    columns, each kept in random order as AudioMAE's ``random_masking_2d`` (argsort of uniform noise)."""
    b, _, d = tokens.shape
    t, f = grid
    keep_t, keep_f = int(t * (1 - mask_t_prob)), int(f * (1 - mask_f_prob))
    x = tokens.reshape(b, t, f, d)
    rows = torch.rand(b, t, device=tokens.device).argsort(dim=1)[:, :keep_t]
    x = x.gather(1, rows[:, :, None, None].expand(b, keep_t, f, d))
    cols = torch.rand(b, f, device=tokens.device).argsort(dim=1)[:, :keep_f]
    x = x.gather(2, cols[:, None, :, None].expand(b, keep_t, keep_f, d))
    return x.reshape(b, keep_t * keep_f, d)
