"""Folders the project writes, and the rule that keeps the user's files safe: the project deletes or
overwrites only what it wrote itself.

Every folder the engine fills (demo data, a run folder, the experiment's results) is *claimed* first:
a missing or empty folder is created and marked with a small file naming what owns it; a folder already
marked for the same purpose is reused; anything else (a user's data set, a folder of notes, a folder
that another command owns) is a :class:`FolderNotOwnedError` that names the folder and the fix. Only a
marked folder is ever written into, and files outside claimed folders are never replaced.

A run folder is the project's only if it carries the marker: a folder that merely holds a ``recipe.yaml`` and a
``metrics.jsonl`` may be the user's own. A run holds its folder's lock (:func:`lock_run_dir`) while it writes
there, so a second run started on the same folder is refused instead of interleaving its files with the first.
"""

from __future__ import annotations

import atexit
import os
import socket
from pathlib import Path
from typing import IO

from pathway.errors import PathwayError

__all__ = ["MARKER", "FolderNotOwnedError", "OutputExistsError", "claim", "check_claimable",
           "owner", "check_new_file", "check_run_dir", "claim_run_dir", "lock_run_dir", "unlock_run_dir",
           "RunLockedError"]

MARKER = ".pathway-owned"


class FolderNotOwnedError(PathwayError):
    """A folder the project would write into holds files it did not write."""


class RunLockedError(PathwayError):
    """Another live process is writing the same run folder."""


class OutputExistsError(PathwayError):
    """An output file the user named exists already; the project does not overwrite it."""


def owner(folder: Path) -> str | None:
    """What owns ``folder`` according to its marker (``None``: no marker)."""
    marker = Path(folder) / MARKER
    return marker.read_text().strip() or None if marker.is_file() else None


def _refusal(folder: Path, kind: str, why: str, fix: str) -> FolderNotOwnedError:
    return FolderNotOwnedError(f"{folder} {why}, so pathway will not write {kind} there (it deletes or overwrites "
                               f"only what it wrote itself); {fix}")


def check_claimable(folder: str | Path, kind: str, *, fix: str = "name a new or empty folder") -> None:
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
    if any(folder.iterdir()):
        raise _refusal(folder, kind, "holds files pathway did not write", fix)


def claim(folder: str | Path, kind: str, *, fix: str = "name a new or empty folder") -> Path:
    """Make ``folder`` the project's own for ``kind`` (create and mark it), or refuse; returns the folder."""
    folder = Path(folder)
    check_claimable(folder, kind, fix=fix)
    folder.mkdir(parents=True, exist_ok=True)
    if owner(folder) != kind:
        (folder / MARKER).write_text(kind + "\n")
    return folder


def check_new_file(path: str | Path, what: str) -> Path:
    """An output file the user names must not exist yet: nothing of theirs is overwritten."""
    path = Path(path)
    if path.exists():
        raise OutputExistsError(f"{what} {path} exists already; pathway does not overwrite files it did not write: "
                                f"choose another path, or delete it yourself first")
    return path


_RUN_FIX = "choose another output.name or output.dir (the run folder is output.dir/output.name)"


def check_run_dir(run_dir: str | Path) -> None:
    """Raise unless ``claim_run_dir`` would succeed (before the expensive part of a run); writes nothing."""
    check_claimable(run_dir, "run", fix=_RUN_FIX)


def claim_run_dir(run_dir: str | Path) -> Path:
    """The run folder ``output.dir/output.name``: new, empty, or one that a pathway run wrote."""
    return claim(run_dir, "run", fix=_RUN_FIX)


LOCK = ".pathway-lock"
_HELD: dict[Path, IO[str]] = {}  # run folder -> the open lock file of this process


def lock_run_dir(run_dir: Path) -> None:
    """Hold the run folder's lock (an OS lock: the kernel releases it when the process ends, crashes included).

    A folder that another live process holds is a :class:`RunLockedError` naming that process. A lock this process
    holds already (taken earlier in the run, or by an earlier run of the folder that ended in an error) is kept."""
    import fcntl

    key = Path(run_dir).resolve()
    if key in _HELD:
        return
    handle = open(key / LOCK, "a+")  # kept open while the run writes: that is the lock
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunLockedError(f"{run_dir} is in use by another pathway run ({holder}); wait for it to end, or "
                             f"choose another output.name / output.dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    _HELD[key] = handle


def unlock_run_dir(run_dir: Path) -> None:
    """Release the lock this process holds on ``run_dir`` (none held: nothing to do)."""
    handle = _HELD.pop(Path(run_dir).resolve(), None)
    if handle is not None:
        handle.close()


@atexit.register
def _unlock_all() -> None:
    """Close the locks of runs that ended in an error at exit (the kernel would release them anyway)."""
    for run_dir in list(_HELD):
        unlock_run_dir(run_dir)
