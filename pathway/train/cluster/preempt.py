"""Stopping a run the way clusters stop jobs: at an optimizer-step boundary, with a checkpoint, on every rank.

SLURM sends SIGTERM at preemption or cancellation (and SIGUSR1 ahead of the time limit when the job asks with
``--signal``); torchrun forwards SIGTERM to its workers; Ctrl-C sends SIGINT. While a run trains,
:class:`StopSignals` turns each of these into a request that the loop reads after the current optimizer step:
every rank agrees on it (:class:`StopAgreement`, carried in the step's one all-reduce), rank 0 writes the
checkpoint atomically and the run ends with :class:`RunStopped`, naming the step and the checkpoint. A second
Ctrl-C stops at once (Python's default).

The same collective carries the wall-clock checkpoint interval (``train.checkpoint_minutes``), so ranks whose
clocks disagree still save at the same step.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType

from pathway.errors import PathwayError

__all__ = ["RunStopped", "StopSignals", "CheckpointClock", "StopAgreement", "ignore_stop_signals"]

SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


class RunStopped(PathwayError):
    """A run stopped on a signal after checkpointing; running the same command again continues it."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # 128 + the signal, as a shell reports a process the signal ended


class StopSignals:
    """Within ``with StopSignals() as stops``, SIGTERM, SIGUSR1 and a first SIGINT set ``stops.received``
    instead of ending the process; the previous handlers come back on exit (and a second SIGINT gets them).

    Handlers can only be installed from the main thread; elsewhere (a run started from a worker thread) the
    signals keep their usual effect."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in SIGNALS:
                number = getattr(signal, name, None)
                if number is not None:
                    self._previous[number] = signal.signal(number, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _note(self, number: int, frame: FrameType | None) -> None:
        self.received = number
        if number == signal.SIGINT:  # a second Ctrl-C interrupts at once
            signal.signal(number, self._previous.get(number, signal.default_int_handler))

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal another rank received"


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker's ``worker_init_fn``: the stop signals are the main process's to act on. SLURM and
    torchrun signal the whole process group, and a worker ended by SIGTERM (torch's worker handler dies on one
    it did not get from its parent) would fail the main process mid-step instead of letting it checkpoint."""
    for name in SIGNALS:
        number = getattr(signal, name, None)
        if number is not None:
            signal.signal(number, signal.SIG_IGN)


class CheckpointClock:
    """Whether ``minutes`` of wall time have passed since the last checkpoint (0: never due)."""

    def __init__(self, minutes: float) -> None:
        self.seconds, self.last = minutes * 60, time.monotonic()

    def due(self) -> bool:
        return self.seconds > 0 and time.monotonic() - self.last >= self.seconds

    def saved(self) -> None:
        self.last = time.monotonic()


class StopAgreement:
    """Whether to stop, and whether a checkpoint is due, as every rank sees it after an optimizer step.

    Each step, :meth:`local` (this rank's stop request and clock) rides in the step's one all-reduce, the loss's
    (``distributed.agreed_loss``), and :meth:`agree` records the result: true on one rank is true on all, at the
    same step, with no collective or host read of its own."""

    def __init__(self, stops: StopSignals, clock: CheckpointClock) -> None:
        self.stops, self.clock = stops, clock
        self.stop = self.due = False

    def local(self) -> tuple[bool, bool]:
        return self.stops.received is not None, self.clock.due()

    def agree(self, stop: bool, due: bool) -> None:
        self.stop, self.due = stop, due
