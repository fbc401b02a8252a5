"""Default heads: ``forward(tokens [B, N, D], out: TokenizerOutput) -> logits``.

* :class:`ClassificationHead`: mean-pool over the patch tokens, Linear -> ``[B, C]``; the LayerNorm is the
  model's final ``norm`` (contracts.md section 4), so the engine model maps 1:1 onto timm's
  ``VisionTransformer(global_pool="avg", fc_norm=False, class_token=False)``. With a class token
  (the engine prepends it) the head reads it instead, as timm's ``global_pool="token"``. Multi-label
  uses the same logits with BCE.
* :class:`LinearProbeHead`: MAE's linear-probe classifier (``main_linprobe.py``: a BatchNorm without affine
  parameters before the Linear, weights drawn with std 0.01), the head of the paper's "fix" setting.
* :class:`SegmentationHead`: group tokens propagated back to every input point by inverse-distance
  interpolation over the 3 nearest group centres (PointNet++ feature propagation), concatenated with the
  pooled shape feature, then a per-point MLP -> ``[B, N_points, C]``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pathway.tokenizers.base import TokenizerOutput
from pathway.tokenizers.point_group import interpolate_to_points


def has_cls_token(tokens: Tensor, out: TokenizerOutput | None) -> bool:
    """True when the model prepended one token to what the tokenizer produced."""
    return out is not None and tokens.shape[1] == out.tokens.shape[1] + 1


class ClassificationHead(nn.Module):
    def __init__(self, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(embed_dim, num_classes)

    @staticmethod
    def pool(tokens: Tensor, out: TokenizerOutput | None) -> Tensor:
        """The class token when the model prepended one, else the mean of the tokens: ``[B, D]``."""
        return tokens[:, 0] if has_cls_token(tokens, out) else tokens.mean(dim=1)

    def forward(self, tokens: Tensor, out: TokenizerOutput | None = None) -> Tensor:
        return self.fc(self.pool(tokens, out))


class LinearProbeHead(ClassificationHead):
    """Pooled features -> ``BatchNorm1d(affine=False, eps=1e-6)`` -> Linear, as MAE's linear probe.

    The normalisation has no parameters, so the frozen-body setting trains only ``fc`` (and lambda); its
    running statistics are buffers, updated in training mode as in MAE."""

    def __init__(self, embed_dim: int, num_classes: int) -> None:
        super().__init__(embed_dim, num_classes)
        self.bn = nn.BatchNorm1d(embed_dim, affine=False, eps=1e-6)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, tokens: Tensor, out: TokenizerOutput | None = None) -> Tensor:
        return self.fc(self.bn(self.pool(tokens, out)))


HEADS: dict[str, type[ClassificationHead]] = {"linear": ClassificationHead, "probe": LinearProbeHead}


class SegmentationHead(nn.Module):
    """Per-point logits from group tokens; needs ``out.extras["centers"]`` and ``out.extras["points"]``."""

    def __init__(self, embed_dim: int, num_classes: int, hidden: int = 256, k: int = 3) -> None:
        super().__init__()
        self.k = k
        self.mlp = nn.Sequential(
            nn.Linear(2 * embed_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, tokens: Tensor, out: TokenizerOutput) -> Tensor:
        missing = [k for k in ("centers", "points") if k not in out.extras]
        if missing:
            raise ValueError(f"SegmentationHead needs out.extras {missing}; use a PointGroupTokenizer")
        centers, points = out.extras["centers"], out.extras["points"]
        groups = tokens[:, -centers.shape[1]:]  # drop a class token if the model prepended one
        per_point = interpolate_to_points(points, centers, groups, k=self.k)  # [B, Np, D]
        pooled = groups.mean(dim=1, keepdim=True).expand_as(per_point)
        return self.mlp(torch.cat([per_point, pooled], dim=-1))
