"""Finding samples on disk: one folder per class, or a CSV manifest; errors name the path and the fix.

Folder layout::

    root/<split>/<class_name>/<file>     (files may sit in sub-folders of the class folder)

Manifest layout: ``root/<split>.csv`` with a header and the columns ``path`` and ``label`` (or
``labels``); several labels per row are separated by ``;`` or ``,`` inside the field (AudioSet style,
quote the field). Paths are relative to the manifest's folder unless absolute.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from .base import LayoutError


def split_dir(root: Path, split: str) -> Path:
    path = root / split
    if not path.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise LayoutError(
            f"split folder {path} not found (sub-folders of {root}: {found}); expected root/<split>/<class>/<files>"
        )
    return path


def why_unreachable(path: Path) -> str:
    """Why ``path`` cannot be opened, naming the first component at fault: a symlink loop, a symlink to
    nothing, or a component that does not exist (``Path.exists`` says False for all three)."""
    for part in [*reversed(path.parents), path]:
        if part.is_symlink():
            try:
                part.stat()
            except OSError as error:
                target = os.readlink(part)
                if error.errno == errno.ELOOP:
                    return f"{part} is a symlink loop ({part} -> {target} -> ... never reaches a file or folder)"
                return f"{part} is a symlink to {target}, which does not exist"
        elif not part.exists():
            return f"{part} does not exist"
    return f"{path} is a folder" if path.is_dir() else f"{path} cannot be opened"


def iter_files(folder: Path, extensions: Iterable[str]) -> Iterator[Path]:
    """Files with one of ``extensions`` under ``folder``, in sorted walk order, following symlinked folders (as
    torchvision's ImageFolder does). Broken file symlinks are yielded, so that reading them names them instead
    of their being left out without a word; a symlinked folder that leads to a folder already walked (a loop,
    or the same files twice) is refused."""
    exts = {e.lower().lstrip(".") for e in extensions}
    walked: set[str] = set()
    for top, dirs, files in os.walk(folder, onerror=refuse_unlistable, followlinks=True):
        walked.add(os.path.realpath(top))
        for d in dirs:
            link = os.path.join(top, d)
            real = os.path.realpath(link)
            if os.path.islink(link) and (real in walked or os.path.realpath(top).startswith(real + os.sep)):
                raise LayoutError(
                    f"{link} is a symlink to {real}, a folder this scan of {folder} already reads (or one above "
                    f"it): its files would be read twice or forever; remove the link"
                )
        dirs.sort()
        for name in sorted(files):
            if os.path.splitext(name)[1].lower().lstrip(".") in exts:
                yield Path(top, name)


def refuse_unlistable(error: OSError) -> None:
    """``os.walk``'s error hook: a folder that cannot be listed is named, not passed over."""
    raise LayoutError(f"cannot list the folder {error.filename} ({error.strerror}); fix its permissions or remove it")


def list_files(folder: Path, extensions: Iterable[str]) -> list[Path]:
    return sorted(iter_files(folder, extensions))


def class_names(folder: Path, extensions: Iterable[str]) -> list[str]:
    """Sorted class folder names of ``folder``; a clear error if files sit there without class folders."""
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        loose = [p.name for p in folder.iterdir() if p.is_file()]
        raise LayoutError(
            f"no class folders in {folder} ({len(loose)} loose files, e.g. {loose[:3]}); put each sample in a "
            f"folder named after its class: {folder}/<class_name>/<file> (extensions {sorted(extensions)})"
        )
    return names


def classes_with_files(folder: Path, extensions: Iterable[str]) -> list[str]:
    """The class folder names of ``folder``, each holding at least one file with ``extensions``.

    A class folder without such files would become a class no item has (torchvision's ImageFolder raises
    FileNotFoundError for it): it is refused by name, with the ways out."""
    names = class_names(folder, extensions)
    empty = [name for name in names if next(iter_files(folder / name, extensions), None) is None]
    if empty:
        raise LayoutError(
            f"class folder(s) {[str(folder / name) for name in empty[:5]]}{' ...' if len(empty) > 5 else ''} "
            f"({len(empty)} of {len(names)}) hold no files with extensions {sorted(extensions)}, so they would be "
            f"classes without a sample; add files, remove the folders, or list the classes in the `classes` option"
        )
    return names


def scan_class_folders(folder: Path, extensions: Sequence[str], classes: Sequence[str]) -> list[tuple[Path, int]]:
    """``[(file, class_index)]`` for every file with one of ``extensions`` under ``folder/<class>/``."""
    index = {c: i for i, c in enumerate(classes)}
    samples: list[tuple[Path, int]] = []
    for name in class_names(folder, extensions):
        if name not in index:
            raise LayoutError(
                f"class folder {folder / name}: label {name!r} is not in the class list {list(classes)} "
                f"(taken from the training split or the `classes` option); add it there or remove the folder"
            )
        samples += [(p, index[name]) for p in list_files(folder / name, extensions)]
    if not samples:
        raise LayoutError(f"no files with extensions {sorted(extensions)} under {folder}/<class>/")
    return samples


def read_manifest(path: Path) -> list[tuple[Path, list[str]]]:
    """Rows ``(file, [labels])`` of a CSV manifest (UTF-8, with or without the byte-order mark spreadsheets
    write). A row whose file cannot be opened, a file listed twice (it would count twice in the metric) and text
    that is not UTF-8 are errors naming the line."""
    if not path.is_file():
        raise LayoutError(f"manifest {path} not found; write a CSV with the header `path,label`")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise LayoutError(
            f"manifest {path} is not UTF-8 text (byte {data[error.start]:#04x} on line {line}); save it as UTF-8"
        ) from None
    return manifest_rows(path, csv.DictReader(io.StringIO(text, newline="")))


def manifest_rows(path: Path, reader: csv.DictReader) -> list[tuple[Path, list[str]]]:
    fields = reader.fieldnames or []
    label_col = "labels" if "labels" in fields else "label"
    if "path" not in fields or label_col not in fields:
        raise LayoutError(f"manifest {path} has columns {fields}; it needs a header with `path` and `label`")
    rows: list[tuple[Path, list[str]]] = []
    first_line: dict[Path, int] = {}
    for line, row in enumerate(reader, start=2):
        file = Path(row["path"].strip())
        file = file if file.is_absolute() else path.parent / file
        if not file.is_file():
            raise LayoutError(
                f"manifest {path}, line {line}: {row['path']!r} points to {file}, which cannot be opened "
                f"({why_unreachable(file)}); fix the path (relative paths start at {path.parent}) or remove the row"
            )
        if file in first_line:
            raise LayoutError(
                f"manifest {path}, line {line}: {row['path']!r} is listed again (first on line {first_line[file]}), "
                f"so it would count twice; remove one of the rows"
            )
        first_line[file] = line
        labels = [s.strip() for s in re.split(r"[;,]", row[label_col] or "") if s.strip()]
        rows.append((file, labels))
    if not rows:
        raise LayoutError(f"manifest {path} has no rows")
    return rows


def label_indices(labels: Sequence[str], index: dict[str, int], where: str) -> list[int]:
    """Indices of ``labels`` in the class index (class name -> position), built once per adapter."""
    missing = [lab for lab in labels if lab not in index]
    if missing:
        raise LayoutError(
            f"{where}: label(s) {missing} not in the class list ({len(index)} classes, e.g. {list(index)[:5]}); "
            f"add them to the `classes` option or fix the row"
        )
    return [index[lab] for lab in labels]


def folder_classes(root: Path, classes: Sequence[str] | None, train_split: str, extensions: Iterable[str]) -> list[str]:
    """The class list: the ``classes`` option if given, else the class folders of the training split."""
    if classes:
        return list(classes)
    return classes_with_files(split_dir(root, train_split), extensions)
