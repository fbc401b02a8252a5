"""Training checkpoints that survive ``kill -9``: atomic writes, the last N kept, full resumable state.

A checkpoint holds everything the next step depends on: model, optimizer, AMP scaler, EMA,
optimizer-step and epoch position (the data order is a function of seed, epoch and position, see
``data.py``), the RNG states of python, numpy and torch (CPU and CUDA, one set per rank) and the
resolved recipe. Files are written to a temporary name, fsynced and renamed, so a crash leaves
either the previous file or the new one, never half of one. They are read with
``torch.load(weights_only=True)``: plain tensors and containers, no arbitrary unpickling.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pathway.train.official.layouts import CheckpointError, load_error

__all__ = ["CheckpointError", "rng_state", "set_rng_state", "save_checkpoint", "list_checkpoints", "read_state",
           "load_latest", "RESUMABLE_CHANGES", "RecipeChangedError", "recipe_changes"]

_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


def rng_state() -> dict[str, Any]:
    """The RNG states of this process, as tensors and plain values (``weights_only`` loadable)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Keys that may differ between a run's checkpoints and the recipe it is resumed with: where outputs go, how
# often they are written, the device and worker count. Any other change would mix two runs in one.
RESUMABLE_CHANGES = ("description", "output.dir", "output.name", "output.plots", "data.root", "data.num_workers",
                     "data.prefetch_factor", "train.device", "train.compile", "train.log_every", "train.tensorboard",
                     "train.checkpoint_every", "train.checkpoint_minutes", "train.checkpoint_epochs", "train.keep_last")


class RecipeChangedError(CheckpointError):
    """A run was resumed with a recipe that differs from its checkpoints' in a key that shapes the run."""


def _flat(value: Any, key: str = "") -> dict[str, Any]:
    """``{"model": {"depth": 2}}`` -> ``{"model.depth": 2}``; ``pathway.pairs`` (keys are patterns) stays whole."""
    if not isinstance(value, dict) or key == "pathway.pairs":
        return {key: list(value) if isinstance(value, tuple) else value}
    return {k: v for name, inner in value.items() for k, v in _flat(inner, f"{key}.{name}" if key else name).items()}


def recipe_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for each recipe key (not in RESUMABLE_CHANGES) whose value differs; a key one of the
    two recipes lacks (written by another version of pathway) is not compared."""
    old, new = _flat(saved), _flat(current)
    return [f"{key}: {old[key]!r} -> {new[key]!r}" for key in new
            if key in old and key not in RESUMABLE_CHANGES and old[key] != new[key]]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` via a temp file in the same folder, fsync, rename, fsync the folder.

    A failed write (a full disk, a quota) removes its temp file and is a CheckpointError naming the file and
    the free space; ``path`` keeps what it held before."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:  # a full disk, or Ctrl-C while writing: no partial file stays behind
        tmp.unlink(missing_ok=True)
        if not isinstance(err, (OSError, RuntimeError)):  # torch reports a short write as RuntimeError
            raise
        free = shutil.disk_usage(path.parent).free
        raise CheckpointError(f"could not write {path} ({type(err).__name__}: {str(err).splitlines()[0][:200]}): "
                              f"a full disk or a quota ({free / 2**20:.0f} MiB free on its disk)? Free space (or "
                              f"lower train.keep_last) and run the same command again; the partial file was "
                              f"removed, earlier checkpoints are intact") from err
    _fsync_dir(path.parent)


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def save_checkpoint(folder: Path, state: dict[str, Any], step: int, keep_last: int) -> Path:
    """Write ``ckpt-{step}.pt`` atomically, then delete all but the newest ``keep_last`` up to ``step``.

    Files of later steps are left alone: they belong to a run that was resumed from an earlier checkpoint
    because they were unreadable, and counting them would prune the good checkpoints in their place. The
    resumed run overwrites each of them when it reaches its step.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"ckpt-{step:08d}.pt"
    atomic_save(state, path)
    upto = [p for p in list_checkpoints(folder) if int(_NAME.match(p.name).group(1)) <= step]
    for old in upto[:-max(1, keep_last)]:
        old.unlink(missing_ok=True)
    for stale in folder.glob(".ckpt-*.tmp-*"):  # temp files of a process killed while writing
        if not stale.name.endswith(f"-{os.getpid()}"):
            stale.unlink(missing_ok=True)
    return path


_REQUIRED = ("model", "optimizer", "step", "epoch", "position", "rng", "recipe")


def read_state(path: Path, required: tuple[str, ...] = ("model",)) -> dict[str, Any]:
    """A training checkpoint's contents; an unreadable or foreign file is a CheckpointError naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: any load error means 'not usable'
        raise CheckpointError(f"checkpoint {path} is unreadable ({load_error(err)})") from err
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a training checkpoint (missing entries {missing})")
    return state


def load_latest(folder: Path, log=print) -> tuple[Path, dict[str, Any]]:
    """The newest readable checkpoint. Unreadable ones are named and skipped, falling back to older ones."""
    failures = []
    for path in reversed(list_checkpoints(folder)):
        try:
            return path, read_state(path, _REQUIRED)
        except CheckpointError as err:
            failures.append(str(err))
            log(f"{err}; trying the previous one")
    detail = "; ".join(failures) if failures else "none found"
    raise CheckpointError(f"no usable checkpoint in {folder}: {detail}")
