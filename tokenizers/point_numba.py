"""Farthest point sampling and k nearest neighbours on the CPU as compiled loops (numba) that skip the parts of
the cloud that cannot change the result.

The torch loop of ``point_group.py`` pays a few microseconds of dispatch per call, several calls per sampled
centre: for one cloud that is several times slower than open3d's C++ loop, which itself visits every point at
every step; its KNN computes every centre's distance to every point. Here each is one numba function, and most
points are not visited at all:

- the cloud is cut into leaves of nearby points (a counting sort by Morton code on a grid of about two points
  a cell, then runs of ``leaf`` points), each with its bounding box;
- FPS: a new centre cannot lower any "distance to the chosen set" in a leaf whose box is at least the leaf's
  largest such distance away, so the leaf is skipped: after the first few dozen centres most leaves are; the
  next centre is the maximum over the leaves' maxima, the lowest original index on ties;
- KNN: leaves are searched nearest box first, until the nearest box left is farther than the ``k``-th
  distance found.

The results are the reference's, bit for bit: the distances of visited points are ``(dx*dx + dy*dy) + dz*dz``
in float32 (no FMA contraction or reassociation), and a leaf is skipped only with a margin (1e-5 relative, the
box's distance in float64) far above the float32 rounding of a distance (about 3e-7), so no skipped point's
computed distance could have changed the result. Clouds of a batch run in parallel threads.

numba is optional (it comes with librosa); ``point_group`` keeps the torch reference when it is missing. The
compiled functions are cached beside this file (numba's ``cache=True``), so only the first run on a machine
pays the compilation (about 5 s).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch
from torch import Tensor

_SKIP_MARGIN = 1e-5  # relative: a leaf is skipped when its box's distance * (1 - margin) >= its largest distance
_SKIP_FLOOR = 1e-30  # boxes nearer than this are always visited (float32 squares of such offsets are subnormal)


def leaf_size(num_points: int) -> int:
    """Points per leaf: small leaves skip more points, but each costs a box test per step (FPS) or per query
    (KNN); measured best for both on uniform, Gaussian and spherical clouds of 1,024 to 100,000 points."""
    return 32 if num_points <= 4096 else 64 if num_points <= 16384 else 128


@numba.njit(cache=True, nogil=True)
def _spread_bits(v: int) -> int:
    """The low 10 bits of ``v`` moved to every third bit (one axis of a Morton code)."""
    v = (v | (v << 16)) & 0x030000FF
    v = (v | (v << 8)) & 0x0300F00F
    v = (v | (v << 4)) & 0x030C30C3
    return (v | (v << 2)) & 0x09249249


@numba.njit(cache=True, nogil=True)
def _morton_order(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Point indices sorted by the Morton code of their grid cell (a stable counting sort): nearby points together."""
    n = x.shape[0]
    bits = max(3, min(6, int(np.log2(max(n, 16) / 2) / 3 + 0.5)))  # about 2 points a cell: 8^3 for 1,024 points
    cells = 1 << (3 * bits)
    lo_x = hi_x = x[0]
    lo_y = hi_y = y[0]
    lo_z = hi_z = z[0]
    for j in range(1, n):  # one pass: six ndarray.min/max calls took 4x as long (each checks for NaN)
        lo_x, hi_x = min(lo_x, x[j]), max(hi_x, x[j])
        lo_y, hi_y = min(lo_y, y[j]), max(hi_y, y[j])
        lo_z, hi_z = min(lo_z, z[j]), max(hi_z, z[j])
    lo_x, lo_y, lo_z = np.float64(lo_x), np.float64(lo_y), np.float64(lo_z)
    extent = max(np.float64(hi_x) - lo_x, np.float64(hi_y) - lo_y, np.float64(hi_z) - lo_z, 1e-300)
    scale = ((1 << bits) - 1e-3) / extent
    code = np.empty(n, np.int64)
    start = np.zeros(cells + 1, np.int64)
    for j in range(n):
        c = (_spread_bits(int((x[j] - lo_x) * scale)) | (_spread_bits(int((y[j] - lo_y) * scale)) << 1)
             | (_spread_bits(int((z[j] - lo_z) * scale)) << 2))
        code[j] = c
        start[c + 1] += 1
    for c in range(cells):
        start[c + 1] += start[c]
    order = np.empty(n, np.int64)
    for j in range(n):
        order[start[code[j]]] = j
        start[code[j]] += 1
    return order


# nnan/nsz only: they let the running maximum vectorise; no contraction or reassociation, so the distances
# are the reference's bit for bit (the inputs are checked finite first)
@numba.njit(cache=True, nogil=True, fastmath={"nnan", "nsz"})
def _update_leaf(x: np.ndarray, y: np.ndarray, z: np.ndarray, lo: int, hi: int, cx: np.float32, cy: np.float32,
                 cz: np.float32, nearest: np.ndarray) -> np.float32:
    """``nearest[lo:hi] = min(nearest, squared distance to (cx, cy, cz))``; returns its new maximum."""
    best = np.float32(-1.0)
    for j in range(lo, hi):
        dx, dy, dz = x[j] - cx, y[j] - cy, z[j] - cz
        dist = (dx * dx + dy * dy) + dz * dz
        value = dist if dist < nearest[j] else nearest[j]
        nearest[j] = value
        best = max(best, value)
    return best


@numba.njit(cache=True, nogil=True)
def _leaves(x: np.ndarray, y: np.ndarray, z: np.ndarray, leaf: int):
    """The cloud in leaf order: original indices, x, y, z, and each leaf's float64 box ``[L, 6]``.

    Leaf ``b`` holds positions ``b * leaf`` to ``(b + 1) * leaf - 1``; its box is min x, max x, min y, max y,
    min z, max z of those points.
    """
    n = x.shape[0]
    order = _morton_order(x, y, z)
    xs, ys, zs = np.empty_like(x), np.empty_like(y), np.empty_like(z)
    box = np.empty(((n + leaf - 1) // leaf, 6))
    box[:, 0::2], box[:, 1::2] = np.inf, -np.inf
    for j in range(n):  # gather and boxes in one pass
        b, px, py, pz = j // leaf, x[order[j]], y[order[j]], z[order[j]]
        xs[j], ys[j], zs[j] = px, py, pz
        box[b, 0], box[b, 1] = min(box[b, 0], px), max(box[b, 1], px)
        box[b, 2], box[b, 3] = min(box[b, 2], py), max(box[b, 3], py)
        box[b, 4], box[b, 5] = min(box[b, 4], pz), max(box[b, 5], pz)
    return order, xs, ys, zs, box


@numba.njit(cache=True, nogil=True)
def _box_gap(box: np.ndarray, b: int, cx: np.float32, cy: np.float32, cz: np.float32) -> float:
    """Squared distance (float64) from ``(cx, cy, cz)`` to leaf ``b``'s box: no point of the leaf is nearer."""
    gx = max(box[b, 0] - cx, cx - box[b, 1], 0.0)
    gy = max(box[b, 2] - cy, cy - box[b, 3], 0.0)
    gz = max(box[b, 4] - cz, cz - box[b, 5], 0.0)
    return gx * gx + gy * gy + gz * gz


@numba.njit(cache=True, nogil=True)
def _all_farther(gap: float, bound: np.float32) -> bool:
    """Every point of a box ``gap`` away computes a float32 distance above ``bound``, strictly (the margin is far
    above the float32 rounding of a distance, see the module docstring): no point of it can lower a minimum of
    ``bound`` nor tie with a k-th distance of ``bound``."""
    return gap > _SKIP_FLOOR and gap * (1.0 - _SKIP_MARGIN) >= bound


@numba.njit(cache=True, nogil=True)
def _fps_cloud(x: np.ndarray, y: np.ndarray, z: np.ndarray, start: int, out: np.ndarray, leaf: int) -> None:
    """One cloud ``x, y, z [N]`` float32 -> ``out [S]``; the farthest point is the lowest index of the maximum."""
    n = x.shape[0]
    order, xs, ys, zs, box = _leaves(x, y, z, leaf)
    leaves = box.shape[0]
    farthest = 0  # a position in leaf order
    while order[farthest] != start:
        farthest += 1
    nearest = np.full(n, np.inf, dtype=np.float32)  # squared distance to the chosen set, in leaf order
    leaf_max = np.full(leaves, np.inf, dtype=np.float32)
    for i in range(out.shape[0]):
        out[i] = order[farthest]
        cx, cy, cz = xs[farthest], ys[farthest], zs[farthest]
        for b in range(leaves):
            if not _all_farther(_box_gap(box, b, cx, cy, cz), leaf_max[b]):
                leaf_max[b] = _update_leaf(xs, ys, zs, b * leaf, min(n, (b + 1) * leaf), cx, cy, cz, nearest)
        best = leaf_max.max()
        lowest = n
        for b in range(leaves):
            if leaf_max[b] == best:
                for j in range(b * leaf, min(n, (b + 1) * leaf)):
                    if nearest[j] == best and order[j] < lowest:
                        lowest, farthest = order[j], j


@numba.njit(cache=True, nogil=True)
def _knn_leaf(cx: np.float32, cy: np.float32, cz: np.float32, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray,
              order: np.ndarray, lo: int, hi: int, kept_d: np.ndarray, kept_i: np.ndarray) -> None:
    """Points ``lo:hi`` (leaf order) into the sorted ``(distance, index)`` list ``kept_d, kept_i`` of the query."""
    k = kept_d.shape[0]
    for j in range(lo, hi):
        dx, dy, dz = xs[j] - cx, ys[j] - cy, zs[j] - cz
        d = (dx * dx + dy * dy) + dz * dz
        i = order[j]
        if d > kept_d[k - 1] or (d == kept_d[k - 1] and i > kept_i[k - 1]):
            continue
        p = k - 1  # insertion into the sorted list
        while p > 0 and (kept_d[p - 1] > d or (kept_d[p - 1] == d and kept_i[p - 1] > i)):
            kept_d[p], kept_i[p] = kept_d[p - 1], kept_i[p - 1]
            p -= 1
        kept_d[p], kept_i[p] = d, i


@numba.njit(cache=True, nogil=True)
def _knn_cloud(qx: np.ndarray, qy: np.ndarray, qz: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray,
               leaf: int, dist: np.ndarray, index: np.ndarray) -> None:
    """The ``k`` nearest of ``x, y, z [N]`` for each query ``qx, qy, qz [G]`` into ``dist, index [G, k]``.

    Leaves are searched nearest box first (picked one at a time: a query searches about 5-15 leaves, cheaper
    than sorting all boxes), until the nearest box left is farther than the ``k``-th distance by the skip
    margin: no point in it or beyond could enter, not even on a tie with a lower index. The kept list is in
    (distance, index) order, so equal distances go to the lower index, as in the reference.
    """
    n, k = x.shape[0], dist.shape[1]
    order, xs, ys, zs, box = _leaves(x, y, z, leaf)
    gaps = np.empty(box.shape[0])
    for q in range(qx.shape[0]):
        cx, cy, cz = qx[q], qy[q], qz[q]
        for b in range(box.shape[0]):
            gaps[b] = _box_gap(box, b, cx, cy, cz)
        kept_d, kept_i = dist[q], index[q]
        kept_d[:] = np.inf
        kept_i[:] = n  # above every index: the first k points always enter
        for _ in range(box.shape[0]):
            b = np.argmin(gaps)
            if _all_farther(gaps[b], kept_d[k - 1]):
                break  # an inf gap marks a searched leaf: it ends the search once k points are kept
            gaps[b] = np.inf
            _knn_leaf(cx, cy, cz, xs, ys, zs, order, b * leaf, min(n, (b + 1) * leaf), kept_d, kept_i)


_THREADED_WORK = 1 << 19  # clouds x points x centres (the brute-force work) below which one thread is faster
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (process id, workers, pool)


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """One pool kept for the process: starting threads costs ~0.7 ms, as long as sampling 32 small clouds.

    Sized by torch's thread count (not by the batch, so a short last batch does not replace it); made again
    when that count changes and in a forked child (a DataLoader worker): a pool copied by ``fork`` has no
    threads left."""
    global _pool
    if _pool is None or _pool[:2] != (os.getpid(), workers):
        _pool = (os.getpid(), workers, ThreadPoolExecutor(workers, thread_name_prefix="pathway-fps"))
    return _pool[2]


def _coords(xyz: Tensor) -> np.ndarray:
    """``xyz [B, N, 3]`` as float32 ``[3, B, N]`` numpy (finite: ``point_group`` checks before calling us, and
    the skipping bounds rely on it)."""
    # the transpose in numpy, on one thread: torch's parallel copy would wake its OpenMP threads just before our pool
    return np.ascontiguousarray(xyz.detach().cpu().float().numpy().transpose(2, 0, 1))


def _per_cloud(clouds: int, work: int, fn) -> None:
    """``fn(b)`` for every cloud: in threads (the compiled loops release the GIL) when the work pays for them.

    One task a thread, each taking every ``workers``-th cloud: a task a cloud cost more in hand-offs than a
    small cloud's sampling (32 x 1024 -> 64 took as long as one thread). Not numba's ``parallel=True``, whose
    OpenMP threads keep spinning after each call and starve torch's own.
    """
    threads = torch.get_num_threads()
    workers = min(clouds, threads)
    if workers > 1 and work >= _THREADED_WORK:

        def every_nth(first: int) -> None:
            for b in range(first, clouds, workers):
                fn(b)

        list(_thread_pool(threads).map(every_nth, range(workers)))
    else:
        for b in range(clouds):
            fn(b)


def farthest_point_sample_numba(xyz: Tensor, num_samples: int, starts: Tensor) -> Tensor:
    """Indices ``[B, S]`` as ``point_group.farthest_point_sample``, on ``xyz``'s device (computed on the CPU)."""
    coords = _coords(xyz)
    clouds, points = xyz.shape[:2]
    out = np.empty((clouds, num_samples), dtype=np.int64)
    starts = starts.cpu().long().numpy()
    leaf = leaf_size(points)

    def sample(b: int) -> None:
        _fps_cloud(coords[0, b], coords[1, b], coords[2, b], starts[b], out[b], leaf)

    _per_cloud(clouds, clouds * points * num_samples, sample)
    return torch.from_numpy(out).to(xyz.device)


def knn_numba(query: Tensor, ref: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Squared distances and indices ``[B, G, k]`` as ``point_group.knn``, on ``ref``'s device (computed on the CPU)."""
    coords = _coords(ref)
    queries = _coords(query)  # [3, B, G], as the cloud
    clouds, points = ref.shape[:2]
    dist = np.empty((clouds, query.shape[1], k), dtype=np.float32)
    index = np.empty((clouds, query.shape[1], k), dtype=np.int64)
    leaf = leaf_size(points)

    def search(b: int) -> None:
        _knn_cloud(queries[0, b], queries[1, b], queries[2, b], coords[0, b], coords[1, b], coords[2, b], leaf,
                   dist[b], index[b])

    _per_cloud(clouds, clouds * points * query.shape[1], search)
    return torch.from_numpy(dist).to(ref.device), torch.from_numpy(index).to(ref.device)
