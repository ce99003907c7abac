"""Stop requests from the scheduler or the user, honoured at the next step boundary.

SIGTERM and SIGUSR1 (SLURM's warning before preemption) ask for a checkpoint and an exit with
``EXIT_PREEMPTED``; the first SIGINT (Ctrl-C) asks for the same, a second one stops at once.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

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
