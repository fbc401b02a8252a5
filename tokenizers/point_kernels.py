"""Triton kernels for the point tokenizer's grouping: farthest point sampling and k nearest neighbours.

The torch loop of ``point_group.py`` launches a few kernels per sampled centre, so on a GPU it is bound by
launch latency. Here each cloud is one program: FPS keeps the cloud and its running minimum distance in
registers and does one ``argmax`` reduction per step; KNN is one program per centre that computes its
distances to the whole cloud once, then takes the ``k`` nearest by ``k`` ``argmin`` reductions.

Both give the same indices as the torch reference, bit for bit: distances are computed in the same order
(``(dx*dx + dy*dy) + dz*dz`` in float32) with FMA contraction turned off (``enable_fp_fusion=False``), and
ties go to the lowest index as ``torch.argmax`` and the reference's (distance, index) order do.

On CUDA tensors the kernels are compiled. With ``TRITON_INTERPRET=1`` set before triton is imported they run
on CPU tensors in Triton's interpreter (numpy): that is how the tests check them on a machine without a GPU.
Clouds of more than ``point_group.TRITON_MAX_POINTS`` points do not fit in one program's registers:
``point_group`` keeps the torch path for those.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from pathway.errors import PathwayError

# the kernels were wrapped for the interpreter (TRITON_INTERPRET=1 when this module was imported)
_INTERPRETED = bool(triton.knobs.runtime.interpret)


class PointKernelError(PathwayError, RuntimeError):
    """A Triton point kernel was called where it cannot run."""


@triton.jit
def _fps_kernel(xyz_ptr, start_ptr, out_ptr, n, num_samples, BLOCK_N: tl.constexpr):
    """One cloud per program: ``out[b, i]`` is the point farthest from ``out[b, :i]``."""
    b = tl.program_id(0).to(tl.int64)
    cloud = xyz_ptr + b * n * 3
    offs = tl.arange(0, BLOCK_N)
    inside = offs < n
    x = tl.load(cloud + offs * 3, mask=inside, other=0.0)
    y = tl.load(cloud + offs * 3 + 1, mask=inside, other=0.0)
    z = tl.load(cloud + offs * 3 + 2, mask=inside, other=0.0)
    # squared distance to the chosen set; lanes past the cloud hold -1 so they are never the farthest
    nearest = tl.where(inside, float("inf"), -1.0)
    farthest = tl.load(start_ptr + b).to(tl.int32)
    for i in range(num_samples):
        tl.store(out_ptr + b * num_samples + i, farthest.to(tl.int64))
        dx = x - tl.load(cloud + farthest * 3)
        dy = y - tl.load(cloud + farthest * 3 + 1)
        dz = z - tl.load(cloud + farthest * 3 + 2)
        dist = (dx * dx + dy * dy) + dz * dz
        nearest = tl.minimum(nearest, dist)
        farthest = tl.argmax(nearest, axis=0, tie_break_left=True).to(tl.int32)


@triton.jit
def _knn_kernel(query_ptr, ref_ptr, dist_ptr, idx_ptr, g, n, k, BLOCK_N: tl.constexpr):
    """One query point per program: its ``k`` nearest points of the cloud, nearest first, ties to the lower index."""
    b = tl.program_id(1).to(tl.int64)  # the grid is (queries, clouds): CUDA allows 2**31 - 1 programs along x
    q = b * g + tl.program_id(0)
    cloud = ref_ptr + b * n * 3
    offs = tl.arange(0, BLOCK_N)
    inside = offs < n
    dx = tl.load(cloud + offs * 3, mask=inside, other=0.0) - tl.load(query_ptr + q * 3)
    dy = tl.load(cloud + offs * 3 + 1, mask=inside, other=0.0) - tl.load(query_ptr + q * 3 + 1)
    dz = tl.load(cloud + offs * 3 + 2, mask=inside, other=0.0) - tl.load(query_ptr + q * 3 + 2)
    dist = tl.where(inside, (dx * dx + dy * dy) + dz * dz, float("inf"))
    for j in range(k):
        value, index = tl.min(dist, axis=0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(dist_ptr + q * k + j, value)
        tl.store(idx_ptr + q * k + j, index.to(tl.int64))
        dist = tl.where(offs == index, float("inf"), dist)


def _check_device(t: Tensor) -> None:
    if t.device.type != "cuda" and not _INTERPRETED:
        raise PointKernelError(
            f"the Triton point kernels need a CUDA tensor, got one on {t.device}; to run them on the CPU with "
            "Triton's interpreter, set TRITON_INTERPRET=1 before triton is first imported"
        )


def _launch_options(n: int, device: torch.device) -> dict:
    block = max(16, triton.next_power_of_2(n))
    options = {"BLOCK_N": block, "enable_fp_fusion": False}
    if device.type == "cuda":
        options["num_warps"] = min(32, max(4, block // 256))
    return options


def farthest_point_sample_triton(xyz: Tensor, num_samples: int, starts: Tensor) -> Tensor:
    """Indices ``[B, S]`` as ``point_group.farthest_point_sample``; ``starts [B]`` is each cloud's first index."""
    b, n, _ = xyz.shape
    points = xyz.float().contiguous()
    out = torch.empty(b, num_samples, dtype=torch.long, device=xyz.device)
    _check_device(xyz)
    starts = starts.to(device=xyz.device, dtype=torch.long).contiguous()
    _fps_kernel[(b,)](points, starts, out, n, num_samples, **_launch_options(n, xyz.device))
    return out


def knn_triton(query: Tensor, ref: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Squared distances and indices ``[B, G, k]`` as ``point_group.knn`` (nearest first, ties to the lower index)."""
    b, g, _ = query.shape
    n = ref.shape[1]
    dists = torch.empty(b, g, k, dtype=torch.float32, device=ref.device)
    idx = torch.empty(b, g, k, dtype=torch.long, device=ref.device)
    _check_device(ref)
    query, ref = query.float().contiguous(), ref.float().contiguous()
    _knn_kernel[(g, b)](query, ref, dists, idx, g, n, k, **_launch_options(n, ref.device))
    return dists, idx
