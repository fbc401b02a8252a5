"""TensorBoard scalars beside the engine's JSONL logs.

Every row the engine writes to ``metrics.jsonl`` (train: loss, lr, mean |lambda|, samples/s, data-wait;
eval, test and best rows: their metrics) and to ``lambdas.jsonl`` (each layer's lambda) also goes to
``RUN/tensorboard`` as scalars named ``<kind>/<key>`` and ``lambda/<layer>`` at the row's step. On by
default when the ``tensorboard`` package is installed (``train.tensorboard: null``), refused by name
when asked for (``true``) without it, off with ``false``. Only the main process writes.

A resumed run drops the rows after its checkpoint from the JSONL; TensorBoard gets the same cut through
``purge_step`` (events at later steps from the interrupted run are hidden), and a fresh run under an
old run's name purges from step 0.

    tensorboard --logdir runs/     # then open http://localhost:6006
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .config import RecipeError

FOLDER = "tensorboard"


class TensorBoardMissingError(RecipeError):
    """``train.tensorboard: true`` where the tensorboard package is not installed."""


def _installed() -> bool:
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
    except ImportError:
        return False
    return True


class TensorBoard:
    """One event writer for a run folder, opened at the first row (after a resume has set the cut)."""

    def __init__(self, folder: Path | None):
        self.folder, self.purge_step, self._writer = folder, 0, None

    @classmethod
    def open(cls, run_dir: Path, main: bool, enabled: bool | None) -> TensorBoard:
        """``enabled``: None = on when tensorboard is installed; True = required; False = off."""
        if enabled is True and not _installed():
            raise TensorBoardMissingError("train.tensorboard is true but the tensorboard package is not installed: "
                                          "pip install tensorboard (or the integrations extra), or set "
                                          "train.tensorboard=false (or null: on where installed)")
        on = main and (enabled if enabled is not None else _installed())
        return cls(run_dir / FOLDER if on else None)

    def mirror(self, log: Any, prefix: str | None = None) -> Mirror:
        """``log`` (a JsonlLog) whose rows also come here; ``prefix`` names a row's values instead of its kind."""
        return Mirror(log, self, prefix)

    def scalars(self, values: dict[str, Any], step: int) -> None:
        if self.folder is None:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.folder), purge_step=self.purge_step)
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self._writer.add_scalar(name, value, step)
        self._writer.flush()          # a killed run keeps what it logged, as the JSONL does


class Mirror:
    """A JSONL log that also writes each row to TensorBoard; everything else is the log's own."""

    def __init__(self, log: Any, board: TensorBoard, prefix: str | None):
        self.log, self.board, self.prefix = log, board, prefix

    def write(self, **row: Any) -> None:
        self.log.write(**row)
        step = row.get("step", 0)
        group = self.prefix or row.get("kind", "log")
        self.board.scalars({f"{group}/{key}": value for key, value in row.items()
                            if key not in ("kind", "step", "epoch")}, step)

    def truncate_after(self, step: int) -> None:
        self.log.truncate_after(step)
        self.board.purge_step = step + 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self.log, name)
