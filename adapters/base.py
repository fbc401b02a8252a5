"""The adapter contract (docs/contracts.md, section 3) and the dataset that survives bad files.

An adapter turns a folder or manifest of one modality's files into ``(x, y)`` items, and names the
tokenizer, head and metric that go with them. Its options come from a recipe's ``data:`` section, so an
unknown option is an error that lists the known ones (a typo must not silently fall back to a default).

Long runs must not die on one bad file, nor lose good files to a failed augmentation. :class:`FileDataset`
makes an item in two steps with two rules: a failure to *read or decode* the file marks that file bad (counted
in ``dataset.unreadable_count()`` and ``adapter.skipped``, shared with DataLoader workers, warned once, never
decoded again); a failure of the random *augmentation* is drawn again and, if it keeps failing, raised as
:class:`AugmentationError` (the file is fine). What takes an unreadable file's place depends on the set: in
training the next readable sample (a batch keeps its size), in evaluation nothing (a :class:`LeftOut` item
that :func:`pathway.train.data.collate` drops), so no file is scored twice and the metric is over the files
that were read. ``strict=True`` raises :class:`UnreadableFileError` on the first bad file; otherwise the run
stops with :class:`TooManyUnreadableFilesError` once more than ``max_unreadable_share`` of a split is unreadable.

The item list is a :class:`~pathway.adapters.samples.SampleList` (numpy arrays, not Python objects), so
DataLoader workers do not copy it page by page as they read.
"""

from __future__ import annotations

import multiprocessing
import warnings
from collections.abc import Callable, Sequence
from numbers import Integral
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from pathway.errors import OptionError, PathwayError
from pathway.tokenizers.base import Tokenizer
from pathway.train.data import Repeated

from .heads import ClassificationHead, LinearProbeHead
from .samples import SampleList


class AdapterError(PathwayError):
    """Base of the adapters' errors."""


class LayoutError(AdapterError):
    """Files or folders are not laid out as the adapter expects; the message names the path and the fix."""


class UnreadableFileError(AdapterError):
    """A file exists but cannot be decoded (corrupt, truncated, empty, wrong format)."""


class TooManyUnreadableFilesError(UnreadableFileError):
    """More than ``max_unreadable_share`` of a split's files are unreadable: the data, not one file, is broken."""


class AugmentationError(AdapterError):
    """The training augmentation failed on a readable file every time it was drawn: a transform bug, not bad data."""


class LeftOut(Repeated):
    """An evaluation item whose file could not be read: it holds no sample, so the batch (and the metric) is
    one item shorter instead of scoring another file twice."""


class Adapter:
    """One modality's files -> datasets of ``(x, y)``, plus its tokenizer, head and metric.

    Subclasses set ``name`` (via :func:`pathway.adapters.register`), ``task``, ``metric``, extend
    ``defaults`` with their options and implement :meth:`find_classes`, :meth:`build_dataset` and
    :meth:`tokenizer` (and :meth:`check_options` when some values are invalid). Options that are sizes or
    counts are named in ``sizes`` (whole numbers >= 1) and ``multiples`` (``(size, unit)``: size a multiple of
    unit); the base check refuses other values by name before anything divides by them.
    """

    name: ClassVar[str]
    task: ClassVar[str]  # "classification" | "multilabel" | "segmentation"
    metric: ClassVar[str]  # "top1" | "map" | "miou"
    defaults: ClassVar[dict[str, Any]] = {
        "strict": False,  # raise on an unreadable file instead of skipping it
        "classes": None,  # explicit class list; None: found from the data (class folders or the manifest)
        "train_split": "train",  # the split whose folders or manifest define the classes
        "max_unreadable_share": 0.05,  # stop when more than this share of a split's files cannot be read
        "head": "linear",  # one of `heads`: "linear" (pooled tokens -> Linear), "probe" (MAE's linear-probe head)
    }
    # head option -> head class, called as cls(embed_dim, num_classes); adapters with other outputs replace it
    heads: ClassVar[dict[str, Callable[[int, int], nn.Module]]] = {
        "linear": ClassificationHead, "probe": LinearProbeHead
    }
    sizes: ClassVar[tuple[str, ...]] = ()  # options that must be whole numbers >= 1
    multiples: ClassVar[tuple[tuple[str, str], ...]] = ()  # (size, unit) option pairs: size % unit == 0
    num_classes: int
    classes: list[str]

    def __init__(self, root: str | Path, **options: Any) -> None:
        self._configure(options)
        self.root: Path | None = Path(root)
        if not self.root.exists():
            from .layout import why_unreachable

            raise LayoutError(
                f"{type(self).__name__}: data root {self.root} cannot be read: {why_unreachable(self.root)}; "
                f"pass the folder that holds the data (data.root)"
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
        """Raise :class:`OptionError` for option values the adapter cannot use (subclasses call super())."""
        o = self.options
        if not 0 <= o["max_unreadable_share"] <= 1:
            raise OptionError(f"{type(self).__name__}: max_unreadable_share={o['max_unreadable_share']} must be "
                              f"a share between 0 and 1 (e.g. 0.05 for 5 per cent)")
        if o["head"] not in self.heads:
            raise OptionError(f"{type(self).__name__}: head={o['head']!r} is not one of {sorted(self.heads)}")
        check_sizes(type(self).__name__, o, self.sizes, self.multiples)

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
        """Items ``(x, y)`` of ``split``; ``train`` turns on augmentation. In an evaluation set (``train=False``)
        an unreadable file's item is :class:`LeftOut`, never another file's."""
        if self.root is None:
            raise LayoutError(
                f"{type(self).__name__}.spec(...) has no data; build it with {type(self).__name__}(root, ...)"
            )
        dataset = self.build_dataset(split, train)
        if isinstance(dataset, FileDataset):
            dataset.evaluation = not train
        return dataset

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
        """Pooled tokens (after the model's final LayerNorm) -> logits; multi-label heads are the same, for BCE.

        ``head="probe"`` is MAE's linear-probe head (non-affine BatchNorm before the Linear), the classifier of
        the paper's "fix" setting."""
        return self.heads[self.options["head"]](embed_dim, self.num_classes)

    def record_skip(self, path: Path, error: BaseException, instead: str) -> None:
        """Count one unreadable file and warn about it, saying what happens ``instead`` (callers report each
        file once)."""
        with self._skipped.get_lock():
            self._skipped.value += 1
        warnings.warn(
            f"{type(self).__name__}: skipping unreadable file {path} ({type(error).__name__}: {error}); {instead}; "
            f"pass strict=True to stop on it instead",
            stacklevel=3,
        )


def check_sizes(owner: str, options: dict[str, Any], sizes: Sequence[str], multiples: Sequence[tuple[str, str]]
                ) -> None:
    """Refuse size options that are not whole numbers >= 1, and sizes that are not multiples of their unit."""
    for key in sizes:
        value = options[key]
        if not isinstance(value, Integral) or isinstance(value, bool) or value < 1:
            raise OptionError(f"{owner}: {key}={value!r} must be a whole number >= 1 (data.options.{key})")
    for size, unit in multiples:
        if options[size] % options[unit]:
            raise OptionError(
                f"{owner}: {size}={options[size]} must be a multiple of {unit}={options[unit]} "
                f"(e.g. {size}={max(1, options[size] // options[unit]) * options[unit]}); change data.options.{size} "
                f"or data.options.{unit}"
            )


class FileDataset(Dataset):
    """Items ``augment(read(path, label), label, index) -> (x, y)`` over ``[(path, label)]``, skipping bad files.

    * ``read(path, label)`` reads and decodes the file. Any failure there means the file is unreadable: it is
      marked in shared memory (counted and warned about once, never decoded again, whichever worker meets it).
      In training the next readable sample is returned; in evaluation (``evaluation=True``, set by
      :meth:`Adapter.dataset` for ``train=False``) a :class:`LeftOut` item, so the file leaves the metric.
    * ``augment(data, label, index)`` makes the item from the decoded data (random augmentation; ``index`` lets
      evaluation transforms be deterministic per sample). A failure there is not the file's fault: the
      augmentation is drawn again (the random state has moved on) up to ``redraws`` times, then
      :class:`AugmentationError` names the file and the error. An :class:`UnreadableFileError` raised inside
      ``augment`` (readers that decode lazily, e.g. video frames) still marks the file.

    ``items_per_file > 1`` makes several items of each file (item ``k`` is made from file ``k // items_per_file``
    and ``augment`` gets ``k``: the views of a multi-view test); an unreadable file is still marked, counted and
    warned about once. More than ``max_unreadable_share`` of the files unreadable stops with
    :class:`TooManyUnreadableFilesError`. ``samples`` is kept as a :class:`~pathway.adapters.samples.SampleList`.
    """

    def __init__(
        self,
        samples: Sequence[tuple[Path, Any]],
        read: Callable[[Path, Any], Any],
        augment: Callable[[Any, Any, int], tuple[Tensor, Any]],
        adapter: Adapter,
        redraws: int = 10,
        evaluation: bool = False,
        items_per_file: int = 1,
    ) -> None:
        if not samples:
            raise LayoutError(f"{type(adapter).__name__}: no samples found under {adapter.root}")
        self.samples = samples if isinstance(samples, SampleList) else SampleList(samples)
        self.read, self.augment = read, augment
        self.adapter = adapter
        self.redraws = redraws
        self.evaluation = evaluation
        self.items_per_file = items_per_file
        self._bad = multiprocessing.Array("b", len(samples))
        self._bad_count = multiprocessing.Value("i", 0)

    def __len__(self) -> int:
        return len(self.samples) * self.items_per_file

    def unreadable_count(self) -> int:
        """Files of this dataset found unreadable so far, all DataLoader workers together (in evaluation: the
        items left out of the metric)."""
        return int(self._bad_count.value)

    def unreadable_share(self) -> float:
        return self.unreadable_count() / len(self.samples)

    def try_read(self, i: int) -> tuple[bool, Any, Any]:
        """``(True, decoded data, label)`` of sample ``i``, or ``(False, None, label)`` once it is marked unreadable."""
        path, label = self.samples[i]
        if self._bad[i]:
            return False, None, label
        try:
            return True, self.read(path, label), label
        except (LayoutError, OptionError):
            raise  # a wrong set-up, not a bad file: skipping would hide it on every file
        except Exception as error:  # the reading libraries raise anything from OSError to RuntimeError
            self.mark_unreadable(i, error)
            return False, None, label

    def read_item(self, index: int) -> tuple[int, Any, Any]:
        """``(i, decoded data, label)`` of the first readable sample from ``index`` on (wrapping around)."""
        for step in range(len(self.samples)):
            i = (index + step) % len(self.samples)
            readable, data, label = self.try_read(i)
            if readable:
                return i, data, label
        raise UnreadableFileError(f"{type(self.adapter).__name__}: none of the {len(self.samples)} files could be read")

    def mark_unreadable(self, i: int, error: BaseException) -> None:
        """Record sample ``i`` as unreadable (or raise: ``strict``, or past ``max_unreadable_share``)."""
        path = self.samples[i][0]
        if self.adapter.options["strict"]:
            if isinstance(error, UnreadableFileError):
                raise error
            raise UnreadableFileError(f"cannot read {path}: {type(error).__name__}: {error}") from error
        with self._bad.get_lock():
            first = not self._bad[i]
            self._bad[i] = 1
            if first:
                with self._bad_count.get_lock():
                    self._bad_count.value += 1
        if not first:
            return
        instead = ("left out of the evaluation (the metric is over the files read)" if self.evaluation
                   else "the next readable file takes its place in training")
        self.adapter.record_skip(path, error, instead)
        limit = self.adapter.options["max_unreadable_share"]
        if self.unreadable_count() > limit * len(self.samples):
            raise TooManyUnreadableFilesError(
                f"{type(self.adapter).__name__}: {self.unreadable_count()} of the {len(self.samples)} files under "
                f"{self.adapter.root} are unreadable, more than max_unreadable_share={limit:g}; the latest: {path} "
                f"({type(error).__name__}: {error}). Fix or remove the files, or raise "
                f"data.options.max_unreadable_share"
            ) from error

    def __getitem__(self, index: int) -> tuple[Tensor, Any] | LeftOut:
        if not -len(self) <= index < len(self):
            raise IndexError(f"item {index} of {len(self)}")
        file, view = divmod(index % len(self), self.items_per_file)
        while True:
            if self.evaluation:
                readable, data, label = self.try_read(file)
                if not readable:
                    return LeftOut()
                i = file
            else:
                i, data, label = self.read_item(file)
            item = self.augmented(i, i * self.items_per_file + view, data, label)
            if item is not None:
                return item
            if self.evaluation:
                return LeftOut()

    def augmented(self, i: int, index: int, data: Any, label: Any) -> Any:
        """``augment(data, label, index)`` for item ``index`` of file ``i``, drawn again when it fails; None when
        the file proved unreadable there."""
        error: BaseException | None = None
        for _ in range(1 + self.redraws):
            try:
                return self.augment(data, label, index)
            except (LayoutError, OptionError):
                raise
            except UnreadableFileError as unreadable:  # decoded lazily, inside the transform
                if isinstance(unreadable, TooManyUnreadableFilesError) or self.adapter.options["strict"]:
                    raise  # a stop raised for another file read inside the transform (a mixup partner)
                self.mark_unreadable(i, unreadable)
                return None
            except Exception as failed:
                error = failed
        raise AugmentationError(
            f"{type(self.adapter).__name__}: the augmentation failed {1 + self.redraws} times on "
            f"{self.samples[i][0]}, a readable file (last: {type(error).__name__}: {error}); the file is kept, "
            f"the transform needs a fix (turn the failing augmentation off in data.options meanwhile)"
        ) from error
