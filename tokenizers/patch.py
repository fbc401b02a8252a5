"""A patch tokenizer over any 1-, 2- or 3-D grid: the one piece behind image, audio, video and time-series tokens.

``x [B, C, *size]`` is cut into non-overlapping patches by a strided convolution ``proj`` (Conv1d, Conv2d or
Conv3d, named as timm's ``patch_embed.proj``, AudioMAE's and VideoMAE's ``proj`` so checkpoints load by
renaming), flattened row-major into ``tokens [B, N, D]`` and offset by a position embedding ``pos_embed
[1, N, D]`` (learned, or a fixed sin-cos table). MAE's reconstruction target is the raw patch,
:func:`patchify`: ``[B, N, prod(patch) * C]`` ordered (patch positions..., channel) as MAE's ``patchify``.

A different input size at run time is allowed as long as it is a multiple of the patch size: a fixed table
is recomputed for the new grid, a learned one is interpolated (:func:`resample_pos_embed`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from pathway.errors import OptionError

from .base import Tokenizer, TokenizerInputError, TokenizerOutput
from .pos_embed import resample_pos_embed, sincos_pos_embed

_CONVS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
POS_EMBED_KINDS = ("learn", "sincos")


def patchify(x: Tensor, patch_size: Sequence[int]) -> Tensor:
    """``[B, C, *size] -> [B, N, prod(patch_size) * C]``, one row per patch (MAE's ``patchify``, any rank)."""
    b, c, *size = x.shape
    nd = len(size)
    grid = [s // p for s, p in zip(size, patch_size)]
    shape = [b, c]
    for g, p in zip(grid, patch_size):
        shape += [g, p]
    x = x.reshape(shape)  # [B, C, g0, p0, g1, p1, ...]
    order = [0] + [2 + 2 * i for i in range(nd)] + [3 + 2 * i for i in range(nd)] + [1]
    return x.permute(order).reshape(b, math.prod(grid), -1)  # [B, g0*g1*..., p0*p1*...*C]


class PatchTokenizer(Tokenizer):
    """Strided-conv patch embedding with a position embedding, for inputs ``[B, C, *input_size]``.

    Args:
        input_size: size of the grid the tokenizer is built for, e.g. ``(224, 224)``; fixes ``pos_embed``.
        patch_size: patch extent per axis, e.g. ``(16, 16)`` or VideoMAE's tubelet ``(2, 16, 16)``.
        in_chans: input channels.
        embed_dim: token width ``D``.
        pos_embed: ``"learn"`` (trainable, timm ViT) or ``"sincos"`` (fixed, MAE / AudioMAE / VideoMAE).
        norm_layer: optional norm applied to the tokens before the position embedding (timm's ``norm``).
        bias: bias of ``proj``.
    """

    reconstruction_loss = "mse"

    def __init__(
        self,
        input_size: Sequence[int],
        patch_size: Sequence[int],
        in_chans: int,
        embed_dim: int,
        pos_embed: str = "learn",
        norm_layer: Callable[[int], nn.Module] | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.input_size = tuple(int(s) for s in input_size)
        self.patch_size = tuple(int(p) for p in patch_size)
        nd = len(self.input_size)
        if nd not in _CONVS or len(self.patch_size) != nd:
            raise OptionError(
                f"input_size {self.input_size} and patch_size {self.patch_size} must both have 1, 2 or 3 entries"
            )
        if min(self.patch_size) < 1 or min(self.input_size) < 1:
            raise OptionError(
                f"{type(self).__name__}: input_size {self.input_size} and patch_size {self.patch_size} must be "
                f"whole numbers >= 1 along every axis"
            )
        self._check_multiple(self.input_size, "input_size")
        if pos_embed not in POS_EMBED_KINDS:
            raise OptionError(f"pos_embed={pos_embed!r} is not one of {POS_EMBED_KINDS}")
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.pos_embed_kind = pos_embed
        self.grid = tuple(s // p for s, p in zip(self.input_size, self.patch_size))
        dd = {"device": device, "dtype": dtype}
        self.proj = _CONVS[nd](
            in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias, **dd
        )
        self.norm = norm_layer(embed_dim) if norm_layer is not None else nn.Identity()
        learn = pos_embed == "learn"
        table = torch.zeros(1, math.prod(self.grid), embed_dim, **dd) if learn else self.fixed_table(self.grid).to(**dd)
        # A Parameter even when fixed (requires_grad=False), as MAE: checkpoints carry `pos_embed` either way.
        self.pos_embed = nn.Parameter(table, requires_grad=learn)
        self._init_weights()

    @property
    def num_tokens(self) -> int:
        return self.pos_embed.shape[1]

    def fixed_table(self, grid: Sequence[int]) -> Tensor:
        """The fixed table for ``grid`` (MAE's sin-cos); subclasses with another convention override it."""
        return sincos_pos_embed(grid, self.embed_dim)

    def _init_weights(self) -> None:
        # MAE initialises proj like a Linear (xavier on the flattened kernel), learned pos_embed N(0, .02).
        w = self.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.pos_embed.requires_grad:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def _check_multiple(self, size: Sequence[int], what: str) -> None:
        bad = [(s, p) for s, p in zip(size, self.patch_size) if s % p or s < p]
        if bad:
            raise TokenizerInputError(
                f"{type(self).__name__}: {what} {tuple(size)} is not a multiple of patch_size {self.patch_size}; "
                f"resize, crop or pad the input to a multiple of the patch size"
            )

    def pos_for(self, grid: Sequence[int]) -> Tensor:
        """Position embedding ``[1, N, D]`` for a token grid, recomputed or interpolated if it differs."""
        grid = tuple(grid)
        if grid == self.grid:
            return self.pos_embed
        if self.pos_embed_kind == "sincos":
            return self.fixed_table(grid).to(self.pos_embed)
        return resample_pos_embed(self.pos_embed, self.grid, grid)

    def encode(self, x: Tensor) -> TokenizerOutput:
        nd = len(self.input_size)
        if x.ndim != nd + 2 or x.shape[1] != self.in_chans:
            raise TokenizerInputError(
                f"{type(self).__name__} expects [B, {self.in_chans}, {', '.join(map(str, self.input_size))}] "
                f"(any size that is a multiple of {self.patch_size}), got {tuple(x.shape)}"
            )
        self._check_multiple(x.shape[2:], "input size")
        t = self.proj(x)  # [B, D, *grid]
        grid = tuple(t.shape[2:])
        t = self.norm(t.flatten(2).transpose(1, 2))  # [B, D, *grid] -> [B, N, D]
        pos = self.pos_for(grid).to(t.dtype)
        return TokenizerOutput(tokens=t + pos, pos=pos, extras={"grid": grid})

    def reconstruction_targets(self, x: Tensor, out: TokenizerOutput) -> Tensor:
        """The pixels (or samples) of each patch, ``[B, N, prod(patch) * C]`` (MAE's ``patchify``)."""
        return patchify(x, self.patch_size)
