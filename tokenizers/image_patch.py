"""Image patches: ``[B, C, H, W] -> tokens [B, (H/p)*(W/p), D]``, weight-compatible with timm's ViT ``patch_embed``.

``proj`` has the shape of timm ``patch_embed.proj`` and ``pos_embed`` the shape of timm's ``pos_embed[:, 1:]``
(patch tokens only, the cls position belongs to the model's ``cls_token``), so a timm / MAE ViT
checkpoint loads by renaming. Other image sizes at run time interpolate the learned embedding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .patch import PatchTokenizer


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class ImagePatchTokenizer(PatchTokenizer):
    """ViT patch embedding (default ViT-B/16 at 224^2: 196 tokens of width 768)."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        pos_embed: str = "learn",
        norm_layer: Callable[[int], nn.Module] | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            _pair(img_size), _pair(patch_size), in_chans, embed_dim, pos_embed, norm_layer, bias, device, dtype
        )
