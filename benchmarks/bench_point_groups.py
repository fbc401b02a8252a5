"""The point tokenizer's FPS + KNN grouping: backends, open3d, its share of a training step (prints, asserts nothing).

1. Farthest point sampling of one cloud and of 32 clouds of 8192 points down to 512 and 1024 centres (or
   ``--clouds``, ``--points``, ``--centres``), on the device the script runs on: the torch loop (the reference),
   the default backend (``auto``: Triton on CUDA, numba on CPU) and, on the CPU when open3d is installed,
   open3d's ``farthest_point_down_sample`` (one call per cloud, as a data loader would do). "KNN" is the
   32-neighbour search of those centres alone (``auto``: Triton on CUDA, numba on CPU), "FPS+KNN"
   both. Issue 23's figures of the torch loop (torch 2.11, one H200 and the same machine's 16 CPU cores) are
   printed beside.
2. The grouping's share of one training step (forward, backward, AdamW) of a point recipe's model, for the
   ShapeNetPart shape (16 clouds x 2048 points, 128 groups of 32) and ModelNet40's (32 x 1024, 64 groups of
   32): the tokenizer with a ViT body (``--width``/``--depth``/``--heads``; the recipes: 768 wide, 12 blocks,
   6 heads) and a linear head on the mean token. share = grouping / step, for the default backend and for
   the torch loop.
3. With ``--torch-compile``: the torch loop with its per-step body compiled by ``torch.compile`` (issue 23's
   alternative to a kernel), 1 and 32 clouds of 8192 points down to 512.

Run: ``.venv/bin/python benchmarks/bench_point_groups.py [--width 192 --heads 3] [--torch-compile]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from pathway.tokenizers.point_group import (
    FPS_BACKENDS,
    KNN_BACKENDS,
    PointGroupTokenizer,
    farthest_point_sample,
    gather_points,
    knn,
    pick_backend,
)
from pathway.train.model import TransformerModel

# issue 23: farthest_point_sample alone, torch 2.11, best of 5 -> (H200, the same machine's 16 CPU cores), ms
ISSUE_23_FPS_MS = {(1, 8192, 512): (56.9, 31.5), (1, 8192, 1024): (78.8, 61.3), (32, 8192, 512): (42.2, 98.7),
                   (32, 8192, 1024): (82.5, 191.5)}  # (clouds, points, centres)
SHAPES = {"ShapeNetPart": (16, 2048, 128, 32), "ModelNet40": (32, 1024, 64, 32)}  # clouds, points, groups, size


def best_of(fn: Callable[[], object], device: torch.device, repeat: int = 3) -> float:
    """Best wall-clock seconds of ``repeat`` calls after one warm-up (which also compiles what needs it)."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def grouping(xyz: Tensor, num_groups: int, group_size: int, backend: str) -> None:
    centres = gather_points(xyz, farthest_point_sample(xyz, num_groups, backend=backend))
    knn(centres, xyz, group_size, backend=backend)


def auto_backend(device: torch.device, choices: tuple[str, ...] = FPS_BACKENDS) -> str:
    """What ``backend="auto"`` takes on clouds of 8192 points on this device: for FPS, or KNN with its choices."""
    return pick_backend("auto", torch.empty(1, 8192, 3, device=device), "bench", choices)


def fps_table(device: torch.device, points: int, clouds: list[int], centres: list[int]) -> None:
    try:
        import open3d as o3d
    except ImportError:
        o3d = None
    print(f"\nFPS and KNN on {device} (auto = {auto_backend(device)} for FPS, {auto_backend(device, KNN_BACKENDS)} "
          f"for KNN; open3d {o3d.__version__ if o3d else 'not installed'}), best of 3, ms; "
          "issue 23's torch loop beside")
    print("| clouds x points -> centres | open3d FPS | torch FPS | auto FPS | open3d / auto | torch KNN | auto KNN "
          "| torch FPS+KNN | auto FPS+KNN | issue: H200 | issue: 16 CPU cores |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for batch in clouds:
        cloud_array = rng.standard_normal((batch, points, 3)).astype(np.float32)
        xyz = torch.from_numpy(cloud_array).to(device)
        pcs = None
        if o3d is not None and device.type == "cpu":
            pcs = [o3d.geometry.PointCloud(o3d.utility.Vector3dVector(c.astype(np.float64))) for c in cloud_array]
        for groups in centres:
            t_o3d = None
            if pcs is not None:
                t_o3d = best_of(lambda pcs=pcs, g=groups: [pc.farthest_point_down_sample(g) for pc in pcs], device)
            t_ref = best_of(lambda x=xyz, g=groups: farthest_point_sample(x, g, backend="torch"), device)
            t_auto = best_of(lambda x=xyz, g=groups: farthest_point_sample(x, g, backend="auto"), device)
            centre_xyz = gather_points(xyz, farthest_point_sample(xyz, groups))
            t_knn_ref = best_of(lambda c=centre_xyz, x=xyz: knn(c, x, 32, backend="torch"), device)
            t_knn_auto = best_of(lambda c=centre_xyz, x=xyz: knn(c, x, 32, backend="auto"), device)
            t_ref_all = best_of(lambda x=xyz, g=groups: grouping(x, g, 32, "torch"), device)
            t_auto_all = best_of(lambda x=xyz, g=groups: grouping(x, g, 32, "auto"), device)
            h200, cpu16 = ISSUE_23_FPS_MS.get((batch, points, groups), ("-", "-"))
            o3d_cells = (f"{t_o3d * 1e3:.1f}", f"{t_o3d / t_auto:.2f}x") if t_o3d else ("-", "-")
            print(f"| {batch} x {points} -> {groups} | {o3d_cells[0]} | {t_ref * 1e3:.1f} | {t_auto * 1e3:.1f} | "
                  f"{o3d_cells[1]} | {t_knn_ref * 1e3:.1f} | {t_knn_auto * 1e3:.1f} | {t_ref_all * 1e3:.1f} | "
                  f"{t_auto_all * 1e3:.1f} | {h200} | {cpu16} |", flush=True)


class MeanTokenHead(nn.Module):
    """Logits from the mean token: the cheapest head, so the share printed is the grouping's upper bound."""

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, tokens: Tensor, out: object) -> Tensor:
        return self.fc(tokens.mean(dim=1))


def step_shares(device: torch.device, width: int, depth: int, heads: int) -> None:
    print(f"\nGrouping's share of one training step on {device} (auto = {auto_backend(device)}): ViT {width} wide, "
          f"{depth} blocks, {heads} heads, linear head; best of 3")
    print("| shape | step (auto) | grouping: auto | share | grouping: torch loop | share with the torch loop |")
    print("|---|---|---|---|---|---|")
    for name, (batch, points, groups, size) in SHAPES.items():
        torch.manual_seed(0)
        model = TransformerModel(PointGroupTokenizer(groups, size, embed_dim=width), MeanTokenHead(width, 40),
                                 width, depth, heads).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.rand(batch, points, 3, device=device)
        y = torch.randint(40, (batch,), device=device)

        def train_step(model=model, optimizer=optimizer, x=x, y=y) -> None:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        t_step = best_of(train_step, device)
        t_auto = best_of(lambda x=x, g=groups, k=size: grouping(x, g, k, "auto"), device)
        t_ref = best_of(lambda x=x, g=groups, k=size: grouping(x, g, k, "torch"), device)
        ref_step = t_step - t_auto + t_ref
        print(f"| {name}: {batch} x {points} -> {groups} x {size} | {t_step * 1e3:.1f} ms | {t_auto * 1e3:.1f} ms | "
              f"{t_auto / t_step:.1%} | {t_ref * 1e3:.1f} ms | {t_ref / ref_step:.1%} |", flush=True)


def compiled_loop_fps(xyz: Tensor, num_samples: int, step: Callable) -> Tensor:
    """The reference's loop with its per-step body ``step`` (eager or compiled); starts at index 0."""
    b, n, _ = xyz.shape
    points_t = xyz.transpose(1, 2).contiguous()
    nearest = torch.full((b, n), float("inf"), device=xyz.device)
    farthest = torch.zeros(b, dtype=torch.long, device=xyz.device)
    out = torch.empty(b, num_samples, dtype=torch.long, device=xyz.device)
    for i in range(num_samples):
        out[:, i] = farthest
        nearest, farthest = step(points_t, nearest, farthest)
    return out


def fps_step(points_t: Tensor, nearest: Tensor, farthest: Tensor) -> tuple[Tensor, Tensor]:
    b = points_t.shape[0]
    diff = points_t - points_t.gather(2, farthest.view(b, 1, 1).expand(b, 3, 1))
    diff = diff * diff
    nearest = torch.minimum(nearest, (diff[:, 0] + diff[:, 1]) + diff[:, 2])
    return nearest, nearest.argmax(dim=1)


def torch_compile_rows(device: torch.device) -> None:
    compiled = torch.compile(fps_step, dynamic=False)
    print(f"\ntorch.compile of the torch loop's step on {device}, 8192 points -> 512, best of 3")
    for batch in (1, 32):
        xyz = torch.rand(batch, 8192, 3, device=device)
        start = time.perf_counter()
        same = torch.equal(compiled_loop_fps(xyz, 512, compiled), farthest_point_sample(xyz, 512, backend="torch"))
        first = time.perf_counter() - start
        t_compiled = best_of(lambda x=xyz: compiled_loop_fps(x, 512, compiled), device)
        t_eager = best_of(lambda x=xyz: farthest_point_sample(x, 512, backend="torch"), device)
        print(f"B={batch}: compiled {t_compiled * 1e3:.1f} ms (first call, compiling: {first:.1f} s) | eager torch "
              f"loop {t_eager * 1e3:.1f} ms | same indices as the reference: {same}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--points", type=int, default=8192, help="points per cloud of the FPS/KNN table")
    parser.add_argument("--clouds", type=int, nargs="+", default=[1, 32], help="batch sizes of the FPS/KNN table")
    parser.add_argument("--centres", type=int, nargs="+", default=[512, 1024], help="centres of the FPS/KNN table")
    parser.add_argument("--torch-compile", action="store_true", help="also time torch.compile of the torch loop")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {name}")
    fps_table(device, args.points, args.clouds, args.centres)
    step_shares(device, args.width, args.depth, args.heads)
    if args.torch_compile:
        torch_compile_rows(device)


if __name__ == "__main__":
    main()
