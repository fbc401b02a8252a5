"""Point groups: farthest point sampling + k nearest neighbours + mini-PointNet, in pure batched torch.

``points [B, N, C]`` (xyz first, then optional features such as normals or colours; ``C = in_chans``)
-> ``G`` centres chosen by farthest point sampling (FPS) on xyz -> the ``K`` nearest points of each
centre, xyz taken relative to their centre -> Point-MAE's group encoder (``first_conv``:
Conv1d(C,128)-BN-ReLU-Conv1d(128,256), max-pool, concat the pooled feature to each point,
``second_conv``: Conv1d(512,512)-BN-ReLU-Conv1d(512,D), max-pool) -> ``tokens [B, G, D]``, plus
``pos_embed`` (Linear(3,128)-GELU-Linear(128,D)) of the centres.

No CUDA extension (pointnet2_ops / knn_cuda fail to build for many users): FPS is vectorised over the
batch and loops only over the ``G`` samples; KNN is a chunked distance matrix + ``topk``. Both run on
CPU and CUDA. FPS starts at index 0 by default, as Point-MAE's pointnet2 kernel does (deterministic);
``fps_start=None`` picks a random start per cloud.

MAE targets: each group's xyz relative to its centre, ``[B, G, K*3]``, compared by Chamfer distance.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pathway.errors import OptionError

from .base import Tokenizer, TokenizerInputError, TokenizerOutput

_KNN_CHUNK = 1 << 24  # distance-matrix entries per chunk: bounds KNN memory at ~64 MB (float32)


@torch.no_grad()
def farthest_point_sample(xyz: Tensor, num_samples: int, start: int | None = 0) -> Tensor:
    """Indices ``[B, S]`` of ``S`` points of ``xyz [B, N, 3]``, each the farthest from those already chosen.

    Each step is one batched ``baddbmm`` (``|x|^2 - 2 x.c + |c|^2`` for all clouds at once), a running
    minimum and an argmax: about twice as fast on CPU as the per-coordinate difference form.

    Args:
        start: index of the first point (same for every cloud), or ``None`` for a random one per cloud.
    """
    b, n, _ = xyz.shape
    if num_samples > n:
        raise TokenizerInputError(f"farthest_point_sample: asked for {num_samples} samples from clouds of {n} points")
    points = xyz.float().contiguous()  # [B, N, 3]
    points_t = points.transpose(1, 2).contiguous()  # [B, 3, N]
    sq = (points * points).sum(-1).unsqueeze(1)  # [B, 1, N]
    out = torch.empty(b, num_samples, dtype=torch.long, device=xyz.device)
    nearest = torch.full((b, 1, n), float("inf"), device=xyz.device)  # squared distance to the chosen set
    dist = torch.empty_like(nearest)
    if start is None:
        farthest = torch.randint(n, (b,), device=xyz.device)
    else:
        farthest = torch.full((b,), int(start), dtype=torch.long, device=xyz.device)
    batch = torch.arange(b, device=xyz.device)
    for i in range(num_samples):
        out[:, i] = farthest
        centre = points[batch, farthest].unsqueeze(1)  # [B, 1, 3]
        torch.baddbmm(sq + (centre * centre).sum(-1, keepdim=True), centre, points_t, alpha=-2, out=dist)  # [B, 1, N]
        torch.minimum(nearest, dist, out=nearest)
        farthest = nearest.argmax(dim=2).squeeze(1)
    return out


@torch.no_grad()
def knn(query: Tensor, ref: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest points of ``ref [B, N, 3]`` for each of ``query [B, G, 3]``, nearest first.

    Returns squared distances ``[B, G, k]`` and indices into ``ref`` ``[B, G, k]``.
    """
    b, g, _ = query.shape
    n = ref.shape[1]
    if k > n:
        raise TokenizerInputError(f"knn: k={k} neighbours asked from clouds of {n} points")
    ref = ref.float()
    ref_sq = (ref * ref).sum(-1).unsqueeze(1)  # [B, 1, N]
    chunk = max(1, _KNN_CHUNK // max(1, b * n))
    dists, idxs = [], []
    for q in query.float().split(chunk, dim=1):
        # |q|^2 - 2 q.r + |r|^2 in one batched matmul; clamp the rounding below zero
        d = torch.baddbmm(ref_sq, q, ref.transpose(1, 2), alpha=-2).add_((q * q).sum(-1, keepdim=True)).clamp_(min=0)
        top = d.topk(k, dim=2, largest=False, sorted=True)
        dists.append(top.values)
        idxs.append(top.indices)
    return torch.cat(dists, dim=1), torch.cat(idxs, dim=1)


def gather_points(points: Tensor, idx: Tensor) -> Tensor:
    """``points [B, N, C]`` at ``idx [B, ...]`` -> ``[B, ..., C]``."""
    b, c = points.shape[0], points.shape[-1]
    flat = idx.reshape(b, -1, 1).expand(-1, -1, c)
    return points.gather(1, flat).reshape(*idx.shape, c)


def interpolate_to_points(points: Tensor, centers: Tensor, feats: Tensor, k: int = 3) -> Tensor:
    """Features ``[B, G, D]`` at ``centers [B, G, 3]`` -> ``[B, N, D]`` at ``points [B, N, 3]``.

    Inverse squared-distance weights over the ``k`` nearest centres (PointNet++ feature propagation).
    """
    k = min(k, centers.shape[1])
    d2, idx = knn(points[..., :3], centers, k)  # [B, N, k]
    weights = 1.0 / (d2 + 1e-8)
    weights = (weights / weights.sum(-1, keepdim=True)).to(feats.dtype)
    return (gather_points(feats, idx) * weights.unsqueeze(-1)).sum(dim=2)


class PointGroupTokenizer(Tokenizer):
    """``points [B, N, in_chans] -> tokens [B, num_groups, embed_dim]`` (Point-MAE's Group + Encoder + pos_embed).

    Args:
        num_groups: ``G`` centres (Point-MAE: 64 for 1024 points; 512 / 1024 for dense clouds).
        group_size: ``K`` neighbours per centre.
        in_chans: features per point, xyz first (3; 6 with normals; 6 with colours...).
        embed_dim: token width ``D`` (the group encoder's output, as Point-MAE's ``encoder_dims``).
        fps_start: first FPS index (deterministic), or ``None`` for a random start per cloud.
        num_categories: width of a shape-category one-hot appended to every point after the ``in_chans``
            features (ShapeNetPart, Point-MAE's segmentation); it is split off, not grouped, and handed to the
            head as ``out.extras["category"]`` ``[B, num_categories]``.
    """

    reconstruction_loss = "chamfer"

    def __init__(
        self,
        num_groups: int = 64,
        group_size: int = 32,
        in_chans: int = 3,
        embed_dim: int = 384,
        fps_start: int | None = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        num_categories: int = 0,
    ) -> None:
        super().__init__()
        self.num_categories = num_categories
        if in_chans < 3:
            raise OptionError(f"PointGroupTokenizer: in_chans={in_chans}, but points need at least xyz (3)")
        self.num_groups, self.group_size, self.in_chans = num_groups, group_size, in_chans
        self.embed_dim = embed_dim
        self.fps_start = fps_start
        dd = {"device": device, "dtype": dtype}
        self.first_conv = nn.Sequential(
            nn.Conv1d(in_chans, 128, 1, **dd), nn.BatchNorm1d(128, **dd), nn.ReLU(inplace=True),
            nn.Conv1d(128, 256, 1, **dd),
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(512, 512, 1, **dd), nn.BatchNorm1d(512, **dd), nn.ReLU(inplace=True),
            nn.Conv1d(512, embed_dim, 1, **dd),
        )
        self.pos_embed = nn.Sequential(nn.Linear(3, 128, **dd), nn.GELU(), nn.Linear(128, embed_dim, **dd))

    def group(self, points: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Centres ``[B, G, 3]``, neighbour indices ``[B, G, K]`` and groups ``[B, G, K, C]`` (xyz centred)."""
        if points.ndim != 3 or points.shape[-1] != self.in_chans:
            raise TokenizerInputError(
                f"PointGroupTokenizer expects points [B, N, {self.in_chans}] (xyz first), got {tuple(points.shape)}"
            )
        n = points.shape[1]
        if n < max(self.group_size, self.num_groups):
            raise TokenizerInputError(
                f"PointGroupTokenizer: clouds of {n} points are too small for {self.num_groups} groups of "
                f"{self.group_size}; resample the cloud with replacement to more points (the point adapter does)"
            )
        xyz = points[..., :3]
        centers = gather_points(xyz, farthest_point_sample(xyz, self.num_groups, self.fps_start))
        _, neighbours = knn(centers, xyz, self.group_size)
        groups = gather_points(points, neighbours)  # [B, G, K, C]
        groups = torch.cat([groups[..., :3] - centers.unsqueeze(2), groups[..., 3:]], dim=-1)
        return centers, neighbours, groups

    def encode_groups(self, groups: Tensor) -> Tensor:
        """Mini-PointNet: ``[B, G, K, C] -> [B, G, D]``."""
        b, g, k, c = groups.shape
        x = groups.reshape(b * g, k, c).transpose(1, 2)  # [BG, C, K]
        f = self.first_conv(x)  # [BG, 256, K]
        f = torch.cat([f.amax(dim=2, keepdim=True).expand(-1, -1, k), f], dim=1)  # [BG, 512, K]
        f = self.second_conv(f).amax(dim=2)  # [BG, D]
        return f.reshape(b, g, -1)

    def encode(self, x: Tensor) -> TokenizerOutput:
        category = None
        if self.num_categories:
            x, category = x[..., : -self.num_categories], x[:, 0, -self.num_categories:]
        centers, neighbours, groups = self.group(x)
        tokens = self.encode_groups(groups)
        pos = self.pos_embed(centers.to(tokens.dtype))
        extras = {"centers": centers, "neighbours": neighbours, "points": x[..., :3], "groups": groups}
        if category is not None:
            extras["category"] = category
        return TokenizerOutput(tokens=tokens + pos, pos=pos, extras=extras)

    def reconstruction_targets(self, x: Tensor, out: TokenizerOutput) -> Tensor:
        """Each group's xyz relative to its centre, ``[B, G, K*3]``."""
        groups = out.extras["groups"]
        return groups[..., :3].reshape(groups.shape[0], groups.shape[1], -1)
