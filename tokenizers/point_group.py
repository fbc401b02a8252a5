"""Point groups: farthest point sampling + k nearest neighbours + mini-PointNet, in pure batched torch.

``points [B, N, C]`` (xyz first, then optional features such as normals or colours; ``C = in_chans``)
-> ``G`` centres chosen by farthest point sampling (FPS) on xyz -> the ``K`` nearest points of each
centre, xyz taken relative to their centre -> Point-MAE's group encoder (``first_conv``:
Conv1d(C,128)-BN-ReLU-Conv1d(128,256), max-pool, concat the pooled feature to each point,
``second_conv``: Conv1d(512,512)-BN-ReLU-Conv1d(512,D), max-pool) -> ``tokens [B, G, D]``, plus
``pos_embed`` (Linear(3,128)-GELU-Linear(128,D)) of the centres.

No CUDA extension to build (pointnet2_ops / knn_cuda fail to build for many users). The reference is pure
torch: FPS is vectorised over the batch and loops only over the ``G`` samples; KNN is a chunked distance
matrix + ``topk``. Faster paths give the same indices and are taken when installed: Triton kernels on CUDA
(``point_kernels``), numba's compiled FPS and KNN on CPU, which skip the parts of the cloud that cannot change
the result (``point_numba``).
FPS starts at index 0 by default, as Point-MAE's pointnet2 kernel does (deterministic);
``fps_start=None`` picks a random start per cloud.

MAE targets: each group's xyz relative to its centre, ``[B, G, K*3]``, compared by Chamfer distance.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pathway.errors import OptionError

from .base import Tokenizer, TokenizerInputError, TokenizerOutput

TRITON_MAX_POINTS = 1 << 15  # one Triton program holds a whole cloud in registers: larger clouds take the torch loop
_KNN_CHUNK = 1 << 24  # distance-matrix entries per chunk: bounds KNN memory at ~64 MB (float32)
_KNN_SLACK = 16  # candidates beyond k ranked by the matmul form, then re-ranked by exact distances
_ROUNDING = 32 * torch.finfo(torch.float32).eps  # the matmul form's rounding, relative to |q|^2 + |r|^2


FPS_BACKENDS = ("auto", "torch", "triton", "numba")


def _fps_starts(xyz: Tensor, start: int | None) -> Tensor:
    b, n, _ = xyz.shape
    if start is None:
        return torch.randint(n, (b,), device=xyz.device)
    if not 0 <= start < n:
        raise TokenizerInputError(f"farthest_point_sample: start={start} is not an index of clouds of {n} points")
    return torch.full((b,), int(start), dtype=torch.long, device=xyz.device)


def _check_finite(xyz: Tensor, name: str, what: str) -> None:
    """NaN or inf coordinates refused: every backend would return some indices, none of them meaningful.

    One ``amax`` of ``|xyz|`` (it propagates NaN): a quarter of ``isfinite().all()``'s time on a small cloud."""
    if xyz.numel() and not math.isfinite(xyz.detach().abs().amax().item()):
        bad = (~torch.isfinite(xyz)).any(-1).nonzero()[0].tolist()
        raise TokenizerInputError(
            f"{name}: {what} has NaN or infinite coordinates (first at batch {bad[0]}, point {bad[1]}); clean or "
            "drop such points before grouping"
        )


def _has_module(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def pick_backend(backend: str, xyz: Tensor, name: str, choices: tuple[str, ...]) -> str:
    """``auto``: Triton on CUDA, numba on CPU, when installed and the cloud fits; else the torch reference."""
    if backend not in choices:
        raise OptionError(f"{name}: backend={backend!r} is not one of {choices}")
    if backend != "auto":
        return backend
    if xyz.is_cuda and xyz.shape[1] <= TRITON_MAX_POINTS and _has_module("triton"):
        return "triton"
    if xyz.device.type == "cpu" and "numba" in choices and _has_module("numba"):
        return "numba"
    return "torch"


@torch.no_grad()
def farthest_point_sample(xyz: Tensor, num_samples: int, start: int | None = 0, backend: str = "auto") -> Tensor:
    """Indices ``[B, S]`` of ``S`` points of ``xyz [B, N, 3]``, each the farthest from those already chosen.

    Every backend gives the same indices: squared distances as ``(dx*dx + dy*dy) + dz*dz`` in float32 and
    ties to the lowest index. ``auto`` takes the Triton kernel on CUDA (one program per cloud, see
    ``point_kernels``), numba's compiled loop on CPU (``point_numba``) and the torch loop otherwise.

    Args:
        start: index of the first point (same for every cloud), or ``None`` for a random one per cloud.
        backend: ``auto``, ``torch`` (the reference), ``triton`` (on a CPU tensor: Triton's interpreter) or ``numba``.
    """
    b, n, _ = xyz.shape
    if num_samples > n:
        raise TokenizerInputError(f"farthest_point_sample: asked for {num_samples} samples from clouds of {n} points")
    _check_finite(xyz, "farthest_point_sample", "the cloud")
    starts = _fps_starts(xyz, start)
    backend = pick_backend(backend, xyz, "farthest_point_sample", FPS_BACKENDS)
    if backend == "triton":
        from .point_kernels import farthest_point_sample_triton

        return farthest_point_sample_triton(xyz, num_samples, starts)
    if backend == "numba":
        from .point_numba import farthest_point_sample_numba

        return farthest_point_sample_numba(xyz, num_samples, starts)
    return _farthest_point_sample_torch(xyz, num_samples, starts)


def _farthest_point_sample_torch(xyz: Tensor, num_samples: int, starts: Tensor) -> Tensor:
    """The reference: batched over clouds, a few torch calls per sampled point (into preallocated buffers)."""
    b, n, _ = xyz.shape
    points_t = xyz.float().transpose(1, 2).contiguous()  # [B, 3, N]
    out = torch.empty(b, num_samples, dtype=torch.long, device=xyz.device)
    nearest = torch.full((b, n), float("inf"), device=xyz.device)  # squared distance to the chosen set
    diff, dist = torch.empty_like(points_t), torch.empty_like(nearest)
    farthest = starts
    for i in range(num_samples):
        out[:, i] = farthest
        centre = points_t.gather(2, farthest.view(b, 1, 1).expand(b, 3, 1))  # [B, 3, 1]
        torch.sub(points_t, centre, out=diff).mul_(diff)
        torch.add(diff[:, 0], diff[:, 1], out=dist).add_(diff[:, 2])
        torch.minimum(nearest, dist, out=nearest)
        farthest = nearest.argmax(dim=1)
    return out


KNN_BACKENDS = ("auto", "torch", "triton", "numba")


def knn(query: Tensor, ref: Tensor, k: int, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """The ``k`` nearest points of ``ref [B, N, 3]`` for each of ``query [B, G, 3]``, nearest first.

    Returns squared distances ``[B, G, k]`` (float32, ``(dx*dx + dy*dy) + dz*dz``) and indices into ``ref``
    ``[B, G, k]``; equal distances go to the lower index, on every backend. ``auto`` takes the Triton
    kernel on CUDA (``point_kernels``), numba's leaf search on CPU (``point_numba``), else the torch reference.
    """
    n = ref.shape[1]
    if k > n:
        raise TokenizerInputError(f"knn: k={k} neighbours asked from clouds of {n} points")
    _check_finite(ref, "knn", "the cloud")
    _check_finite(query, "knn", "a query point")
    return _knn_checked(query, ref, k, backend)


@torch.no_grad()
def _knn_checked(query: Tensor, ref: Tensor, k: int, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """``knn`` on inputs already checked (finite, ``k <= N``): the tokenizer's centres are points of its checked
    cloud, so it skips a second pass over the cloud (on CUDA each check waits for the GPU)."""
    b, g, _ = query.shape
    if b == 0 or g == 0:
        return query.new_empty(b, g, k, dtype=torch.float32), torch.empty(b, g, k, dtype=torch.long, device=ref.device)
    backend = pick_backend(backend, ref, "knn", KNN_BACKENDS)
    if backend == "triton":
        from .point_kernels import knn_triton

        return knn_triton(query, ref, k)
    if backend == "numba":
        from .point_numba import knn_numba

        return knn_numba(query, ref, k)
    return _knn_torch(query, ref, k)


def _knn_torch(query: Tensor, ref: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The reference: exact distances, ``(distance, index)`` order; fast candidates from one matmul.

    ``|q|^2 - 2 q.r + |r|^2`` (one batched matmul, chunked) ranks the cloud approximately; its ``k + 16``
    nearest are the candidates, whose exact distances ``(dx*dx + dy*dy) + dz*dz`` decide. The rounding of
    the matmul form is below ``delta = 32 eps (max |r|^2 + |q|^2)``, so the exact ``k`` nearest are all
    candidates when the last candidate is more than ``2 delta`` beyond the ``k``-th; queries where it is not
    (many equal distances, clouds far from the origin, norms that overflow float32) are recomputed exactly over
    the whole cloud.
    """
    b, g, _ = query.shape
    n = ref.shape[1]
    ref, query = ref.float(), query.float()
    m = min(n, k + _KNN_SLACK)
    ref_sq = (ref * ref).sum(-1)  # [B, N]
    ref_sq_max = ref_sq.amax(dim=1, keepdim=True)  # [B, 1]
    chunk = max(1, _KNN_CHUNK // max(1, b * n))
    dists, idxs = [], []
    for q in query.split(chunk, dim=1):
        q_sq = (q * q).sum(-1)  # [B, c]
        approx = torch.baddbmm(ref_sq.unsqueeze(1), q, ref.transpose(1, 2), alpha=-2).add_(q_sq.unsqueeze(-1))
        approx_top, candidates = approx.topk(m, dim=2, largest=False, sorted=True)  # [B, c, m]
        d, idx = _nearest_by_key(_exact_sq_dist(q.unsqueeze(2), gather_points(ref, candidates)), candidates, k)
        if m < n:
            delta = _ROUNDING * (ref_sq_max + q_sq)
            # not "clearly beyond": also NaN, where squared norms overflow float32 (|coordinates| > ~1e19)
            sure = approx_top[..., -1] > approx_top[..., k - 1] + 2 * delta
            unsure = (~sure).nonzero(as_tuple=True)
            if unsure[0].numel():
                every = torch.arange(n, device=ref.device).expand(unsure[0].numel(), n)
                d[unsure], idx[unsure] = _nearest_by_key(_exact_sq_dist(q[unsure].unsqueeze(1), ref[unsure[0]]),
                                                         every, k)
        dists.append(d)
        idxs.append(idx)
    return torch.cat(dists, dim=1), torch.cat(idxs, dim=1)


def _exact_sq_dist(query: Tensor, points: Tensor) -> Tensor:
    """``(dx*dx + dy*dy) + dz*dz`` in float32, as the other backends compute it: ``[..., 1, 3]``, ``[..., M, 3]``."""
    diff = points - query
    diff = diff * diff
    return (diff[..., 0] + diff[..., 1]) + diff[..., 2]


def _nearest_by_key(dist: Tensor, index: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` smallest of ``dist [..., M]`` in ``(distance, index)`` order, and their ``index [..., M]``.

    Non-negative float32 distances order as their bit patterns do, so ``bits << 32 | index`` is one int64
    key per point, all distinct: ``topk`` on it has no ties to break arbitrarily.
    """
    keys = (dist.contiguous().view(torch.int32).long() << 32) | index
    top = keys.topk(k, dim=-1, largest=False, sorted=True).values
    return (top >> 32).int().view(torch.float32), top & 0xFFFFFFFF


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
        centers = gather_points(xyz, farthest_point_sample(xyz, self.num_groups, self.fps_start))  # checks xyz
        _, neighbours = _knn_checked(centers, xyz, self.group_size)
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
