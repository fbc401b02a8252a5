"""Point clouds: files -> ``x [num_points, in_chans]`` (xyz, then normals if ``in_chans=6``) -> point groups.

Readers: ``ply pcd xyz xyzn xyzrgb pts`` through open3d's ``read_point_cloud``; meshes ``obj off stl``
through ``read_triangle_mesh`` + ``sample_points_uniformly`` (area-weighted, with triangle normals);
``npy`` arrays ``[N, C]``; ``txt`` arrays (comma- or space-separated, ModelNet's ``x,y,z,nx,ny,nz``).

Every cloud is centred and scaled into the unit sphere, then sampled to ``num_points``: a random subset
(training) or a subset seeded by the sample index (evaluation, so it is the same every epoch). A cloud
with fewer points, including fewer than the tokenizer's group size, is **resampled with replacement**
(all its points kept once, the rest drawn again). Training augmentation, each optional: a scale drawn
in ``scale`` (per axis, or one for all axes with ``isotropic_scale``), a translation in
``[-translate, translate]`` per axis, rotation about ``up_axis``, Gaussian jitter (sigma ``jitter``, clipped
at 5 sigma); normals follow the rotation and scale and are re-normalised. The defaults are Point-MAE's:
classification (``PointcloudScaleAndTranslate``) anisotropic [2/3, 3/2] and 0.2; part segmentation
(``segmentation/main.py``: ``random_scale_point_cloud``, ``shift_point_cloud``) isotropic [0.8, 1.25], 0.1,
no jitter.

Adapters: ``point`` (classification, ``root/<split>/<class>/<file>``, top-1) and ``point_part`` (part
segmentation, per-point labels, mIoU; see :class:`PointPartAdapter` for its layouts).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from pathway.tokenizers.base import Tokenizer
from pathway.tokenizers.point_group import PointGroupTokenizer

from . import partnet
from .base import Adapter, FileDataset, LayoutError, OptionError, UnreadableFileError
from .heads import PointMAEClassificationHead, PointMAESegmentationHead, SegmentationHead
from .layout import list_files, split_dir
from .registry import register

CLOUD_EXTENSIONS = ("ply", "pcd", "xyz", "xyzn", "xyzrgb", "pts")
MESH_EXTENSIONS = ("obj", "off", "stl")
ARRAY_EXTENSIONS = ("npy", "txt")
POINT_EXTENSIONS = CLOUD_EXTENSIONS + MESH_EXTENSIONS + ARRAY_EXTENSIONS


def read_array(path: Path) -> np.ndarray:
    """``[N, C]`` float array from ``.npy`` or a delimited ``.txt`` (comma or whitespace)."""
    if path.suffix.lower() == ".npy":
        data = np.load(path, allow_pickle=False)
    else:
        with path.open() as f:
            first = f.readline()
        data = np.loadtxt(path, delimiter="," if "," in first else None, ndmin=2)
    if data.ndim != 2 or data.shape[1] < 3:
        raise UnreadableFileError(f"{path}: expected an array [N, >=3] (xyz first), got shape {data.shape}")
    return data.astype(np.float32)


_PLY_SIZES = {"char": 1, "uchar": 1, "int8": 1, "uint8": 1, "short": 2, "ushort": 2, "int16": 2, "uint16": 2,
              "int": 4, "uint": 4, "int32": 4, "uint32": 4, "float": 4, "float32": 4, "double": 8, "float64": 8}


def check_ply_complete(path: Path) -> None:
    """Raise if a PLY file is shorter than its header promises.

    open3d reports a truncated PLY only on stdout and still returns a cloud of the promised size whose
    tail is uninitialised memory, so the size is checked here first (binary files whose elements have
    only fixed-size properties; ASCII files by their line count).
    """
    with path.open("rb") as f:
        if f.readline().strip() != b"ply":
            raise UnreadableFileError(f"{path}: not a PLY file (no 'ply' magic line)")
        fmt, elements = "", []  # [(count, bytes per item or None if it has list properties)]
        for raw in f:
            words = raw.decode("ascii", "replace").split()
            if not words:
                continue
            if words[0] == "format":
                fmt = words[1]
            elif words[0] == "element":
                elements.append([int(words[2]), 0])
            elif words[0] == "property" and elements:
                size = None if words[1] == "list" else _PLY_SIZES.get(words[1])
                elements[-1][1] = None if size is None or elements[-1][1] is None else elements[-1][1] + size
            elif words[0] == "end_header":
                break
        else:
            raise UnreadableFileError(f"{path}: PLY header has no end_header")
        data_bytes = path.stat().st_size - f.tell()
        body = f.read() if fmt == "ascii" else b""  # binary: the size says it, no need to read the points twice
    if fmt == "ascii":
        rows = sum(1 for line in body.splitlines() if line.strip())
        if rows < sum(count for count, _ in elements):
            raise UnreadableFileError(f"{path}: truncated PLY ({rows} data lines, header promises more)")
    elif all(size is not None for _, size in elements) and data_bytes < sum(c * s for c, s in elements):
        raise UnreadableFileError(f"{path}: truncated PLY ({data_bytes} data bytes, header promises more)")


def read_points(path: Path, in_chans: int = 3, mesh_points: int = 8192) -> np.ndarray:
    """Points ``[N, in_chans]`` of any supported file: xyz, then normals when ``in_chans == 6``."""
    ext = path.suffix.lower().lstrip(".")
    if ext in ARRAY_EXTENSIONS:
        data = read_array(path)
    else:
        import open3d as o3d

        if ext == "ply":
            check_ply_complete(path)
        if ext in MESH_EXTENSIONS:
            mesh = o3d.io.read_triangle_mesh(str(path))
            if len(mesh.triangles) == 0:
                raise UnreadableFileError(f"{path}: open3d read no triangles (corrupt or empty mesh)")
            cloud = mesh.sample_points_uniformly(number_of_points=mesh_points, use_triangle_normal=True)
        else:
            cloud = o3d.io.read_point_cloud(str(path))
        xyz = np.asarray(cloud.points, dtype=np.float32)
        if len(xyz) == 0:
            raise UnreadableFileError(f"{path}: open3d read no points (corrupt, empty or unsupported file)")
        parts = [xyz]
        if in_chans > 3:
            if not cloud.has_normals():
                raise LayoutError(
                    f"{path} has no normals but in_chans={in_chans}; use in_chans=3 or files with normals"
                )
            parts.append(np.asarray(cloud.normals, dtype=np.float32))
        data = np.concatenate(parts, axis=1)
    if data.shape[1] < in_chans:
        raise LayoutError(f"{path} has {data.shape[1]} values per point but in_chans={in_chans}; lower in_chans")
    if len(data) == 0 or not np.isfinite(data[:, :3]).all():
        raise UnreadableFileError(f"{path}: no points or non-finite coordinates")
    return data[:, :in_chans]


def normalize_unit_sphere(points: np.ndarray) -> np.ndarray:
    """Centre on the centroid and scale the farthest point to radius 1 (xyz only)."""
    out = points.copy()
    out[:, :3] -= out[:, :3].mean(axis=0)
    radius = np.linalg.norm(out[:, :3], axis=1).max()
    out[:, :3] /= radius if radius > 0 else 1.0
    return out


def sample_indices(have: int, want: int, rng: np.random.Generator) -> np.ndarray:
    """``want`` indices out of ``have``: a subset, or every point once plus draws with replacement."""
    if have >= want:
        return rng.choice(have, want, replace=False)
    return np.concatenate([rng.permutation(have), rng.choice(have, want - have, replace=True)])


def augment(points: np.ndarray, rng: np.random.Generator, up_axis: int | None, rotate: bool, jitter: float,
            scale_range: tuple[float, float] = (2 / 3, 3 / 2), isotropic: bool = False,
            translate: float = 0.2) -> np.ndarray:
    """Point-MAE-style scale / translate, plus optional rotation about ``up_axis`` and jitter."""
    out = points.copy()
    scale = rng.uniform(*scale_range, 1 if isotropic else 3).astype(np.float32)
    linear = np.diag(np.broadcast_to(scale, (3,)))
    if rotate and up_axis is not None:
        angle = rng.uniform(0, 2 * np.pi)
        a, b = [i for i in range(3) if i != up_axis]
        rot = np.eye(3, dtype=np.float32)
        rot[a, a], rot[a, b], rot[b, a], rot[b, b] = np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle)
        linear = rot @ linear
    out[:, :3] = out[:, :3] @ linear.T + rng.uniform(-translate, translate, 3).astype(np.float32)
    if jitter > 0:
        out[:, :3] += np.clip(jitter * rng.standard_normal(out[:, :3].shape), -5 * jitter, 5 * jitter)
    if out.shape[1] >= 6:  # normals transform by the inverse transpose, then back to unit length
        normals = out[:, 3:6] @ np.linalg.inv(linear)
        out[:, 3:6] = normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-8)
    return out.astype(np.float32)


class _PointAdapterBase(Adapter):
    """Options and per-cloud processing shared by the classification and segmentation adapters."""

    defaults = {
        **Adapter.defaults,
        "num_points": 1024,
        "num_groups": 64,
        "group_size": 32,
        "in_chans": 3,  # 3: xyz; 6: xyz + normals
        "augment": True,
        "rotate": False,  # rotation about up_axis in training
        "up_axis": 1,  # ShapeNet / ModelNet are y-up
        "jitter": 0.01,
        "scale": (2 / 3, 3 / 2),  # training scale range (Point-MAE classification)
        "isotropic_scale": False,  # one scale for all axes (Point-MAE part segmentation) instead of one per axis
        "translate": 0.2,  # training translation range, per axis
        "mesh_points": 8192,  # points sampled from each mesh before num_points are drawn
        "extensions": POINT_EXTENSIONS,
    }

    def check_options(self) -> None:
        super().check_options()
        o = self.options
        if o["in_chans"] < 3:
            raise OptionError(f"{type(self).__name__}: in_chans={o['in_chans']} must be at least 3 (xyz)")
        if o["num_points"] < max(o["group_size"], o["num_groups"]):
            raise OptionError(
                f"{type(self).__name__}: num_points={o['num_points']} must be at least group_size={o['group_size']} "
                f"and num_groups={o['num_groups']}"
            )

    def process(self, points: np.ndarray, labels: np.ndarray | None, train: bool, index: int):
        """Normalise, sample to ``num_points`` (labels alongside) and augment; returns tensors."""
        o = self.options
        # training: seeded from numpy's global state, which the engine seeds, checkpoints and restores (and
        # DataLoader workers re-seed), so runs repeat and resume exactly; evaluation: fixed per item
        rng = np.random.default_rng(np.random.randint(2**63 - 1, dtype=np.int64) if train else index)
        idx = sample_indices(len(points), o["num_points"], rng)
        points = normalize_unit_sphere(points[idx])
        if train and o["augment"]:
            points = augment(points, rng, o["up_axis"], o["rotate"], o["jitter"], tuple(o["scale"]),
                             o["isotropic_scale"], o["translate"])
        x = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32))
        return x, None if labels is None else torch.from_numpy(labels[idx].astype(np.int64))

    def input_shape(self) -> tuple[int, ...]:
        o = self.options
        return (o["num_points"], o["in_chans"])

    def tokenizer(self, embed_dim: int) -> Tokenizer:
        o = self.options
        return PointGroupTokenizer(o["num_groups"], o["group_size"], o["in_chans"], embed_dim)


@register("point")
class PointAdapter(_PointAdapterBase):
    """Point-cloud classification from ``root/<split>/<class>/<file>``.

    Option ``head``: ``"linear"`` (default: the class token, or the mean of the group tokens, -> Linear),
    ``"probe"`` (MAE's linear-probe head), or ``"pointmae"``: Point-MAE's fine-tuning classifier
    :class:`~pathway.adapters.heads.PointMAEClassificationHead` ([class token, max over the groups] -> MLP,
    ``models/Point_MAE.py:459-469, 546-547``), which needs ``model.cls_token: true``; a Point-MAE fine-tuned
    file's ``cls_head_finetune.*`` load into it.

    Option ``test_votes`` (Point-MAE's voting, ``tools/runner_finetune.py:271-310``): with V > 1, the final test
    scores each cloud V times, every vote a fresh draw of ``num_points`` points scaled and translated as in
    training (``test_transforms``, ``:27-34``), and the predictions of an item's votes are averaged; see
    :meth:`multiview_dataset`. The per-epoch evaluation stays one fixed view per cloud.
    """

    task = "classification"
    metric = "top1"
    heads = {**_PointAdapterBase.heads, "pointmae": PointMAEClassificationHead}
    defaults = {**_PointAdapterBase.defaults, "test_votes": 1}

    def check_options(self) -> None:
        super().check_options()
        if not isinstance(self.options["test_votes"], int) or self.options["test_votes"] < 1:
            raise OptionError(f"PointAdapter: test_votes={self.options['test_votes']!r} must be a whole number >= 1 "
                              f"(1: no voting; Point-MAE votes 10 times)")

    def read_cloud(self, path: Path, key: Any) -> np.ndarray:
        """The points of one file (``key``, its label or vote key, is not needed to read it)."""
        return read_points(path, self.options["in_chans"], self.options["mesh_points"])

    def build_dataset(self, split: str, train: bool) -> Dataset:
        def augment(points: np.ndarray, label: int, index: int) -> tuple[Tensor, int]:
            return self.process(points, None, train, index)[0], label

        return FileDataset(self.folder_samples(split), self.read_cloud, augment, self)

    def test_views(self) -> list[int]:
        """The votes of the final test (one view: no multi-view test)."""
        return list(range(self.options["test_votes"]))

    def multiview_dataset(self, split: str) -> Dataset:
        """The voting test, one vote per item: item ``v + V * j`` is vote ``v`` of cloud ``j`` as ``(x, label, j)``,
        its points and its scale / translation drawn from a generator seeded by ``(j, v)`` (the same every run);
        each file is read once for its V votes."""
        if self.root is None:
            raise LayoutError("PointAdapter.spec(...) has no data; build it with PointAdapter(root, ...)")
        o = self.options
        votes = len(self.test_views())

        def one_vote(points: np.ndarray, label: int, index: int) -> tuple[Tensor, int, int]:
            j, vote = divmod(index, votes)
            rng = np.random.default_rng((j, vote))
            cloud = normalize_unit_sphere(points[sample_indices(len(points), o["num_points"], rng)])
            cloud = augment(cloud, rng, o["up_axis"], False, 0.0, tuple(o["scale"]), o["isotropic_scale"],
                            o["translate"])
            return torch.from_numpy(np.ascontiguousarray(cloud, dtype=np.float32)), label, j

        return FileDataset(self.folder_samples(split), self.read_cloud, one_vote, self, evaluation=True,
                           items_per_file=votes)


def read_part_txt(path: Path, in_chans: int) -> tuple[np.ndarray, np.ndarray]:
    """ShapeNetPart text file: one ``x y z nx ny nz label`` line per point -> (points, labels)."""
    data = read_array(path)
    if data.shape[1] < 4:
        raise UnreadableFileError(f"{path}: expected `x y z [nx ny nz] label` per line, got {data.shape[1]} columns")
    if data.shape[1] - 1 < in_chans:
        raise LayoutError(f"{path} has {data.shape[1] - 1} values per point before the label but in_chans={in_chans}")
    return data[:, :in_chans], data[:, -1].astype(np.int64)


def partnet_categories(root: Path, split: str = "train") -> list[str]:
    """The PartNet categories that have a ``split`` list under ``root/stats/train_val_test_split``: PartNet is
    trained and scored one category at a time (``category`` option), then averaged
    (:func:`pathway.train.metrics.average_over_categories`)."""
    folder = root / "stats" / "train_val_test_split"
    found = sorted(p.name[: -len(f".{split}.json")] for p in folder.glob(f"*.{split}.json"))
    if not found:
        raise LayoutError(f"no PartNet split lists {folder}/<Category>.{split}.json; expected PartNet's stats folder")
    return found


def read_partnet(root: Path, category: str, split: str) -> list[tuple[Path, Path]]:
    """``[(points_file, labels_file)]`` of one PartNet category and split.

    Assumed layout (PartNet v0 release, ``data_v0`` + the ``stats`` folder of the PartNet repository)::

        root/stats/train_val_test_split/<Category>.<split>.json   # [{"anno_id": "...", ...}, ...]
        root/data_v0/<anno_id>/point_sample/pts-10000.txt         # "x y z" per line
        root/data_v0/<anno_id>/point_sample/label-10000.txt       # one integer label per line

    Labels are used as stored (option ``level: null``): files whose labels you mapped to one level beforehand,
    from 0 to ``num_classes - 1``. PartNet's own files hold ``result.json`` leaf ids: read them with ``level``
    set, which maps them (:mod:`pathway.adapters.partnet`).
    """
    listing = root / "stats" / "train_val_test_split" / f"{category}.{split}.json"
    if not listing.is_file():
        raise LayoutError(
            f"PartNet split list {listing} not found; expected root/stats/train_val_test_split/<Category>.<split>.json"
        )
    pairs = []
    for entry in json.loads(listing.read_text()):
        folder = root / "data_v0" / str(entry["anno_id"]) / "point_sample"
        pts, lab = folder / "pts-10000.txt", folder / "label-10000.txt"
        if not (pts.is_file() and lab.is_file()):
            raise LayoutError(f"{listing}: anno_id {entry['anno_id']} has no {pts} / {lab}; fix the list or the data")
        pairs.append((pts, lab))
    return pairs


# ShapeNetPart's 16 categories and the part labels each owns (Point-MAE segmentation/main.py, seg_classes),
# in the order of the release's synsetoffset2category.txt (the category index of the one-hot).
SHAPENETPART_PARTS: dict[str, list[int]] = {
    "Airplane": [0, 1, 2, 3], "Bag": [4, 5], "Cap": [6, 7], "Car": [8, 9, 10, 11], "Chair": [12, 13, 14, 15],
    "Earphone": [16, 17, 18], "Guitar": [19, 20, 21], "Knife": [22, 23], "Lamp": [24, 25, 26, 27], "Laptop": [28, 29],
    "Motorbike": [30, 31, 32, 33, 34, 35], "Mug": [36, 37], "Pistol": [38, 39, 40], "Rocket": [41, 42, 43],
    "Skateboard": [44, 45, 46], "Table": [47, 48, 49],
}
# Split names that stand for several official lists (Point-MAE trains on trainval, tests on test).
COMBINED_SPLITS = {"trainval": ("train", "val")}


def shapenetpart_files(root: Path, split: str) -> list[Path]:
    """Files of a ShapeNetPart split (``train``, ``val``, ``test`` or ``trainval``) from the official lists
    ``root/train_test_split/shuffled_<split>_file_list.json`` (entries ``shape_data/<synset>/<id>``)."""
    files: list[Path] = []
    for part in COMBINED_SPLITS.get(split, (split,)):
        listing = root / "train_test_split" / f"shuffled_{part}_file_list.json"
        if not listing.is_file():
            raise LayoutError(f"ShapeNetPart split list {listing} not found (layout='shapenetpart'; splits: train, "
                              f"val, test, or trainval = train + val)")
        files += [root / Path(*Path(e).parts[1:]).with_suffix(".txt") for e in json.loads(listing.read_text())]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise LayoutError(f"the {split!r} split lists of {root} name {len(missing)} missing files, e.g. {missing[0]}")
    return files


@register("point_part")
class PointPartAdapter(_PointAdapterBase):
    """Part segmentation: per-point labels, ``y [num_points]`` long, head -> ``[B, num_points, C]``.

    Layouts (option ``layout``):

    * ``"folders"`` (default): ``root/<split>/<category>/*.txt`` in ShapeNetPart's text format
      (``x y z nx ny nz label`` per line); the category is the folder name.
    * ``"shapenetpart"``: the official ``shapenetcore_partanno_segmentation_benchmark_v0_normal`` release,
      ``root/train_test_split/shuffled_<split>_file_list.json`` listing ``shape_data/<synset>/<id>``, files
      at ``root/<synset>/<id>.txt``; 50 part labels; split ``trainval`` is train + val (Point-MAE trains on
      it and tests on ``test``). Metric ``shapenetpart_miou``: each shape's prediction restricted to its
      category's parts (the category owning its first point's label, as Point-MAE), instance and class mIoU.
    * ``"partnet"`` (the raw ``data_v0`` release, its leaf ids mapped to ``level``) and ``"partnet_h5"`` (the
      ``sem_seg_h5`` release, already at its level): PartNet, one ``category`` at a time, labels 0 (other) to K
      at ``level`` (3: the fine-grained parts), see :mod:`pathway.adapters.partnet`; ``level: null`` reads
      data_v0 files whose labels were mapped beforehand (:func:`read_partnet`). Metric ``partnet_miou``
      (part-category mIoU, :func:`pathway.train.metrics.part_category_miou`);
      ``python -m pathway.train.jobs.partnet_sweep`` runs every category and averages.

    ``num_classes`` (part labels) defaults to 50 for ShapeNetPart, to K + 1 from PartNet's level file, else it is
    read from the training files.
    """

    task = "segmentation"
    defaults = {**_PointAdapterBase.defaults, "layout": "folders", "category": None, "num_classes": None,
                "level": None,  # PartNet: the level scored (1 coarse, 2 middle, 3 fine); None: labels as stored
                "extensions": ("txt",),
                "head": "interpolate",  # "interpolate" (SegmentationHead) or "pointmae" (Point-MAE's head)
                "category_onehot": False,  # shapenetpart: append the shape category's one-hot to every point
                # Point-MAE segmentation/main.py's training augmentation (provider.py)
                "scale": (0.8, 1.25), "isotropic_scale": True, "translate": 0.1, "jitter": 0.0,
                }
    heads = {"interpolate": SegmentationHead, "pointmae": PointMAESegmentationHead}
    LAYOUTS = ("folders", "shapenetpart", "partnet", "partnet_h5")
    METRICS = {"folders": "miou", "shapenetpart": "shapenetpart_miou", "partnet": "partnet_miou",
               "partnet_h5": "partnet_miou"}

    @property
    def metric(self) -> str:  # type: ignore[override]
        """The layout's evaluation protocol (see :class:`pathway.train.metrics.MetricAccumulator`)."""
        return self.METRICS[self.options["layout"]]

    def check_options(self) -> None:
        super().check_options()
        o = self.options
        if o["layout"] not in self.LAYOUTS:
            raise OptionError(f"PointPartAdapter: layout={o['layout']!r} is not one of {self.LAYOUTS}")
        if self.is_partnet and not o["category"]:
            raise OptionError(f"PointPartAdapter: layout={o['layout']!r} needs category=<PartNet category>, e.g. "
                              f"'Chair'")
        if self.is_partnet and o["level"] not in (*partnet.LEVELS, None):
            raise OptionError(f"PointPartAdapter: level={o['level']!r} is not one of PartNet's levels {partnet.LEVELS}")
        if o["layout"] == "partnet_h5" and o["level"] is None:
            raise OptionError("PointPartAdapter: layout='partnet_h5' needs level=<1, 2 or 3> (sem_seg_h5/<Category>-"
                              "<level>/)")
        if o["category_onehot"] and o["layout"] != "shapenetpart":
            raise OptionError(f"PointPartAdapter: category_onehot needs layout='shapenetpart' (the category of each "
                              f"shape comes from its synset folder), not layout={o['layout']!r}")

    @property
    def is_partnet(self) -> bool:
        return self.options["layout"] in ("partnet", "partnet_h5")

    @property
    def num_categories(self) -> int:
        """Width of the category one-hot appended to each point (0 without ``category_onehot``)."""
        if not self.options["category_onehot"]:
            return 0
        return len(self.category_synsets()) if self.root is not None else len(SHAPENETPART_PARTS)

    def category_synsets(self) -> list[str]:
        """Synset ids in the order of ``root/synsetoffset2category.txt`` (the one-hot order, as Point-MAE)."""
        path = self.root / "synsetoffset2category.txt"
        if not path.is_file():
            raise LayoutError(f"{path} not found: the ShapeNetPart release lists its categories there "
                              f"(`Airplane<TAB>02691156` per line); category_onehot needs it")
        return [line.split()[1] for line in path.read_text().splitlines() if line.strip()]

    def samples(self, split: str) -> list[tuple[Path, Path | None]]:
        """``[(points_file, labels_file or None when the labels are the last column)]``."""
        o = self.options
        if o["layout"] == "partnet" and o["level"] is None:
            return read_partnet(self.root, o["category"], split)
        if o["layout"] == "partnet":
            return partnet.data_v0_samples(self.root, o["category"], split)
        if o["layout"] == "partnet_h5":
            return partnet.sem_seg_h5_samples(self.root, o["category"], o["level"], split)
        if o["layout"] == "shapenetpart":
            return [(f, None) for f in shapenetpart_files(self.root, split)]
        folder = split_dir(self.root, split)
        files = list_files(folder, o["extensions"])
        if not files:
            raise LayoutError(f"no {o['extensions']} files under {folder}/<category>/")
        return [(f, None) for f in files]

    def find_classes(self) -> list[str]:
        o = self.options
        if o["classes"]:
            return list(o["classes"])
        n = o["num_classes"] or (50 if o["layout"] == "shapenetpart" else None)
        if n is None and self.is_partnet and o["level"] is not None:  # "other" + the level's parts
            n = 1 + len(partnet.level_parts(self.root, o["category"], o["level"]))
        if n is None:  # read every training file once: set num_classes to skip this on big data sets
            n = 0
            for points_file, labels_file in self.samples(o["train_split"]):
                try:
                    n = max(n, 1 + int(self.read(points_file, labels_file)[1].max()))
                except (OSError, ValueError) as e:
                    raise UnreadableFileError(
                        f"{labels_file or points_file}: cannot read it to count the part classes ({e}); fix or remove "
                        f"the file, or pass num_classes=... (or classes=[...]) so no file is read for that") from e
        return [str(i) for i in range(n)]

    def read(self, points_file: Path, labels_file: Path | int | None) -> tuple[np.ndarray, np.ndarray]:
        """``(points [N, in_chans], labels [N])`` of one sample: a ShapeNetPart text file (labels last), a
        sem_seg_h5 file and row, or a points file and a labels file (PartNet data_v0: leaf ids, mapped)."""
        o = self.options
        if o["layout"] == "partnet_h5":
            points, labels = partnet.read_sem_seg_h5(points_file, labels_file)
            return points[:, : o["in_chans"]], labels
        if labels_file is None:
            return read_part_txt(points_file, o["in_chans"])
        points = read_array(points_file)
        if points.shape[1] < o["in_chans"]:
            raise LayoutError(f"{points_file} has {points.shape[1]} values per point but in_chans={o['in_chans']}; "
                              f"lower in_chans")
        points = points[:, : o["in_chans"]]
        labels = np.loadtxt(labels_file, dtype=np.int64, ndmin=1)
        if len(labels) != len(points):
            raise UnreadableFileError(f"{labels_file}: {len(labels)} labels for {len(points)} points in {points_file}")
        if o["layout"] == "partnet" and o["level"] is not None:
            labels = self.level_labels(points_file.parents[1] / "result.json", labels)
        return points, labels

    @functools.cached_property
    def level_labels(self) -> partnet.LevelLabels:
        """PartNet data_v0: the map from ``result.json`` leaf ids to the labels of ``level``."""
        return partnet.LevelLabels(self.root, self.options["category"], self.options["level"])

    def build_dataset(self, split: str, train: bool) -> Dataset:
        synsets = self.category_synsets() if self.options["category_onehot"] else []

        def read(path: Path, labels_file: Path | None) -> tuple[np.ndarray, np.ndarray, str]:
            points, labels = self.read(path, labels_file)
            if labels.min() < 0 or labels.max() >= self.num_classes:
                raise LayoutError(
                    f"{path}: part labels {labels.min()}..{labels.max()} outside 0..{self.num_classes - 1}; "
                    f"set num_classes"
                )
            return points, labels, path.parent.name  # ShapeNetPart: the folder is the category's synset

        def augment(
            data: tuple[np.ndarray, np.ndarray, str], labels_file: Path | None, index: int
        ) -> tuple[Tensor, Tensor]:
            points, labels, synset = data
            x, y = self.process(points, labels, train, index)
            return (self.with_category(x, synsets, synset) if synsets else x), y

        return FileDataset(self.samples(split), read, augment, self)

    @staticmethod
    def with_category(x: Tensor, synsets: list[str], synset: str) -> Tensor:
        """``x [N, C]`` -> ``[N, C + len(synsets)]``: the shape's category one-hot appended to every point."""
        if synset not in synsets:
            raise LayoutError(f"synset folder {synset!r} is not listed in synsetoffset2category.txt ({synsets})")
        onehot = torch.zeros(x.shape[0], len(synsets))
        onehot[:, synsets.index(synset)] = 1.0
        return torch.cat([x, onehot], dim=1)

    def input_shape(self) -> tuple[int, ...]:
        o = self.options
        return (o["num_points"], o["in_chans"] + self.num_categories)

    def tokenizer(self, embed_dim: int) -> Tokenizer:
        o = self.options
        return PointGroupTokenizer(o["num_groups"], o["group_size"], o["in_chans"], embed_dim,
                                   num_categories=self.num_categories)

    def head(self, embed_dim: int) -> nn.Module:
        if self.options["head"] == "pointmae":
            return PointMAESegmentationHead(embed_dim, self.num_classes, num_categories=self.num_categories)
        return super().head(embed_dim)
