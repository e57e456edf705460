"""Where a job's reports go: its job file, written at most five times a second (its first
output at once), by the runner's own thread when a write is due and by a thread of the
sink's for one put off, and at its end whatever it takes; or the terminal, by hand."""

from __future__ import annotations

import os
import sys
import threading
import time

from jobs import protocol as p
from jobs.protocol import remote
from runners.job import Job, Sink

# Every runner pays for its imports at start: typing stays out of run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

WRITE_INTERVAL_S = 0.2  # at most five job-file writes a second while running
FINAL_RETRY_S = p.FINAL_RETRY_S


class FileSink(Sink):
    """Writes the job file: throttled while running, always at the end."""

    def __init__(self, path: str, echo: bool, emit_key: str | None = None) -> None:
        self.path = path
        self._echo = echo  # also print output when a developer runs this in a terminal
        self._emit_key = emit_key  # also print each snapshot on stdout (on a Ray node)
        self._seq = 0
        self._echoed = 0
        self._cond = threading.Condition()
        self._dirty = False
        self._closed = False
        self._last_write = 0.0
        self._wrote_output = False
        self._failing: OSError | None = None  # the write's error, while writes fail
        self._job: Job | None = None
        self._flusher: threading.Thread | None = None  # started by the first deferred write

    def start(self, job: Job) -> None:
        self._job = job
        self._write(job)

    def changed(self, job: Job) -> None:
        if self._echo:
            self._echo_output(job)
        with self._cond:
            self._dirty = True
            # The first piece of output goes out at once: it is what a user waits for.
            first_output = not self._wrote_output and job.has_output
            if first_output or time.monotonic() - self._last_write >= WRITE_INTERVAL_S:
                wrote = self._write_locked(job)
                self._wrote_output = self._wrote_output or (first_output and wrote)
            else:
                self._wake_flusher()

    def finish(self, job: Job) -> None:
        """The final state, written whatever it takes: an unwritable data folder is
        waited for (OFFLOAD_FINAL_WRITE_PATIENCE_S), so the result lands once it is
        writable; then the last write's OSError."""
        if self._echo:
            self._echo_output(job)
        with self._cond:
            self._closed = True
            self._cond.notify()
        give_up_at = time.monotonic() + _patience_s()
        while True:
            with self._cond:
                if self._write_locked(job, durable=True):
                    return
                failed = self._failing
            if time.monotonic() > give_up_at and failed is not None:
                raise OSError(failed.errno, f"cannot write the final state to {self.path}: "
                                            f"{failed.strerror or failed}")
            time.sleep(FINAL_RETRY_S)

    def _write(self, job: Job) -> None:
        with self._cond:
            self._write_locked(job)

    def _write_locked(self, job: Job, durable: bool = False) -> bool:
        """One write (and, with `emit_key`, one snapshot line on stdout); when the data
        folder cannot be written the job goes on and the write is tried again after the
        usual interval. Only the final one is `durable`: an fsync per progress write
        would slow streaming."""
        snapshot = job.snapshot()
        if self._emit_key:
            self._seq += 1
            sys.stdout.write(remote.snapshot_line(self._seq, snapshot, self._emit_key))
            sys.stdout.flush()
        try:
            p.write_json(self.path, snapshot, durable)
        except OSError as exc:
            if self._failing is None:
                _say(f"cannot write the job file ({exc.strerror or exc}); retrying")
            self._failing = exc
            self._last_write = time.monotonic()
            self._dirty = True
            if not self._closed:
                self._wake_flusher()
            return False
        if self._failing is not None:
            _say("the job file is written again")
            self._failing = None
        self._last_write = time.monotonic()
        self._dirty = False
        return True

    def _wake_flusher(self) -> None:
        """Have the flushing thread write what is due (the lock held). Started only now:
        a job that ends within one interval of its start needs no thread at all."""
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_loop, name="job-file",
                                             daemon=True)
            self._flusher.start()
        else:
            self._cond.notify()

    def _flush_loop(self) -> None:
        with self._cond:
            while not self._closed:
                if not self._dirty or self._job is None:
                    self._cond.wait()
                    continue
                wait = self._last_write + WRITE_INTERVAL_S - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                elif not self._closed:
                    self._write_locked(self._job)

    def _echo_output(self, job: Job) -> None:
        text = job.output
        sys.stdout.write(text[self._echoed:])
        sys.stdout.flush()
        self._echoed = len(text)


def _patience_s() -> float:
    """How long the final state waits for a writable folder (the supervisor's setting)."""
    try:
        value = float(os.environ.get(p.FINAL_WRITE_PATIENCE_ENV, ""))
    except ValueError:
        return p.FINAL_WRITE_PATIENCE_S  # run by hand
    return value if 0 < value <= 86400 else p.FINAL_WRITE_PATIENCE_S


def _say(text: str) -> None:
    """A line for the job's log, which may itself be unwritable."""
    try:
        print(text, file=sys.stderr, flush=True)
    except OSError:
        pass


class ConsoleSink(Sink):
    """Direct mode: output to stdout as it grows, progress to stderr."""

    def __init__(self) -> None:
        self._echoed = 0
        self._last_progress: Any = None

    def changed(self, job: Job) -> None:
        text = job.output
        if len(text) > self._echoed:
            sys.stdout.write(text[self._echoed:])
            sys.stdout.flush()
            self._echoed = len(text)
        progress = job.data.get(p.F_PROGRESS)
        if progress and progress != self._last_progress:
            self._last_progress = dict(progress)
            sys.stderr.write(_progress_line(progress))
            sys.stderr.flush()

    def finish(self, job: Job) -> None:
        self.changed(job)
        if self._last_progress is not None:
            sys.stderr.write("\n")
        result = job.data.get(p.F_RESULT)
        if result and not self._echoed:
            import json

            print(json.dumps(result, indent=2, ensure_ascii=False))
        elif self._echoed:
            print()


def _progress_line(progress: dict[str, Any]) -> str:
    fraction = progress.get("fraction")
    message = progress.get("message") or ""
    if fraction is None:
        return f"\r{message}"
    filled = int(fraction * 30)
    return f"\r[{'#' * filled}{'.' * (30 - filled)}] {fraction * 100:5.1f}% {message}"
