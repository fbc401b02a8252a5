"""Default heads: ``forward(tokens [B, N, D], out: TokenizerOutput) -> logits``.

* :class:`ClassificationHead`: mean-pool over the patch tokens, Linear -> ``[B, C]``; the LayerNorm is the
  model's final ``norm`` (contracts.md section 4), so the engine model maps 1:1 onto timm's
  ``VisionTransformer(global_pool="avg", fc_norm=False, class_token=False)``. With a class token
  (the engine prepends it) the head reads it instead, as timm's ``global_pool="token"``. Multi-label
  uses the same logits with BCE.
* :class:`LinearProbeHead`: MAE's linear-probe classifier (``main_linprobe.py``: a BatchNorm without affine
  parameters before the Linear, weights drawn with std 0.01), the head of the paper's "fix" setting.
* :class:`PointMAEClassificationHead`: Point-MAE's fine-tuning classifier ``cls_head_finetune``
  (``models/Point_MAE.py:459-469``, fed at ``:546-547``): the class token concatenated with the max over the
  group tokens, after the final norm, then Linear-BN-ReLU-Dropout twice (256 wide) and a Linear -> ``[B, C]``.
  Needs the model's class token (``model.cls_token: true``).
* :class:`SegmentationHead`: group tokens propagated back to every input point by inverse-distance
  interpolation over the 3 nearest group centres (PointNet++ feature propagation), concatenated with the
  pooled shape feature, then a per-point MLP -> ``[B, N_points, C]``.
* :class:`PointMAESegmentationHead`: Point-MAE's part-segmentation head (``segmentation/models/pt.py``
  ``get_model``): the outputs of several blocks (3, 7, 11 of 12) after the final norm, concatenated; their max
  and mean over the groups plus a feature of the shape category's one-hot as the global feature; the
  concatenated levels propagated to the points (3 nearest centres, then a 2-layer point MLP, PointNet++);
  a 3-layer point MLP with dropout 0.5 -> ``[B, N_points, C]``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pathway.errors import OptionError
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


class PointMAEClassificationHead(nn.Module):
    """Point-MAE's ``PointTransformer.cls_head_finetune`` (Pang-Yatian/Point-MAE 7445a68, ``models/Point_MAE.py``).

    ``forward`` is ``Point_MAE.py:546-547``: ``concat_f = cat([x[:, 0], x[:, 1:].max(1)[0]], -1)`` on the tokens
    after the final norm (``:545``), then ``cls_head_finetune(concat_f)``; the MLP is ``:459-469``:
    ``Linear(2D, 256), BatchNorm1d(256), ReLU, Dropout(0.5), Linear(256, 256), BatchNorm1d(256), ReLU,
    Dropout(0.5), Linear(256, C)``. ``mlp`` is that ``Sequential`` index for index, so a fine-tuned file's
    ``cls_head_finetune.N.*`` are this head's ``mlp.N.*`` (``pathway.train.official.layouts`` renames them to
    ``head.mlp.N.*``). Initialisation is PyTorch's default, as Point-MAE's when it starts from a pretrained
    checkpoint (``load_model_from_ckpt`` applies ``_init_weights`` only from scratch, ``:514-516``).

    It reads the **class token**: the model must prepend one (``model.cls_token: true``, Point-MAE's
    ``cls_token`` and ``cls_pos``, ``:440-441``); without it the head refuses rather than take a group token
    for it.
    """

    def __init__(self, embed_dim: int, num_classes: int, hidden: int = 256, dropout: float = 0.5) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(2 * embed_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, tokens: Tensor, out: TokenizerOutput | None = None) -> Tensor:
        if out is None:
            raise OptionError("PointMAEClassificationHead needs the tokenizer output to tell the class token from "
                              "the group tokens: call it as TransformerModel does, head(tokens, out)")
        if not has_cls_token(tokens, out):
            raise OptionError(
                f"PointMAEClassificationHead (data.options.head: pointmae) reads the class token in front of the "
                f"group tokens (Point-MAE models/Point_MAE.py:546), but the model prepends none ({tokens.shape[1]} "
                f"tokens for {out.tokens.shape[1]} groups): set model.cls_token: true (and model.pos_every_block: "
                f"true, as Point-MAE), or use data.options.head: linear")
        return self.mlp(torch.cat([tokens[:, 0], tokens[:, 1:].amax(dim=1)], dim=-1))


def conv_bn(c_in: int, c_out: int, act: nn.Module, bias: bool = True) -> nn.Sequential:
    """Point-wise Conv1d -> BatchNorm1d -> activation, on ``[B, C, N]``."""
    return nn.Sequential(nn.Conv1d(c_in, c_out, 1, bias=bias), nn.BatchNorm1d(c_out), act)


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
            raise OptionError(f"SegmentationHead needs out.extras {missing}; use a PointGroupTokenizer")
        centers, points = out.extras["centers"], out.extras["points"]
        groups = tokens[:, -centers.shape[1]:]  # drop a class token if the model prepended one
        per_point = interpolate_to_points(points, centers, groups, k=self.k)  # [B, Np, D]
        pooled = groups.mean(dim=1, keepdim=True).expand_as(per_point)
        return self.mlp(torch.cat([per_point, pooled], dim=-1))


class PointMAESegmentationHead(nn.Module):
    """Point-MAE's segmentation head; ``out.extras`` must carry ``block_features``, ``centers`` and ``points``
    (and ``category``, the one-hot ``[B, num_categories]``, when ``num_categories > 0``).

    ``block_features``: the outputs of the blocks in ``feature_blocks`` after the model's final norm, each
    ``[B, G(+1), D]``; the model fills it for heads that have ``feature_blocks``.
    """

    def __init__(self, embed_dim: int, num_classes: int, num_categories: int = 16,
                 feature_blocks: tuple[int, ...] = (3, 7, 11)) -> None:
        super().__init__()
        self.feature_blocks = tuple(feature_blocks)
        self.num_categories = num_categories
        levels = len(self.feature_blocks) * embed_dim
        label = 64 if num_categories else 0
        if num_categories:
            self.label_conv = conv_bn(num_categories, label, nn.LeakyReLU(0.2), bias=False)
        self.propagation = nn.Sequential(
            conv_bn(levels + 3, 4 * embed_dim, nn.ReLU()), conv_bn(4 * embed_dim, 1024, nn.ReLU())
        )
        self.mlp = nn.Sequential(
            conv_bn(1024 + 2 * levels + label, 512, nn.ReLU()), nn.Dropout(0.5),
            conv_bn(512, 256, nn.ReLU()), nn.Conv1d(256, num_classes, 1),
        )

    def forward(self, tokens: Tensor, out: TokenizerOutput) -> Tensor:
        needed = ["block_features", "centers", "points"] + (["category"] if self.num_categories else [])
        missing = [k for k in needed if k not in out.extras]
        if missing:
            raise OptionError(
                f"PointMAESegmentationHead needs out.extras {missing}: block_features (blocks {self.feature_blocks} "
                f"after the final norm) come from the model, category from a tokenizer built with num_categories")
        centers, points = out.extras["centers"], out.extras["points"]
        g, n = centers.shape[1], points.shape[1]
        # [B, G, L*D], class token dropped
        levels = torch.cat([f[:, -g:] for f in out.extras["block_features"]], dim=-1)
        pooled = [levels.amax(dim=1), levels.mean(dim=1)]  # [B, L*D] each
        if self.num_categories:
            pooled.append(self.label_conv(out.extras["category"].to(levels.dtype).unsqueeze(-1)).squeeze(-1))
        shape_feature = torch.cat(pooled, dim=-1).unsqueeze(-1).expand(-1, -1, n)  # [B, 2*L*D (+64), N]
        per_point = interpolate_to_points(points, centers, levels, k=3)  # [B, N, L*D]
        per_point = self.propagation(torch.cat([points, per_point], dim=-1).transpose(1, 2))  # [B, 1024, N]
        return self.mlp(torch.cat([per_point, shape_feature], dim=1)).transpose(1, 2)  # [B, N, C]
