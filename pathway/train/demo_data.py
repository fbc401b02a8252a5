"""Small real data sets on disk for the demo recipes (``recipes/demo/``), made locally, nothing downloaded.

Each maker writes ordinary files in the class-per-folder layout ``root/{split}/{class}/item.ext``,
so the demo exercises the same readers as a real data set:

* image: scikit-learn's 8x8 handwritten digits, upscaled to 32x32 RGB PNG (10 classes);
* point: points sampled from open3d primitive meshes (box, sphere, cylinder, cone, torus), randomly
  scaled and rotated, as ``.npy`` ``[N, 3]`` (5 classes);
* audio: 1 s, 16 kHz wav files of tones, chirps, noise bursts and AM tones (4 classes);
* video: 16-frame 32x32 mp4 (PyAV, H.264) of a square moving right, left, up or down (4 classes);
* timeseries: 2-channel sequences of length 128 (sine, square, sawtooth, noise) as ``.npy`` (4 classes).

``make_demo_data(adapter, root)`` is idempotent: a finished folder has a ``.complete`` marker. It writes only
into a folder it owns (``pathway/train/owned.py``): a new or empty one, or one it marked earlier; a folder of
anything else (say a user's own data set named as ``data.root``) is refused, never cleared. Rewriting its own
folder (another size, an interrupted run) deletes only the files its makers write, by their names.
Heavy libraries (scikit-learn, open3d, PyAV, soundfile) are imported inside the maker that needs them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from pathway.errors import OptionError

from .owned import FolderNotOwnedError, check_claimable, claim, owner

__all__ = ["MAKERS", "make_demo_data", "check_demo_root"]

SPLITS = {"train": 0.8, "val": 0.2}


def _split_of(i: int, n: int) -> str:
    return "train" if i < int(n * SPLITS["train"]) else "val"


def make_image(root: Path, per_class: int, rng: np.random.Generator) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in range(10):
        imgs = digits.images[digits.target == label][:per_class]
        for i, img in enumerate(imgs):
            gray = (img / 16.0 * 255).astype(np.uint8)
            rgb = np.stack([gray] * 3, axis=-1)
            out = root / _split_of(i, len(imgs)) / str(label)
            out.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb).resize((32, 32), Image.BILINEAR).save(out / f"{i:04d}.png")


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def make_point(root: Path, per_class: int, rng: np.random.Generator, points: int = 1024) -> None:
    import open3d as o3d

    o3d.utility.random.seed(int(rng.integers(1 << 30)))  # surface sampling is random inside open3d
    shapes: dict[str, Callable[[], object]] = {
        "box": lambda: o3d.geometry.TriangleMesh.create_box(*rng.uniform(0.4, 1.2, 3)),
        "sphere": lambda: o3d.geometry.TriangleMesh.create_sphere(rng.uniform(0.4, 0.8)),
        "cylinder": lambda: o3d.geometry.TriangleMesh.create_cylinder(rng.uniform(0.2, 0.5), rng.uniform(0.8, 1.6)),
        "cone": lambda: o3d.geometry.TriangleMesh.create_cone(rng.uniform(0.3, 0.6), rng.uniform(0.8, 1.5)),
        "torus": lambda: o3d.geometry.TriangleMesh.create_torus(rng.uniform(0.5, 0.8), rng.uniform(0.1, 0.3)),
    }
    for name, make in shapes.items():
        for i in range(per_class):
            mesh = make()
            pcd = mesh.sample_points_uniformly(number_of_points=points)
            xyz = np.asarray(pcd.points, dtype=np.float32)
            xyz = (xyz - xyz.mean(0)) @ _random_rotation(rng).T.astype(np.float32)
            out = root / _split_of(i, per_class) / name
            out.mkdir(parents=True, exist_ok=True)
            np.save(out / f"{i:04d}.npy", xyz)


def make_audio(root: Path, per_class: int, rng: np.random.Generator, sr: int = 16000) -> None:
    import soundfile as sf

    t = np.arange(sr) / sr
    kinds: dict[str, Callable[[], np.ndarray]] = {
        "tone": lambda: np.sin(2 * np.pi * rng.uniform(200, 2000) * t),
        "chirp": lambda: np.sin(2 * np.pi * (rng.uniform(100, 500) + rng.uniform(1000, 3000) * t / 2) * t),
        "noise": lambda: rng.normal(0, 0.5, t.shape) * (t < rng.uniform(0.3, 0.9)),
        "am": lambda: (
            np.sin(2 * np.pi * rng.uniform(300, 1500) * t) * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 8) * t))
        ),
    }
    for name, make in kinds.items():
        for i in range(per_class):
            wave = 0.5 * make() + rng.normal(0, 0.01, t.shape)
            out = root / _split_of(i, per_class) / name
            out.mkdir(parents=True, exist_ok=True)
            sf.write(out / f"{i:04d}.wav", wave.astype(np.float32), sr)


def make_video(root: Path, per_class: int, rng: np.random.Generator, frames: int = 16, size: int = 32) -> None:
    import av

    moves = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}
    for name, (dx, dy) in moves.items():
        for i in range(per_class):
            out = root / _split_of(i, per_class) / name
            out.mkdir(parents=True, exist_ok=True)
            side = int(rng.integers(6, 10))
            x, y = rng.integers(side, size - side, 2)
            colour = rng.integers(128, 256, 3)
            with av.open(str(out / f"{i:04d}.mp4"), "w") as container:
                stream = container.add_stream("libx264", rate=8)
                stream.width = stream.height = size
                stream.pix_fmt = "yuv420p"
                for f in range(frames):
                    img = np.zeros((size, size, 3), dtype=np.uint8)
                    cx, cy = (x + dx * f) % size, (y + dy * f) % size
                    img[max(0, cy - side // 2):cy + side // 2, max(0, cx - side // 2):cx + side // 2] = colour
                    for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                        container.mux(packet)
                for packet in stream.encode():
                    container.mux(packet)


def make_timeseries(root: Path, per_class: int, rng: np.random.Generator, length: int = 128) -> None:
    t = np.linspace(0, 1, length)
    kinds: dict[str, Callable[[float, float], np.ndarray]] = {
        "sine": lambda f, p: np.sin(2 * np.pi * f * t + p),
        "square": lambda f, p: np.sign(np.sin(2 * np.pi * f * t + p)),
        "sawtooth": lambda f, p: 2 * ((f * t + p / (2 * np.pi)) % 1) - 1,
        "noise": lambda f, p: np.cumsum(rng.normal(0, 0.2, length)),
    }
    for name, make in kinds.items():
        for i in range(per_class):
            series = np.stack([make(rng.uniform(2, 6), rng.uniform(0, 2 * np.pi)) for _ in range(2)])
            series = series + rng.normal(0, 0.1, series.shape)
            out = root / _split_of(i, per_class) / name
            out.mkdir(parents=True, exist_ok=True)
            np.save(out / f"{i:04d}.npy", series.astype(np.float32))


MAKERS: dict[str, tuple[Callable[..., None], int, str]] = {  # adapter -> (maker, items per class, file suffix)
    "image": (make_image, 100, "png"),
    "point": (make_point, 60, "npy"),
    "audio": (make_audio, 50, "wav"),
    "video": (make_video, 40, "mp4"),
    "timeseries": (make_timeseries, 100, "npy"),
}


def _kind(adapter: str) -> str:
    return f"demo-data:{adapter}"


def _stamp(adapter: str, per_class: int, seed: int) -> str:
    """What ``.complete`` says of a finished folder: the data set it holds."""
    return f"{adapter} per_class={per_class} seed={seed}"


def _finished(root: Path, adapter: str) -> str | None:
    """The stamp of finished demo data of ``adapter`` at ``root`` (folders made before ownership markers
    have only ``.complete``), or None."""
    done = root / ".complete"
    if not (done.is_file() and owner(root) in (_kind(adapter), None)):
        return None
    stamp = done.read_text().strip()
    return stamp if stamp.startswith(f"{adapter} ") else None


_FIX = ("to train on your own files there, pass --set data.demo=false; to make the demo data, name a new or empty "
        "folder as data.root")


def check_demo_root(adapter: str, root: str | Path) -> bool:
    """Whether finished demo data of ``adapter`` is at ``root``; if not, raise unless ``make_demo_data`` could
    write there. Writes nothing (dry runs)."""
    root = Path(root)
    if _finished(root, adapter) is not None:
        return True
    check_claimable(root, _kind(adapter), fix=_FIX)
    return False


def _remove_demo_files(root: Path, adapter: str) -> None:
    """Delete the files a maker writes (``{split}/{class}/NNNN.{suffix}`` and ``.complete``) and the folders they
    leave empty; whatever else the user put in the folder (notes, their own files) stays."""
    suffix = MAKERS[adapter][2]
    (root / ".complete").unlink(missing_ok=True)
    for split in SPLITS:
        for path in root.glob(f"{split}/*/[0-9][0-9][0-9][0-9].{suffix}"):
            if path.is_file() and not path.is_symlink():
                path.unlink()
        for folder in [*root.glob(f"{split}/*/"), root / split]:
            if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
                folder.rmdir()


def make_demo_data(adapter: str, root: str | Path, per_class: int | None = None, seed: int = 0) -> Path:
    """Write the demo data of ``adapter`` under ``root`` unless it is already complete there.

    ``root`` must be new, empty, or a folder this function marked: a half-written one (an interrupted run),
    or, when ``per_class`` is given, one holding another size or seed of the same data, has its demo files
    deleted and written again (other files in it stay); any other folder is a ``FolderNotOwnedError`` and is
    left untouched. Without ``per_class`` (a demo recipe's run) finished demo data of any size is used as it is.
    """
    if adapter not in MAKERS:
        raise OptionError(f"no demo data for adapter {adapter!r}; available: {', '.join(MAKERS)}")
    root = Path(root)
    maker, default, _ = MAKERS[adapter]
    stamp = _stamp(adapter, per_class or default, seed)
    found = _finished(root, adapter)
    if found == stamp or (found is not None and per_class is None):  # no size asked (a recipe): any will do
        return root
    if found is not None and owner(root) is None:  # ours by its stamp, but from before markers: not cleared
        raise FolderNotOwnedError(f"{root} holds demo data of another size or seed ({found}, made before pathway "
                                  f"marked its folders); this run needs {stamp}: delete the folder yourself or "
                                  f"name another data.root")
    claim(root, _kind(adapter), fix=_FIX)
    _remove_demo_files(root, adapter)  # an interrupted run's files, or another size of the data; nothing else
    maker(root, per_class or default, np.random.default_rng(seed))
    (root / ".complete").write_text(stamp + "\n")
    return root
