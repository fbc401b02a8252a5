"""Farthest point sampling on the CPU as one compiled loop (numba), for when torch's per-step calls dominate.

The torch loop of ``point_group.py`` pays a few microseconds of dispatch per call, several calls per sampled
centre: for one cloud that is 3x slower than open3d's C++ loop. Here the whole sampling is one numba
function; clouds of a batch run in parallel threads. The distance arithmetic is the reference's
(``(dx*dx + dy*dy) + dz*dz`` in float32, no fastmath so no FMA contraction or reassociation) and ties go to
the lowest index, so the indices are the same as the torch path's, bit for bit.

numba is optional (it comes with librosa); ``point_group`` keeps the torch loop when it is missing. The
compiled function is cached beside this file (numba's ``cache=True``), so only the first run on a machine
pays the ~1 s compilation.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor


@numba.njit(cache=True, nogil=True, parallel=True)
def _fps_clouds(x: np.ndarray, y: np.ndarray, z: np.ndarray, starts: np.ndarray, out: np.ndarray) -> None:
    """``x, y, z [B, N]`` float32, ``starts [B]`` -> ``out [B, S]`` (filled in place)."""
    num_clouds, n = x.shape
    num_samples = out.shape[1]
    for b in numba.prange(num_clouds):
        xb, yb, zb = x[b], y[b], z[b]
        nearest = np.full(n, np.inf, dtype=np.float32)
        farthest = starts[b]
        for i in range(num_samples):
            out[b, i] = farthest
            cx, cy, cz = xb[farthest], yb[farthest], zb[farthest]
            for j in range(n):  # running minimum: vectorises
                dx, dy, dz = xb[j] - cx, yb[j] - cy, zb[j] - cz
                dist = (dx * dx + dy * dy) + dz * dz
                if dist < nearest[j]:
                    nearest[j] = dist
            best, farthest = nearest[0], 0
            for j in range(1, n):  # first index of the maximum, as torch.argmax
                if nearest[j] > best:
                    best, farthest = nearest[j], j


def farthest_point_sample_numba(xyz: Tensor, num_samples: int, starts: Tensor) -> Tensor:
    """Indices ``[B, S]`` as ``point_group.farthest_point_sample`` for a CPU ``xyz [B, N, 3]``."""
    coords = xyz.detach().float().permute(2, 0, 1).contiguous().numpy()  # [3, B, N]
    out = np.empty((xyz.shape[0], num_samples), dtype=np.int64)
    _fps_clouds(coords[0], coords[1], coords[2], starts.to(torch.long).numpy(), out)
    return torch.from_numpy(out)
