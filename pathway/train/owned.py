"""Folders the project writes, and the rule that keeps the user's files safe: the project deletes or
overwrites only what it wrote itself.

Every folder the engine fills (demo data, a run folder, the experiment's results) is *claimed* first:
a missing or empty folder is created and marked with a small file naming what owns it; a folder already
marked for the same purpose is reused; anything else (a user's data set, a folder of notes, a folder
that another command owns) is a :class:`FolderNotOwnedError` that names the folder and the fix. Only a
marked folder is ever cleared, and files outside claimed folders are never replaced.

Folders written before markers existed are recognised by what the project itself leaves there
(``legacy``), so an existing ``runs/`` keeps working.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from pathway.errors import PathwayError

__all__ = ["MARKER", "FolderNotOwnedError", "OutputExistsError", "RunExistsError", "claim", "check_claimable",
           "owner", "clear", "check_new_file", "check_run_dir", "claim_run_dir"]

MARKER = ".pathway-owned"


class FolderNotOwnedError(PathwayError):
    """A folder the project would write into holds files it did not write."""


class RunExistsError(PathwayError):
    """A new run was started in a run folder that holds checkpoints (continue it with --resume)."""


class OutputExistsError(PathwayError):
    """An output file the user named exists already; the project does not overwrite it."""


def owner(folder: Path) -> str | None:
    """What owns ``folder`` according to its marker (``None``: no marker)."""
    marker = Path(folder) / MARKER
    return marker.read_text().strip() or None if marker.is_file() else None


def _refusal(folder: Path, kind: str, why: str, fix: str) -> FolderNotOwnedError:
    return FolderNotOwnedError(f"{folder} {why}, so pathway will not write {kind} there (it deletes or overwrites "
                               f"only what it wrote itself); {fix}")


def check_claimable(folder: str | Path, kind: str, *, legacy: Callable[[Path], bool] | None = None,
                    fix: str = "name a new or empty folder") -> None:
    """Raise :class:`FolderNotOwnedError` unless ``claim(folder, kind)`` would succeed; writes nothing."""
    folder = Path(folder)
    if not folder.exists():
        parent = next((p for p in folder.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise _refusal(folder, kind, f"would lie under {parent}, which is a file", fix)
        return
    if not folder.is_dir():
        raise _refusal(folder, kind, "is a file", fix)
    found = owner(folder)
    if found == kind:
        return
    if found is not None:
        raise _refusal(folder, kind, f"belongs to another pathway command ({found})", fix)
    if legacy is not None and legacy(folder):
        return
    if any(folder.iterdir()):
        raise _refusal(folder, kind, "holds files pathway did not write", fix)


def claim(folder: str | Path, kind: str, *, legacy: Callable[[Path], bool] | None = None,
          fix: str = "name a new or empty folder") -> Path:
    """Make ``folder`` the project's own for ``kind`` (create and mark it), or refuse; returns the folder."""
    folder = Path(folder)
    check_claimable(folder, kind, legacy=legacy, fix=fix)
    folder.mkdir(parents=True, exist_ok=True)
    if owner(folder) != kind:
        (folder / MARKER).write_text(kind + "\n")
    return folder


def clear(folder: Path, kind: str) -> None:
    """Delete the contents of a folder marked for ``kind`` (the marker stays); anything else is refused."""
    if owner(folder) != kind:
        raise _refusal(folder, kind, "is not marked as pathway's", "it was left as it is")
    for entry in folder.iterdir():
        if entry.name == MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def check_new_file(path: str | Path, what: str) -> Path:
    """An output file the user names must not exist yet: nothing of theirs is overwritten."""
    path = Path(path)
    if path.exists():
        raise OutputExistsError(f"{what} {path} exists already; pathway does not overwrite files it did not write: "
                                f"choose another path, or delete it yourself first")
    return path


def _legacy_run(folder: Path) -> bool:
    """A run folder written before markers existed: its recipe plus the engine's logs or checkpoints."""
    return (folder / "recipe.yaml").is_file() and any(
        (folder / name).exists() for name in ("checkpoints", "metrics.jsonl", "pretrain.jsonl"))


_RUN_FIX = "choose another output.name or output.dir (the run folder is output.dir/output.name)"


def check_run_dir(run_dir: str | Path) -> None:
    """Raise unless ``claim_run_dir`` would succeed (before the expensive part of a run); writes nothing."""
    check_claimable(run_dir, "run", legacy=_legacy_run, fix=_RUN_FIX)


def claim_run_dir(run_dir: str | Path) -> Path:
    """The run folder ``output.dir/output.name``: new, empty, or one that a pathway run wrote."""
    return claim(run_dir, "run", legacy=_legacy_run, fix=_RUN_FIX)
