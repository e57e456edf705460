"""A job's `execute` run to its end: how it is stopped (SIGTERM, CTRL_BREAK or its own
deadline, raised in the main thread), the outcome as the job's final state, and the
runner's exit code, which tells the supervisor what became of the job."""

from __future__ import annotations

import signal
import sys
import threading

from jobs import protocol as p
from runners.job import Job, RunnerError, Sink
from runners.sinks import ConsoleSink

# Every runner pays for its imports at start: typing stays out of run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType
    from typing import Any, TypeAlias

    Execute: TypeAlias = Callable[[Job], "dict[str, Any] | None"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_STOPPED = 3
EXIT_RETRY = p.EXIT_RETRY
EXIT_NO_ROOM = p.EXIT_NO_ROOM


# The reason of a launched runner's stop that no stop request here asks for: a signal from
# outside Offload (a `kill`, a shutdown: the runner lost, not a cancel), or a stop asked
# where the runner cannot see it (Ray's node); its supervisor tells which.
UNASKED = "unasked"
# Windows: a supervisor's CTRL_BREAK reaches only the processes of its own console, and a
# runner is started without a window, in a console of its own. There a launched runner
# watches for the stop request itself, which the supervisor writes before any stop.
WATCHES_STOP_FILE = sys.platform == "win32"
STOP_FILE_POLL_S = 0.1


def _stop_main() -> None:
    """A SIGINT raised, not _thread.interrupt_main's, which only marks one pending: on
    Windows a real one also wakes a main thread in time.sleep. Its handler reads why, in
    the main thread, once that runs Python again (a wait for a socket is in slices:
    llm_client)."""
    signal.raise_signal(signal.SIGINT)


class StopRequested(BaseException):
    """Raised in the main thread when the runner is told to stop (signal or deadline);
    `signal_name`, the signal's where no one asked Offload for the stop (UNASKED)."""

    def __init__(self, reason: str, signal_name: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.signal_name = signal_name


class Stopper:
    """Turns SIGTERM / CTRL_BREAK / the runner's own deadline into `StopRequested`.
    `launched`: by a supervisor, which asks for each stop it sends in the job's stop file;
    by hand, a Ctrl+C or a SIGTERM is the user's cancel."""

    def __init__(self, job_file: str | None, launched: bool = False) -> None:
        self.job_file = job_file
        self.launched = launched
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
        if WATCHES_STOP_FILE and self.launched and self.job_file is not None:
            threading.Thread(target=self._watch_stop_file, args=(self.job_file,),
                             name="stop request", daemon=True).start()

    @staticmethod
    def _watch_stop_file(job_file: str) -> None:
        import os
        import time

        stop_file = p.sibling(job_file, p.STOP_FILE)
        while not os.path.exists(stop_file):
            time.sleep(STOP_FILE_POLL_S)
        _stop_main()

    def _interrupt_main(self) -> None:
        self.deadline_passed = True
        _stop_main()

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
        raise StopRequested(self.reason(), signal.Signals(signum).name)

    def reason(self) -> str:
        if self.deadline_passed:
            return p.JobState.TIMEOUT
        if self.job_file is not None:
            return p.stop_reason(self.job_file) or (
                UNASKED if self.launched else p.JobState.CANCELLED)
        return p.JobState.CANCELLED


def run(job: Job, execute: Execute, stopper: Stopper, timeout: float | None) -> int:
    """`execute` run, and its outcome written as the job's final state; the exit code."""
    sink = job.sink
    if stopper.job_file is None:  # by hand: a SIGTERM says "cancelled" too, as a Ctrl+C
        stopper.install(timeout)
    try:
        try:
            result = execute(job)
            stopper.finishing = True
        except KeyboardInterrupt as exc:
            stopper.finishing = True  # a Ctrl+C the job's own code let through
            raise StopRequested(stopper.reason()) from exc
    except StopRequested as stop:
        return stopped(job, stop, stopper)
    except RunnerError as exc:
        if not isinstance(sink, ConsoleSink):  # by hand, `finish` says it, once
            print(f"error: {exc.message}", file=sys.stderr)
        error = {"type": exc.error_type, "message": exc.message}
        attempt, most = p.attempts(job.data)
        if exc.transient and attempt < most and stopper.job_file is not None:
            # Not final: the supervisor queues the job again, and a client polling it
            # sees it still in progress meanwhile.
            return finish(job, sink, p.JobState.RUNNING, None, error, EXIT_RETRY, stopper)
        return finish(job, sink, p.JobState.FAILED, None, error, EXIT_FAILED, stopper)
    except Exception as exc:
        import traceback

        traceback.print_exc()  # the whole story goes to the log; the job gets one line
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        error = {"type": p.ErrorType.RUNNER, "message": message}
        return finish(job, sink, p.JobState.FAILED, None, error, EXIT_FAILED, stopper)
    return finish(job, sink, p.JobState.COMPLETED, result or {}, None, EXIT_OK, stopper)


def stopped(job: Job, stop: StopRequested, stopper: Stopper) -> int:
    if stop.reason == UNASKED:
        # Not final, whatever attempts are left: the supervisor alone knows whether it
        # asked (a stop through Ray leaves no stop file here). It ends the job cancelled
        # or timeout, queues it again, or fails it `lost` with this error.
        error = {"type": p.ErrorType.LOST, "message": (
            f"its runner was stopped by {stop.signal_name or 'a signal'}, which no cancel "
            "or deadline of Offload's asked for")}
        return finish(job, job.sink, p.JobState.RUNNING, None, error, EXIT_RETRY, stopper)
    error = p.stop_error(stop.reason, job.data.get(p.F_TIMEOUT_S))
    return finish(job, job.sink, stop.reason, None, error, EXIT_STOPPED, stopper)


def finish(job: Job, sink: Sink, state: str, result: dict[str, Any] | None,
           error: dict[str, Any] | None, code: int, stopper: Stopper) -> int:
    stopper.finishing = True
    if sys.platform != "win32":
        signal.setitimer(signal.ITIMER_REAL, 0)
    with job.lock:
        job.data.update({
            p.F_STATE: state, p.F_RESULT: result,
            p.F_FINISHED_AT: p.now_iso() if state in p.FINAL_STATES else None,
            p.F_ERROR: error, p.F_EXIT_CODE: code,
        })
    try:
        sink.finish(job)
    except OSError as exc:
        if exc.errno not in p.DISK_FULL:
            raise  # lost, with its traceback in the log
        print(f"error: {exc}", file=sys.stderr)  # dropped if the log has no room either
        return EXIT_NO_ROOM  # the supervisor's final word says the disk was full
    if error is not None and isinstance(sink, ConsoleSink):
        print(f"\n{state}: {error['message']}", file=sys.stderr)
    return code
