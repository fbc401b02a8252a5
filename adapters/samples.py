"""A data set's item list ``[(path, label)]`` held in a few numpy arrays instead of Python objects.

A Python list of ``(Path, label)`` tuples costs about 490 bytes per item (the tuple, the ``Path`` with its
cached string and parts, the int) and, worse, is copied page by page into every DataLoader worker: reading
an item touches the reference counts of its objects, which writes to the pages that hold them. At ImageNet's
1.28 M items that is ~0.6 GB per worker. :class:`SampleList` keeps the same items as

* the paths' common folder once, and the rest of each path as UTF-8 bytes in one ``uint8`` array with an
  ``int64`` array of end offsets (``os.fsencode``, so undecodable file names survive);
* the labels as one ``int64`` array (one class per item), or a flat ``int64`` array with end offsets (a list
  of classes per item, AudioSet style); labels of any other kind stay a Python list.

Indexing builds ``(Path, label)`` on the fly, so callers see the list they gave.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def is_class_index(label: Any) -> bool:
    return isinstance(label, (int, np.integer)) and not isinstance(label, bool)


class PackedBytes:
    """Byte strings end to end in one ``uint8`` array, with their ``int64`` end offsets."""

    def __init__(self, chunks: Sequence[bytes]) -> None:
        self.data = np.frombuffer(b"".join(chunks), dtype=np.uint8)
        self.ends = np.cumsum([len(c) for c in chunks], dtype=np.int64)

    def __getitem__(self, i: int) -> bytes:
        start = int(self.ends[i - 1]) if i else 0
        return self.data[start : int(self.ends[i])].tobytes()

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.ends.nbytes


class PackedLabels:
    """Labels in arrays: one class index per item, or a list of class indices per item; else a Python list."""

    def __init__(self, labels: Sequence[Any]) -> None:
        self.kind = "objects"
        if all(is_class_index(label) for label in labels):
            self.kind, self.values = "index", np.asarray(labels, dtype=np.int64)
        elif all(isinstance(label, list) and all(map(is_class_index, label)) for label in labels):
            self.kind = "indices"
            self.values = np.asarray([c for label in labels for c in label], dtype=np.int64)
            self.ends = np.cumsum([len(label) for label in labels], dtype=np.int64)
        else:
            self.values = list(labels)

    def __getitem__(self, i: int) -> Any:
        if self.kind == "index":
            return int(self.values[i])
        if self.kind == "indices":
            start = int(self.ends[i - 1]) if i else 0
            return self.values[start : int(self.ends[i])].tolist()
        return self.values[i]

    @property
    def nbytes(self) -> int:
        if self.kind == "objects":
            return 8 * len(self.values)  # the list's pointers; the objects themselves are not counted
        return self.values.nbytes + (self.ends.nbytes if self.kind == "indices" else 0)


class SampleList(Sequence):
    """``[(path, label)]`` in numpy arrays (see the module docstring); ``len``, indexing and iteration as a list."""

    def __init__(self, samples: Iterable[tuple[Path, Any]]) -> None:
        samples = list(samples)
        texts = [str(path) for path, _ in samples]
        self.root = common_folder(texts)
        cut = len(self.root) + (0 if not self.root or self.root.endswith(os.sep) else 1)
        self.paths = PackedBytes([os.fsencode(text[cut:]) for text in texts])
        self.labels = PackedLabels([label for _, label in samples])
        self._length = len(samples)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, i: int) -> tuple[Path, Any]:  # type: ignore[override]
        if not -self._length <= i < self._length:
            raise IndexError(f"sample {i} of a list of {self._length}")
        i %= self._length
        return Path(self.root, os.fsdecode(self.paths[i])), self.labels[i]

    def __iter__(self) -> Iterator[tuple[Path, Any]]:
        return (self[i] for i in range(self._length))

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (the measure of compactness; the folder string is counted too)."""
        return self.paths.nbytes + self.labels.nbytes + len(self.root)


def common_folder(texts: Sequence[str]) -> str:
    """The deepest folder holding every path of ``texts`` ('' when they share none)."""
    folders = {text.rpartition(os.sep)[0] for text in texts}
    if not folders:
        return ""
    try:
        return os.path.commonpath(folders)
    except ValueError:  # absolute and relative paths mixed
        return ""
