"""Video tubelets: ``[B, C, T, H, W] -> tokens [B, (T/t)*(H/p)*(W/p), D]``, weight-compatible with VideoMAE.

``proj`` is VideoMAE's Conv3d ``[D, 3, 2, 16, 16]`` (tubelet 2, patch 16; 16 frames at 224^2 give
8*14*14 = 1568 tokens). The default position embedding is VideoMAE's fixed sinusoid table over the
flattened token index (``get_sinusoid_encoding_table``), recomputed when the clip size changes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .patch import PatchTokenizer
from .pos_embed import sinusoid_table


class VideoTubeletTokenizer(PatchTokenizer):
    """VideoMAE patch embedding (default ViT-B: 16 frames, 224^2, tubelet 2 x 16 x 16, width 768)."""

    def __init__(
        self,
        num_frames: int = 16,
        img_size: int = 224,
        tubelet_size: int = 2,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        pos_embed: str = "sincos",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            (num_frames, img_size, img_size), (tubelet_size, patch_size, patch_size), in_chans, embed_dim,
            pos_embed=pos_embed, device=device, dtype=dtype,
        )

    def fixed_table(self, grid: Sequence[int]) -> Tensor:
        return sinusoid_table(math.prod(grid), self.embed_dim)
