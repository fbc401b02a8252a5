"""Farthest point sampling on the CPU as one compiled loop (numba), for when torch's per-step calls dominate.

The torch loop of ``point_group.py`` pays a few microseconds of dispatch per call, several calls per sampled
centre: for one cloud that is 3x slower than open3d's C++ loop. Here the whole sampling is one numba
function; clouds of a batch run in parallel threads. Each step is one pass that updates the running minimum
and its maximum (vectorised), then a scan for the first index holding that maximum.
The distance arithmetic is the reference's (``(dx*dx + dy*dy) + dz*dz`` in float32, no FMA contraction or
reassociation) and ties go to the lowest index, so the indices are the same as the torch path's, bit for bit.

numba is optional (it comes with librosa); ``point_group`` keeps the torch loop when it is missing. The
compiled function is cached beside this file (numba's ``cache=True``), so only the first run on a machine
pays the ~1 s compilation.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch
from torch import Tensor

from .base import TokenizerInputError


# nnan/nsz only: they let the running maximum vectorise; no contraction or reassociation, so the distances
# are the reference's bit for bit (the inputs are checked finite first)
@numba.njit(cache=True, nogil=True, fastmath={"nnan", "nsz"})
def _update_nearest(x: np.ndarray, y: np.ndarray, z: np.ndarray, centre: int, nearest: np.ndarray) -> float:
    """``nearest = min(nearest, squared distance to point centre)``; returns its new maximum."""
    cx, cy, cz = x[centre], y[centre], z[centre]
    best = np.float32(-1.0)
    for j in range(x.shape[0]):
        dx, dy, dz = x[j] - cx, y[j] - cy, z[j] - cz
        dist = (dx * dx + dy * dy) + dz * dz
        value = dist if dist < nearest[j] else nearest[j]
        nearest[j] = value
        best = max(best, value)
    return best


@numba.njit(cache=True, nogil=True)
def _fps_cloud(x: np.ndarray, y: np.ndarray, z: np.ndarray, start: int, out: np.ndarray) -> None:
    """One cloud ``x, y, z [N]`` float32 -> ``out [S]``; the farthest point is the first index of the maximum."""
    nearest = np.full(x.shape[0], np.inf, dtype=np.float32)
    farthest = start
    for i in range(out.shape[0]):
        out[i] = farthest
        best = _update_nearest(x, y, z, farthest, nearest)
        for j in range(x.shape[0]):
            if nearest[j] == best:
                farthest = j
                break


def farthest_point_sample_numba(xyz: Tensor, num_samples: int, starts: Tensor) -> Tensor:
    """Indices ``[B, S]`` as ``point_group.farthest_point_sample``, on ``xyz``'s device (computed on the CPU)."""
    coords = xyz.detach().cpu().float().permute(2, 0, 1).contiguous().numpy()  # [3, B, N]
    if not np.isfinite(coords).all():
        raise TokenizerInputError("farthest_point_sample: the cloud has NaN or infinite coordinates; clean the data")
    out = np.empty((xyz.shape[0], num_samples), dtype=np.int64)
    starts = starts.cpu().long().numpy()

    def sample(b: int) -> None:
        _fps_cloud(coords[0, b], coords[1, b], coords[2, b], starts[b], out[b])

    # clouds in threads (the compiled loop releases the GIL); not numba's parallel=True, whose OpenMP threads
    # keep spinning after each call and starve torch's own threads
    workers = min(len(out), torch.get_num_threads())
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(sample, range(len(out))))
    else:
        for b in range(len(out)):
            sample(b)
    return torch.from_numpy(out).to(xyz.device)
