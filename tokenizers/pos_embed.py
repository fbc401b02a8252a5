"""Position embeddings for tokens laid out on a grid: fixed sin-cos tables and resampling of learned ones.

* :func:`sincos_pos_embed` is MAE's 2-D table (``get_2d_sincos_pos_embed``) generalised to 1-D and 3-D
  grids: the width is split evenly between the axes, the last axis first, as MAE does for ``(w, h)``.
* :func:`sinusoid_table` is the 1-D table over the flattened token index of "Attention is all you need",
  which VideoMAE uses for its tubelets (``get_sinusoid_encoding_table``).
* :func:`resample_pos_embed` interpolates a learned ``[1, N, D]`` embedding when the input grid changes
  (bicubic with antialiasing in 2-D, as timm's ``resample_abs_pos_embed``; linear / trilinear otherwise).

Tables are computed in float64 (as MAE's numpy code) and returned as float32 ``[1, N, D]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pathway.errors import OptionError

from .base import TokenizerInputError

_MODES = {1: "linear", 2: "bicubic", 3: "trilinear"}


def check_grid(grid: Sequence[int], what: str) -> None:
    """A token grid has at least one token along every axis (a size or patch size of 0 gives an empty grid)."""
    if not grid or min(grid) < 1:
        raise TokenizerInputError(f"{what}: token grid {tuple(grid)} has an axis without tokens; the input size "
                                  f"must be at least one patch along every axis")


def sincos_1d(positions: Tensor, dim: int) -> Tensor:
    """MAE's 1-D table: ``[sin(p * w_i), cos(p * w_i)]`` with ``w_i = 10000^(-i / (dim/2))``; ``[n, dim]``."""
    if dim % 2:
        raise OptionError(f"sin-cos position embedding needs an even width, got embed_dim={dim}; pick an even "
                          f"embed_dim or pos_embed='learn'")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64).reshape(-1, 1) * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed(grid: Sequence[int], dim: int) -> Tensor:
    """Fixed sin-cos embedding of a 1-, 2- or 3-D token grid, row-major token order; ``[1, prod(grid), dim]``.

    In 2-D this equals MAE's ``get_2d_sincos_pos_embed`` (first half of the width encodes the column).
    """
    grid = tuple(int(g) for g in grid)
    check_grid(grid, "sin-cos position embedding")
    if dim < 1:
        raise OptionError(f"sin-cos position embedding needs embed_dim >= 1, got {dim}")
    if dim % (2 * len(grid)):
        raise OptionError(
            f"sin-cos position embedding of a {len(grid)}-D grid needs a width divisible by {2 * len(grid)}, "
            f"got embed_dim={dim}; pick another embed_dim or pos_embed='learn'"
        )
    coords = torch.meshgrid(*[torch.arange(g, dtype=torch.float64) for g in grid], indexing="ij")
    parts = [sincos_1d(c.reshape(-1), dim // len(grid)) for c in reversed(coords)]
    return torch.cat(parts, dim=1).float().unsqueeze(0)


def sinusoid_table(num_positions: int, dim: int) -> Tensor:
    """VideoMAE's table over a flattened index: even channels ``sin``, odd channels ``cos``; ``[1, n, dim]``."""
    pos = torch.arange(num_positions, dtype=torch.float64).unsqueeze(1)
    exponent = 2 * torch.div(torch.arange(dim), 2, rounding_mode="floor").to(torch.float64) / dim
    table = pos / 10000**exponent
    table[:, 0::2] = table[:, 0::2].sin()
    table[:, 1::2] = table[:, 1::2].cos()
    return table.float().unsqueeze(0)


def resample_pos_embed(pos: Tensor, old_grid: Sequence[int], new_grid: Sequence[int]) -> Tensor:
    """Interpolate a ``[1, prod(old_grid), D]`` embedding to ``new_grid``; ``[1, prod(new_grid), D]``.

    Used when the input size at run time differs from the size the tokenizer was built for, and by
    checkpoint loaders whose stored grid differs from the model's.
    """
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if pos.shape[1] != math.prod(old_grid):
        raise TokenizerInputError(f"position embedding has {pos.shape[1]} tokens, but the grid {old_grid} has "
                                  f"{math.prod(old_grid)}; the checkpoint's pos_embed was made for another input size")
    if old_grid == new_grid:
        return pos
    check_grid(new_grid, "position embedding resampling")
    dim = pos.shape[-1]
    grid = pos.reshape(1, *old_grid, dim).movedim(-1, 1).float()  # [1, D, *old_grid]
    mode = _MODES[len(old_grid)]
    out = F.interpolate(grid, size=new_grid, mode=mode, antialias=mode == "bicubic", align_corners=False)
    return out.movedim(1, -1).reshape(1, -1, dim).to(pos.dtype)
