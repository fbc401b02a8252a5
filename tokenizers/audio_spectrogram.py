"""Audio spectrogram patches: log-mel ``[B, 1, frames, mel]`` (or ``[B, frames, mel]``) -> tokens, AudioMAE layout.

AudioMAE cuts a 1024-frame x 128-bin Kaldi fbank into 16x16 patches (a 64 x 8 grid, 512 tokens) with a
one-channel Conv2d ``proj`` and adds MAE's fixed 2-D sin-cos table over that grid.
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
    ) -> None:
        super().__init__(
            (num_frames, num_mel_bins), (patch_size, patch_size), 1, embed_dim, pos_embed=pos_embed, device=device, dtype=dtype
        )

    def encode(self, x: Tensor) -> TokenizerOutput:
        return super().encode(x.unsqueeze(1) if x.ndim == 3 else x)  # [B, T, F] -> [B, 1, T, F]
