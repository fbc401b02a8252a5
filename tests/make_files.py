"""Write small real files of every modality for the adapter tests and benchmarks (PIL, soundfile, open3d, PyAV).

Each writer returns the path it wrote; ``corrupt(path, how)`` damages a copy in one of three ways.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_image(path: Path, size: int = 32, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def write_audio(path: Path, seconds: float = 1.0, sr: int = 16000, freq: float = 440.0, channels: int = 1) -> Path:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    wave = 0.5 * np.sin(2 * np.pi * freq * t) + 0.05 * np.random.default_rng(int(freq)).standard_normal(t.shape)
    data = np.stack([wave] * channels, axis=1) if channels > 1 else wave
    sf.write(str(path), data.astype(np.float32), sr)
    return path


def sphere_points(n: int, seed: int = 0, radius: float = 2.0, offset: float = 3.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = rng.standard_normal((n, 3))
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    return p * radius * rng.uniform(0.5, 1.0, (n, 1)) + offset


def write_point_cloud(path: Path, n: int = 512, seed: int = 0, normals: bool = False) -> Path:
    import open3d as o3d

    path.parent.mkdir(parents=True, exist_ok=True)
    pts = sphere_points(n, seed)
    if path.suffix in (".npy",):
        np.save(path, pts.astype(np.float32))
        return path
    if path.suffix == ".txt":
        np.savetxt(path, pts, delimiter=",")
        return path
    pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts))
    if normals:
        pc.normals = o3d.utility.Vector3dVector(pts / np.linalg.norm(pts, axis=1, keepdims=True))
    if not o3d.io.write_point_cloud(str(path), pc, write_ascii=path.suffix in (".xyz", ".xyzn", ".pts")):
        raise RuntimeError(f"open3d could not write {path}")
    return path


def write_mesh(path: Path) -> Path:
    import open3d as o3d

    path.parent.mkdir(parents=True, exist_ok=True)
    mesh = o3d.geometry.TriangleMesh.create_box(1.0, 2.0, 0.5)
    mesh.compute_vertex_normals()
    if not o3d.io.write_triangle_mesh(str(path), mesh):
        raise RuntimeError(f"open3d could not write {path}")
    return path


def write_part_txt(path: Path, n: int = 256, seed: int = 0, labels: tuple[int, ...] = (0, 1)) -> Path:
    """ShapeNetPart's ``x y z nx ny nz label`` lines; the label is the upper/lower half of the cloud."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pts = sphere_points(n, seed)
    nrm = pts / np.linalg.norm(pts, axis=1, keepdims=True)
    lab = np.where(pts[:, 2] > np.median(pts[:, 2]), labels[1], labels[0])
    np.savetxt(path, np.column_stack([pts, nrm, lab]), fmt=["%.6f"] * 6 + ["%d"])
    return path


def write_video(path: Path, frames: int = 8, size: int = 32, fps: int = 8, seed: int = 0) -> Path:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libvpx" if path.suffix == ".webm" else "mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            img = np.full((size, size, 3), (i * 30) % 256, dtype=np.uint8)
            img[: size // 2] = rng.integers(0, 256, 3, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_series(path: Path, channels: int = 3, length: int = 64, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data = np.sin(np.linspace(0, 6 * np.pi, length))[None] * rng.uniform(0.5, 2, (channels, 1))
    data = data + 0.1 * rng.standard_normal((channels, length))
    if path.suffix == ".csv":
        np.savetxt(path, data.T, delimiter=",", header=",".join(f"c{i}" for i in range(channels)), comments="")
    else:
        np.save(path, data.astype(np.float32))
    return path


def corrupt(path: Path, how: str) -> Path:
    """Damage ``path`` in place: ``"empty"`` (0 bytes), ``"truncated"`` (first third kept) or ``"garbage"``."""
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: max(1, len(data) // 3)])
    elif how == "garbage":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, max(64, len(data)), dtype=np.uint8).tobytes())
    else:
        raise ValueError(f"corrupt: how={how!r} is not one of 'empty', 'truncated', 'garbage'")
    return path


def write_png(path: Path, pixels: np.ndarray, color_type: int, bit_depth: int = 16, size: tuple[int, int] | None = None
              ) -> Path:
    """A PNG written chunk by chunk (Pillow cannot write 16-bit colour): ``pixels [H, W, C]`` big-endian rows,
    ``color_type`` 0 grey, 2 RGB, 4 grey + alpha, 6 RGBA. ``size`` (width, height) overrides the header's size
    without more pixel data (a decompression bomb's header)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = pixels.shape[:2]
    width, height = size or (width, height)
    dtype = ">u2" if bit_depth == 16 else np.uint8
    rows = b"".join(b"\x00" + row.astype(dtype).tobytes() for row in pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type,
                                                                    0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path
