"""Default heads: ``forward(tokens [B, N, D], out: TokenizerOutput) -> logits``.

* :class:`ClassificationHead`: mean-pool over tokens, LayerNorm, Linear -> ``[B, C]`` (MAE's global-pool
  fine-tuning head; multi-label uses the same logits with BCE).
* :class:`SegmentationHead`: group tokens propagated back to every input point by inverse-distance
  interpolation over the 3 nearest group centres (PointNet++ feature propagation), concatenated with the
  pooled shape feature, then a per-point MLP -> ``[B, N_points, C]``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pathway.tokenizers import TokenizerOutput
from pathway.tokenizers.point_group import interpolate_to_points


class ClassificationHead(nn.Module):
    def __init__(self, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.fc = nn.Linear(embed_dim, num_classes)

    def forward(self, tokens: Tensor, out: TokenizerOutput | None = None) -> Tensor:
        return self.fc(self.norm(tokens.mean(dim=1)))


class SegmentationHead(nn.Module):
    """Per-point logits from group tokens; needs ``out.extras["centers"]`` and ``out.extras["points"]``."""

    def __init__(self, embed_dim: int, num_classes: int, hidden: int = 256, k: int = 3) -> None:
        super().__init__()
        self.k = k
        self.norm = nn.LayerNorm(embed_dim)
        self.mlp = nn.Sequential(
            nn.Linear(2 * embed_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, tokens: Tensor, out: TokenizerOutput) -> Tensor:
        missing = [k for k in ("centers", "points") if k not in out.extras]
        if missing:
            raise ValueError(f"SegmentationHead needs out.extras {missing}; use a PointGroupTokenizer")
        centers, points = out.extras["centers"], out.extras["points"]
        groups = self.norm(tokens[:, -centers.shape[1]:])  # drop a cls token if the model prepended one
        per_point = interpolate_to_points(points, centers, groups, k=self.k)  # [B, Np, D]
        pooled = groups.mean(dim=1, keepdim=True).expand_as(per_point)
        return self.mlp(torch.cat([per_point, pooled], dim=-1))
