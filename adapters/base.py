"""The adapter contract (docs/contracts.md, section 3) and the dataset that survives bad files.

An adapter turns a folder or manifest of one modality's files into ``(x, y)`` items, and names the
tokenizer, head and metric that go with them. Its options come from a recipe's ``data:`` section, so an
unknown option is an error that lists the known ones (a typo must not silently fall back to a default).

Long runs must not die on one bad file: :class:`FileDataset` catches a failed read, counts it in
``adapter.skipped`` (shared with DataLoader workers), warns once per path and returns the next readable
sample; ``strict=True`` raises :class:`UnreadableFileError` naming the file instead.
"""

from __future__ import annotations

import multiprocessing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from pathway.errors import OptionError, PathwayError
from pathway.tokenizers.base import Tokenizer

from .heads import ClassificationHead


class AdapterError(PathwayError):
    """Base of the adapters' errors."""


class LayoutError(AdapterError):
    """Files or folders are not laid out as the adapter expects; the message names the path and the fix."""


class UnreadableFileError(AdapterError):
    """A file exists but cannot be decoded (corrupt, truncated, empty, wrong format)."""


class Adapter:
    """One modality's files -> datasets of ``(x, y)``, plus its tokenizer, head and metric.

    Subclasses set ``name`` (via :func:`pathway.adapters.register`), ``task``, ``metric``, extend
    ``defaults`` with their options and implement :meth:`find_classes`, :meth:`build_dataset` and
    :meth:`tokenizer` (and :meth:`check_options` when some values are invalid).
    """

    name: ClassVar[str]
    task: ClassVar[str]  # "classification" | "multilabel" | "segmentation"
    metric: ClassVar[str]  # "top1" | "map" | "miou"
    defaults: ClassVar[dict[str, Any]] = {
        "strict": False,  # raise on an unreadable file instead of skipping it
        "classes": None,  # explicit class list; None: found from the data (class folders or the manifest)
        "train_split": "train",  # the split whose folders or manifest define the classes
    }
    num_classes: int
    classes: list[str]

    def __init__(self, root: str | Path, **options: Any) -> None:
        self._configure(options)
        self.root: Path | None = Path(root)
        if not self.root.exists():
            raise LayoutError(
                f"{type(self).__name__}: data root {self.root} does not exist; pass the folder that holds the data"
            )
        self.classes = list(self.find_classes())
        self.num_classes = len(self.classes)

    @classmethod
    def spec(cls, num_classes: int, **options: Any) -> Adapter:
        """An adapter without data that builds ``tokenizer()`` and ``head()`` (dry runs, model inspection)."""
        self = cls.__new__(cls)
        self._configure(options)
        self.root = None
        given = self.options.get("classes")
        if given and len(given) != num_classes:
            raise OptionError(f"{cls.__name__}.spec: num_classes={num_classes} but `classes` lists {len(given)}")
        self.classes = list(given) if given else [str(i) for i in range(num_classes)]
        self.num_classes = num_classes
        return self

    def _configure(self, options: dict[str, Any]) -> None:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise OptionError(f"{type(self).__name__}: unknown option(s) {unknown}; allowed: {sorted(self.defaults)}")
        self.options: dict[str, Any] = {**self.defaults, **options}
        self.check_options()
        # Shared memory so that skips inside DataLoader worker processes are counted here too.
        self._skipped = multiprocessing.Value("i", 0)
        self._manifests: dict[tuple[str, int, int], list[tuple[Path, list[str]]]] = {}
        self._class_index: dict[str, int] | None = None

    @property
    def skipped(self) -> int:
        """Files skipped as unreadable so far (all workers together)."""
        return int(self._skipped.value)

    def check_options(self) -> None:
        """Raise :class:`OptionError` for option values the adapter cannot use."""

    def find_classes(self) -> list[str]:
        """Class names, in label order: the ``classes`` option, else the class folders of the training split.

        Adapters that read manifests (audio, video) override this.
        """
        from .layout import folder_classes

        o = self.options
        return folder_classes(self.root, o["classes"], o["train_split"], o["extensions"])

    def manifest_path(self, split: str) -> Path:
        """``root/<split>.csv``: the manifest of a split, for adapters that read manifests."""
        return self.root / f"{split}.csv"

    def manifest_rows(self, split: str) -> list[tuple[Path, list[str]]] | None:
        """``(file, labels)`` rows of the split's manifest, or None without one.

        Read and checked once while the file is unchanged (finding the classes and building the
        training set both need it); an edited manifest is read again.
        """
        from .layout import read_manifest

        path = self.manifest_path(split)
        if not path.is_file():
            return None
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        if key not in self._manifests:
            self._manifests[key] = read_manifest(path)
        return self._manifests[key]

    def label_index(self, labels: list[str], where: str) -> list[int]:
        """Class indices of ``labels``; a label outside the class list is an error naming ``where``."""
        from .layout import label_indices

        if self._class_index is None:   # the class list is final once the adapter is built
            self._class_index = {c: i for i, c in enumerate(self.classes)}
        return label_indices(labels, self._class_index, where)

    def folder_samples(self, split: str) -> list[tuple[Path, int]]:
        """``(file, label)`` for every file of ``root/split/<class>/``, in the folder-per-class layout."""
        from .layout import scan_class_folders, split_dir

        return scan_class_folders(split_dir(self.root, split), self.options["extensions"], self.classes)

    def dataset(self, split: str, train: bool) -> Dataset:
        """Items ``(x, y)`` of ``split``; ``train`` turns on augmentation."""
        if self.root is None:
            raise LayoutError(f"{type(self).__name__}.spec(...) has no data; build it with {type(self).__name__}(root, ...)")
        return self.build_dataset(split, train)

    def build_dataset(self, split: str, train: bool) -> Dataset:
        raise NotImplementedError

    def tokenizer(self, embed_dim: int) -> Tokenizer:
        raise NotImplementedError

    def input_shape(self) -> tuple[int, ...]:
        """Shape of one training item's ``x`` (no batch dimension), from the options alone."""
        raise NotImplementedError

    def example_input(self) -> torch.Tensor:
        """A random ``x`` of the right shape: what ``pathway.connect`` runs when it needs example inputs
        and there is no data at hand (dry runs, ``pathway inspect``)."""
        return torch.randn(self.input_shape())

    def head(self, embed_dim: int) -> nn.Module:
        """Mean-pool + Linear on the model's final LayerNorm; multilabel heads are the same, logits for BCE."""
        return ClassificationHead(embed_dim, self.num_classes)

    def record_skip(self, path: Path, error: BaseException) -> None:
        """Count one unreadable file and warn about it (callers report each file once)."""
        with self._skipped.get_lock():
            self._skipped.value += 1
        warnings.warn(
            f"{type(self).__name__}: skipping unreadable file {path} ({type(error).__name__}: {error}); "
            f"pass strict=True to stop on it instead",
            stacklevel=3,
        )


class FileDataset(Dataset):
    """Items ``load(path, label, index) -> (x, y)`` over a list of ``(path, label)``, skipping unreadable files.

    ``index`` lets evaluation transforms be deterministic per sample (e.g. seeded point sampling).
    A file that failed once is marked in shared memory, so that it is counted and warned about once
    and never decoded again, whichever worker meets it.
    """

    def __init__(
        self,
        samples: list[tuple[Path, Any]],
        load: Callable[[Path, Any, int], tuple[Tensor, Any]],
        adapter: Adapter,
    ) -> None:
        if not samples:
            raise LayoutError(f"{type(adapter).__name__}: no samples found under {adapter.root}")
        self.samples = samples
        self.load = load
        self.adapter = adapter
        self._bad = multiprocessing.Array("b", len(samples))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, Any]:
        for step in range(len(self.samples)):
            i = (index + step) % len(self.samples)
            if self._bad[i]:
                continue
            path, label = self.samples[i]
            try:
                return self.load(path, label, i)
            except (LayoutError, OptionError):
                raise  # a wrong set-up, not a bad file: skipping would hide it on every file
            except Exception as error:  # the reading libraries raise anything from OSError to RuntimeError
                if self.adapter.options["strict"]:
                    if isinstance(error, UnreadableFileError):
                        raise
                    raise UnreadableFileError(f"cannot read {path}: {type(error).__name__}: {error}") from error
                with self._bad.get_lock():
                    first = not self._bad[i]
                    self._bad[i] = 1
                if first:
                    self.adapter.record_skip(path, error)
        raise UnreadableFileError(f"{type(self.adapter).__name__}: none of the {len(self.samples)} files could be read")
