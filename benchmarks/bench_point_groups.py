"""FPS + KNN grouping of the point tokenizer vs open3d's ``farthest_point_down_sample``
(prints ratios, asserts nothing).

Cases: one cloud and a batch of 32 clouds of 8192 points, down to 512 and 1024 centres. open3d samples
one cloud per call (the batch is a Python loop over clouds, as a data loader would do); ours handles the
batch in one call. "ours (FPS+KNN)" adds the 32-neighbour grouping that open3d's number does not include.
Run: ``.venv/bin/python benchmarks/bench_point_groups.py``.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from pathway.tokenizers.point_group import farthest_point_sample, gather_points, knn


def best_of(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    import open3d as o3d

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, open3d {o3d.__version__}")
    rng = np.random.default_rng(0)
    for batch in (1, 32):
        clouds = rng.standard_normal((batch, 8192, 3)).astype(np.float32)
        pcs = [o3d.geometry.PointCloud(o3d.utility.Vector3dVector(c.astype(np.float64))) for c in clouds]
        xyz = torch.from_numpy(clouds)
        for groups in (512, 1024):
            t_o3d = best_of(lambda pcs=pcs, groups=groups: [pc.farthest_point_down_sample(groups) for pc in pcs])
            t_fps = best_of(lambda xyz=xyz, groups=groups: farthest_point_sample(xyz, groups))

            def fps_knn(x=xyz, groups=groups):
                centres = gather_points(x, farthest_point_sample(x, groups))
                knn(centres, x, 32)

            t_all = best_of(fps_knn)
            line = (f"B={batch:2d} N=8192 G={groups:4d}: open3d FPS {t_o3d * 1e3:8.1f} ms | "
                    f"ours FPS {t_fps * 1e3:8.1f} ms (open3d/ours {t_o3d / t_fps:5.2f}x) | "
                    f"ours FPS+KNN {t_all * 1e3:8.1f} ms (open3d/ours {t_o3d / t_all:5.2f}x)")
            if torch.cuda.is_available():
                g = xyz.cuda()
                t_gpu = best_of(lambda g=g, fps_knn=fps_knn: fps_knn(g))
                line += f" | CUDA FPS+KNN {t_gpu * 1e3:7.1f} ms (open3d/CUDA {t_o3d / t_gpu:6.1f}x)"
            print(line, flush=True)


if __name__ == "__main__":
    main()
