"""Stop requests from the scheduler or the user, honoured at the next step boundary.

SIGTERM and SIGUSR1 (SLURM's warning before preemption) ask for a checkpoint and an exit with
``EXIT_PREEMPTED``; the first SIGINT (Ctrl-C) asks for the same, a second one stops at once.
Outside the training loop (the final evaluation, an export) they stop the work at once, with
the same exit code and a line saying what was interrupted.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

from suncet.errors import TrainingStopped

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: the job can be requeued and resumed with --resume auto
EXIT_INTERRUPTED = 130


class StopRequests:
    """Context manager that turns the signals into a flag the training loop polls."""

    def __init__(self, announce=print):
        self.reason: str | None = None
        self.exit_code = 0
        self._announce = announce
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            if self.reason == "interrupt":
                raise KeyboardInterrupt
            self.reason, self.exit_code = "interrupt", EXIT_INTERRUPTED
            self._announce("stopping after this step with a checkpoint (Ctrl-C again to stop at once)")
        elif self.reason is None:
            self.reason, self.exit_code = signal.Signals(signum).name, EXIT_PREEMPTED
            self._announce(f"{self.reason}: writing a checkpoint at the next step boundary, then exiting")

    @property
    def requested(self) -> bool:
        return self.reason is not None


def _stop_at_once(what: str):
    def handle(signum: int, frame: FrameType | None) -> None:
        raise TrainingStopped(f"{signal.Signals(signum).name}: {what} interrupted", EXIT_PREEMPTED)

    return handle


def answer_stops_at_once(what: str) -> None:
    """From now on SIGTERM and SIGUSR1 end the process's work at once with ``EXIT_PREEMPTED``
    and a line naming ``what`` (the command's entry point calls this before importing anything
    heavy; the training loop and ``stop_at_once`` narrow it while they run)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _stop_at_once(what))
    signal.signal(signal.SIGINT, signal.default_int_handler)


@contextlib.contextmanager
def stop_at_once(what: str) -> Iterator[None]:
    """SIGTERM or SIGUSR1 during ``what`` (an evaluation, an export: no step boundary to wait
    for) ends it at once with ``EXIT_PREEMPTED`` and a line saying what was interrupted."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, _stop_at_once(what)) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
