"""A job's `execute` run to its end: the outcome as the job's final state, and the
runner's exit code, which tells the supervisor what became of the job."""

from __future__ import annotations

import signal
import sys

from jobs import protocol as p
from runners.job import Job, RunnerError, Sink
from runners.sinks import ConsoleSink
from runners.stopping import Stopper, StopRequested

# Every runner pays for its imports at start: typing stays out of run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeAlias

    Execute: TypeAlias = Callable[[Job], "dict[str, Any] | None"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_STOPPED = 3
EXIT_RETRY = p.EXIT_RETRY


def run(job: Job, execute: Execute, stopper: Stopper, timeout: float | None) -> int:
    """`execute` run, and its outcome written as the job's final state; the exit code."""
    sink = job.sink
    if timeout is not None and stopper.job_file is None:
        stopper.install(timeout)
    try:
        try:
            result = execute(job)
            stopper.finishing = True
        except KeyboardInterrupt as exc:
            stopper.finishing = True  # the deadline's, on Windows: one stop is enough
            raise StopRequested(stopper.reason()) from exc
    except StopRequested as stop:
        return stopped(job, stop.reason, stopper)
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


def stopped(job: Job, reason: str, stopper: Stopper) -> int:
    error = p.stop_error(reason, job.data.get(p.F_TIMEOUT_S))
    return finish(job, job.sink, reason, None, error, EXIT_STOPPED, stopper)


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
    sink.finish(job)
    if error is not None and isinstance(sink, ConsoleSink):
        print(f"\n{state}: {error['message']}", file=sys.stderr)
    return code
