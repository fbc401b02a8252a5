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
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CheckpointError", "rng_state", "set_rng_state", "save_checkpoint", "list_checkpoints", "load_latest"]

_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    """No usable checkpoint (each unreadable file is named in the message)."""


def rng_state() -> dict[str, Any]:
    """The RNG states of this process, as tensors and plain values (``weights_only`` loadable)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
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
    """``torch.save`` to ``path`` via a temp file in the same folder, fsync, rename, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def save_checkpoint(folder: Path, state: dict[str, Any], step: int, keep_last: int) -> Path:
    """Write ``ckpt-{step}.pt`` atomically, then delete all but the newest ``keep_last``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"ckpt-{step:08d}.pt"
    atomic_save(state, path)
    for old in list_checkpoints(folder)[:-max(1, keep_last)]:
        old.unlink(missing_ok=True)
    for stale in folder.glob(".ckpt-*.tmp-*"):  # temp files of a process killed while writing
        if not stale.name.endswith(f"-{os.getpid()}"):
            stale.unlink(missing_ok=True)
    return path


_REQUIRED = ("model", "optimizer", "step", "epoch", "position", "rng", "recipe")


def load_latest(folder: Path, log=print) -> tuple[Path, dict[str, Any]]:
    """The newest readable checkpoint. Unreadable ones are named and skipped, falling back to older ones."""
    failures = []
    for path in reversed(list_checkpoints(folder)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            missing = [k for k in _REQUIRED if k not in state]
            if missing:
                raise ValueError(f"missing entries {missing}")
        except Exception as err:  # a truncated or foreign file: any load error means 'not usable'
            msg = f"checkpoint {path} is unreadable ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
            failures.append(msg)
            log(msg + "; trying the previous one")
            continue
        return path, state
    detail = "; ".join(failures) if failures else "none found"
    raise CheckpointError(f"no usable checkpoint in {folder}: {detail}")
