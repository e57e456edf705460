"""How a runner stops: SIGTERM, CTRL_BREAK or its own deadline raised in the main thread."""

from __future__ import annotations

import signal
import sys
import threading

from jobs import protocol as p

# Every runner pays for its imports at start: typing stays out of run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import FrameType


class StopRequested(BaseException):
    """Raised in the main thread when the runner is told to stop (signal or deadline)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Stopper:
    """Turns SIGTERM / CTRL_BREAK / the runner's own deadline into `StopRequested`."""

    def __init__(self, job_file: str | None) -> None:
        self.job_file = job_file
        self.finishing = False
        self.deadline_passed = False

    def install(self, timeout_s: float | None) -> None:
        for name in ("SIGTERM", "SIGBREAK", "SIGINT"):
            sig = getattr(signal, name, None)
            if sig is not None:
                signal.signal(sig, self._on_signal)
        # Past what a timer takes (1e308 by hand: OverflowError, the job lost), no deadline
        # is near enough to keep: the job runs without one, as with none set.
        if timeout_s and 0 < timeout_s <= threading.TIMEOUT_MAX:
            if sys.platform != "win32":
                signal.signal(signal.SIGALRM, self._on_deadline)
                signal.setitimer(signal.ITIMER_REAL, timeout_s)
            else:
                # Windows: no SIGALRM; interrupt the main thread from a timer thread.
                timer = threading.Timer(timeout_s, self._interrupt_main)
                timer.daemon = True
                timer.start()

    def _interrupt_main(self) -> None:
        import _thread

        self.deadline_passed = True
        _thread.interrupt_main()

    def _on_deadline(self, signum: int, frame: FrameType | None) -> None:
        self.deadline_passed = True
        if not self.finishing:
            # As a signal's: a SIGTERM (the supervisor's stop at the same deadline) before
            # the final state is written raised again, out of the handler (exit 1).
            self.finishing = True
            raise StopRequested(p.JobState.TIMEOUT)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.finishing:
            return  # already writing the final state; let it complete
        self.finishing = True  # one stop is enough; ignore the repeats
        raise StopRequested(self.reason())

    def reason(self) -> str:
        if self.deadline_passed:
            return p.JobState.TIMEOUT
        if self.job_file is not None:
            return p.stop_reason(self.job_file) or p.JobState.CANCELLED
        return p.JobState.CANCELLED
