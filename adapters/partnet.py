"""PartNet semantic segmentation at one level of its hierarchy, in the two layouts PartNet distributes.

PartNet (Mo et al., CVPR 2019) is scored per category and per level (1 coarse, 2 middle, 3 fine): label 0 is
"other", labels 1..K are the lines of ``stats/after_merging_label_ids/<Category>-level-<level>.txt``
(K + 1 classes: daerduoCarey/partnet_seg_exps ``exps/sem_seg_pointcnn/train_val_seg.py:70-71``). Sources
read: daerduoCarey/partnet_dataset f321bc9 (``README.md:76-120``, ``scripts/gen_h5_ins_seg_after_merging.py``)
and daerduoCarey/partnet_seg_exps 2df953c.

``sem_seg_h5`` (``sem_seg_h5.zip`` of the release, the benchmark's files; ``data/README.md:5``)::

    root/sem_seg_h5/<Category>-<level>/{train,val,test}_files.txt   # one .h5 name per line (train_val_seg.py:66-67)
    root/sem_seg_h5/<Category>-<level>/<split>-<nn>.h5               # data [N, 10000, 3], label_seg [N, 10000]
    root/stats/after_merging_label_ids/<Category>-level-<level>.txt  # (data_utils.py:153-167)

``data_v0`` (the raw annotation; the labels are leaf ids of ``result.json`` and are mapped to the level here,
as ``gen_h5_ins_seg_after_merging.py:23-25, 66-78`` maps them: a node whose path the merging table maps onto a part
of the level gives that label to every leaf under it, a deeper node overriding its ancestors)::

    root/stats/train_val_test_split/<Category>.<split>.json          # [{"anno_id": ...}, ...]
    root/stats/merging_hierarchy_mapping/<Category>.txt              # "<raw path> <merged path>" per line
    root/data_v0/<anno_id>/result.json                               # the part tree: id, name, children / objs
    root/data_v0/<anno_id>/point_sample/sample-points-all-pts-nor-rgba-10000.txt
    root/data_v0/<anno_id>/point_sample/sample-points-all-label-10000.txt   # a result.json leaf id per point
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .base import LayoutError, UnreadableFileError

LEVELS = (1, 2, 3)
POINTS_FILE = "sample-points-all-pts-nor-rgba-10000.txt"  # the points the release's h5 files are made from
LABELS_FILE = "sample-points-all-label-10000.txt"


def level_file(root: Path, category: str, level: int) -> Path:
    return root / "stats" / "after_merging_label_ids" / f"{category}-level-{level}.txt"


def level_parts(root: Path, category: str, level: int) -> list[str]:
    """The part paths of ``category`` at ``level``, in label order: part ``i`` is label ``i + 1`` (0 is other)."""
    path = level_file(root, category, level)
    if not path.is_file():
        have = sorted(p.name for p in path.parent.glob(f"{category}-level-*.txt")) if path.parent.is_dir() else []
        raise LayoutError(f"{path} not found: PartNet's stats folder (daerduoCarey/partnet_dataset stats/) lists the "
                          f"parts of each category and level there; {category} has {have or 'no level files'}: "
                          f"set data.options.level to one of them or put the stats folder under {root}")
    parts = [line.split()[1] for line in path.read_text().splitlines() if line.strip()]
    if not parts:
        raise LayoutError(f"{path} lists no parts (expected `<id> <part path> <type>` per line)")
    return parts


def categories(root: Path, level: int, layout: str) -> list[str]:
    """The categories of ``root`` that can be scored at ``level``: a level file, and the layout's data for it."""
    found = sorted(p.name[: -len(f"-level-{level}.txt")]
                   for p in (root / "stats" / "after_merging_label_ids").glob(f"*-level-{level}.txt"))
    if layout == "partnet_h5":
        found = [c for c in found if (root / "sem_seg_h5" / f"{c}-{level}").is_dir()]
    else:
        found = [c for c in found if (root / "stats" / "train_val_test_split" / f"{c}.train.json").is_file()]
    if not found:
        raise LayoutError(f"no PartNet category of {root} has level {level}: expected "
                          f"stats/after_merging_label_ids/<Category>-level-{level}.txt and, for layout {layout!r}, "
                          + ("sem_seg_h5/<Category>-<level>/" if layout == "partnet_h5"
                             else "stats/train_val_test_split/<Category>.train.json"))
    return found


class LevelLabels:
    """Maps a data_v0 shape's per-point ``result.json`` leaf ids to the labels of one level (0: other)."""

    def __init__(self, root: Path, category: str, level: int) -> None:
        table = root / "stats" / "merging_hierarchy_mapping" / f"{category}.txt"
        if not table.is_file():
            raise LayoutError(f"{table} not found: PartNet's stats folder maps each annotated node path to its "
                              f"merged part there; layout 'partnet' (data_v0) needs it to read level {level}")
        self.merged = dict(line.split()[:2] for line in table.read_text().splitlines() if line.strip())
        self.label_of = {part: i + 1 for i, part in enumerate(level_parts(root, category, level))}

    def leaf_labels(self, tree: dict[str, Any], prefix: str = "") -> dict[int, int]:
        """``{leaf id: label}`` under ``tree``; a node on the level labels its leaves, deeper nodes override."""
        path = f"{prefix}/{tree['name']}" if prefix else tree["name"]
        label = self.label_of.get(self.merged.get(path, ""))
        out = {leaf: label for leaf in leaf_ids(tree)} if label is not None else {}
        for child in tree.get("children", ()):
            out.update(self.leaf_labels(child, path))
        return out

    def __call__(self, result_json: Path, leaf_of_point: np.ndarray) -> np.ndarray:
        try:
            tree = json.loads(result_json.read_text())[0]
        except (OSError, ValueError, IndexError, KeyError) as e:
            raise UnreadableFileError(f"{result_json}: cannot read the part tree ({e})") from e
        table = self.leaf_labels(tree)
        return np.array([table.get(int(leaf), 0) for leaf in leaf_of_point], dtype=np.int64)


def leaf_ids(tree: dict[str, Any]) -> list[int]:
    """The ids of the leaves (nodes with ``objs``) under ``tree``, itself included."""
    if "children" in tree:
        return [leaf for child in tree["children"] for leaf in leaf_ids(child)]
    return [int(tree["id"])]


def data_v0_samples(root: Path, category: str, split: str) -> list[tuple[Path, Path]]:
    """``[(points file, leaf-id file)]`` of one category and split of the data_v0 layout."""
    listing = root / "stats" / "train_val_test_split" / f"{category}.{split}.json"
    if not listing.is_file():
        raise LayoutError(f"PartNet split list {listing} not found; expected "
                          f"root/stats/train_val_test_split/<Category>.<split>.json (layout 'partnet', data_v0)")
    pairs = []
    for entry in json.loads(listing.read_text()):
        folder = root / "data_v0" / str(entry["anno_id"])
        pts, lab = folder / "point_sample" / POINTS_FILE, folder / "point_sample" / LABELS_FILE
        missing = [p for p in (pts, lab, folder / "result.json") if not p.is_file()]
        if missing:
            raise LayoutError(f"{listing}: anno_id {entry['anno_id']} has no {missing[0]}; fix the list or the data")
        pairs.append((pts, lab))
    return pairs


def h5_folder(root: Path, category: str, level: int) -> Path:
    return root / "sem_seg_h5" / f"{category}-{level}"


def sem_seg_h5_samples(root: Path, category: str, level: int, split: str) -> list[tuple[Path, int]]:
    """``[(h5 file, row)]``: every shape of the files that ``<split>_files.txt`` lists."""
    h5py = import_h5py()
    listing = h5_folder(root, category, level) / f"{split}_files.txt"
    if not listing.is_file():
        raise LayoutError(f"{listing} not found; layout 'partnet_h5' reads PartNet's sem_seg_h5 release "
                          f"(root/sem_seg_h5/<Category>-<level>/<split>_files.txt)")
    samples = []
    for name in listing.read_text().split():
        path = listing.parent / name
        try:
            with h5py.File(path, "r") as f:
                rows = f["label_seg"].shape[0]
        except (OSError, KeyError) as e:
            raise LayoutError(f"{listing} names {path}, which has no readable label_seg dataset ({e})") from e
        samples += [(path, row) for row in range(rows)]
    return samples


def read_sem_seg_h5(path: Path, row: int) -> tuple[np.ndarray, np.ndarray]:
    """Shape ``row`` of a sem_seg_h5 file: ``data [P, 3]`` float32 and ``label_seg [P]`` int64."""
    with import_h5py().File(path, "r") as f:
        points = np.asarray(f["data"][row], dtype=np.float32)
        labels = np.asarray(f["label_seg"][row], dtype=np.int64)
    if points.ndim != 2 or points.shape[1] < 3 or labels.shape != points.shape[:1]:
        raise UnreadableFileError(f"{path} row {row}: data {points.shape} and label_seg {labels.shape} are not "
                                  f"[P, 3] and [P]")
    return points, labels


def import_h5py():
    try:
        import h5py
    except ImportError as e:
        raise LayoutError("layout 'partnet_h5' reads HDF5 files with h5py, which is not installed: pip install h5py, "
                          "or use layout 'partnet' on PartNet's data_v0 release") from e
    return h5py
