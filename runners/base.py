"""What every runner shares: read the job, report into it, finish it, obey a stop.

A runner module defines `execute(job: Job) -> dict | None` and calls `main()`:

    python -m runners.<kind> --job-file var/jobs/<id>/job.json   # as the launcher does
    python -m runners.<kind> [direct options]                # by hand, no job file

Standard library only (plus the kind's own client): this runs in every subprocess.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from jobs import protocol as p
from jobs.protocol import remote, trust

if sys.platform != "win32":
    # At import, so that the fork server has it loaded, not each runner it forks.
    import resource

# Every runner pays for its imports at start: typing and pathlib stay out of run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence
    from contextlib import AbstractContextManager
    from types import FrameType
    from typing import Any, TextIO, TypeAlias

    Execute: TypeAlias = Callable[["Job"], "dict[str, Any] | None"]
    DirectParser: TypeAlias = Callable[[argparse.ArgumentParser], None]
    DirectInput: TypeAlias = Callable[[argparse.Namespace], dict[str, Any]]
    DirectContext: TypeAlias = Callable[[argparse.Namespace], AbstractContextManager[Any]]

WRITE_INTERVAL_S = 0.2  # at most five job-file writes a second while running
FINAL_WRITE_PATIENCE_S = 600.0  # how long the final state waits for an unwritable folder
FINAL_RETRY_S = 0.5
LOG_CHECK_BYTES = 64 * 1024  # a runner with a capped log looks at its size this often

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_STOPPED = 3
EXIT_RETRY = p.EXIT_RETRY


class StopRequested(BaseException):
    """Raised in the main thread when the runner is told to stop (signal or deadline)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RunnerError(Exception):
    """A failure with a type and a message a user can act on (no traceback shown)."""

    def __init__(self, message: str, error_type: str = p.ErrorType.RUNNER,
                 transient: bool = False) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        # Another attempt may well succeed (a server refusing, overloaded or failing):
        # the job is retried while it has attempts left.
        self.transient = transient


class Sink:
    """Where a job's reports go: its job file, or the terminal."""

    def changed(self, job: Job) -> None:
        raise NotImplementedError

    def finish(self, job: Job) -> None:
        raise NotImplementedError


OUTPUT_MAX_CHARS = 1_000_000  # a job's output in its job file; a chat's reply is far less
OUTPUT_CUT = f"\n[output cut at {OUTPUT_MAX_CHARS:,} characters: the rest is in the job's log]\n"


class Job:
    """The running job as a runner sees it: its input, and ways to report."""

    def __init__(self, data: dict[str, Any], sink: Sink, data_dir: str | None = None) -> None:
        self.data = data
        self.data_dir = data_dir  # Offload's data folder; None when run without a job file
        self._sink = sink
        self._chunks: list[str] = [data.get(p.F_OUTPUT) or ""]
        self._length = len(self._chunks[0])
        self._cut = False  # past OUTPUT_MAX_CHARS: the rest goes to the log
        self.lock = threading.Lock()

    @property
    def id(self) -> str:
        return str(self.data[p.F_ID])

    @property
    def input(self) -> dict[str, Any]:
        value = self.data.get(p.F_INPUT)
        return value if isinstance(value, dict) else {}

    def number(self, key: str, bounds: tuple[float, float, float], whole: bool = False) -> float:
        """An option of the input, or its default (see `number`)."""
        return number(self.input, key, bounds, whole)

    @property
    def output(self) -> str:
        return "".join(self._chunks)

    @property
    def has_output(self) -> bool:
        return len(self._chunks) > 1 or bool(self._chunks[0])

    def progress(self, fraction: float | None = None, message: str | None = None) -> None:
        if fraction is not None:
            fraction = min(1.0, max(0.0, float(fraction)))
        with self.lock:
            self.data[p.F_PROGRESS] = {"fraction": fraction, "message": message}
        self._sink.changed(self)

    def emit(self, text: str) -> None:
        """Append partial output (a chat's tokens as they stream). Past OUTPUT_MAX_CHARS
        it goes to the log instead: the job file is written again at every change and
        read whole by every follower, so it must stay small. Cut, not shifted: the
        output only ever grows, which the event streams' positions rely on."""
        if not text:
            return
        with self.lock:
            was_cut = self._cut
            kept = "" if was_cut else text[:OUTPUT_MAX_CHARS - self._length]
            if not was_cut:
                self._cut = len(kept) < len(text)
                self._chunks.append(kept + OUTPUT_CUT if self._cut else kept)
                self._length += len(kept)
        if len(kept) < len(text):
            print(text[len(kept):], end="", flush=True)  # the rest, in the log
        if not was_cut:  # once cut, the job file has nothing new to say
            self._sink.changed(self)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            self.data[p.F_OUTPUT] = "".join(self._chunks)
            self.data[p.F_RESOURCES] = resources()
            return dict(self.data)


def number(options: dict[str, Any], key: str, bounds: tuple[float, float, float],
           whole: bool = False) -> float:
    """An option, or its default; `bounds` is (default, lowest, highest), both ends
    allowed; with `whole`, an int. Any other value is a RunnerError that says why: it
    stops a job, and by hand (a kind's direct input) it is bad usage."""
    default, low, high = bounds
    value = options.get(key, default)
    if (not isinstance(value, (int, float)) or not low <= value <= high
            or (whole and value != int(value))):
        what = "a whole number" if whole else "a number"
        raise RunnerError(f"'{key}' must be {what} from {low:g} to {high:g}")
    return int(value) if whole else float(value)


def _deadline(text: str) -> float:
    """--timeout: seconds above 0, as the API's timeout_s (not NaN, not infinite)."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {text}")
    return value


def resources() -> dict[str, float] | None:
    """CPU seconds and peak RSS of this runner (and the children it waited for)."""
    if sys.platform == "win32":
        return _resources_psutil()
    else:  # a branch of its own: the type checker knows `resource` only off Windows
        own = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
        peak = _peak_rss_linux()
        if peak is None:
            unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, else KiB
            peak = own.ru_maxrss * unit / 2**20
        return {"cpu_s": round(cpu, 3), "peak_rss_mb": round(peak, 1)}


def _peak_rss_linux() -> float | None:
    # VmHWM restarts at exec; ru_maxrss would still count the fork server's pages.
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _resources_psutil() -> dict[str, float] | None:
    try:
        import psutil
    except ImportError:
        return None
    proc = psutil.Process()
    times = proc.cpu_times()
    mem = proc.memory_info()
    peak = getattr(mem, "peak_wset", mem.rss)
    return {"cpu_s": round(times.user + times.system, 3), "peak_rss_mb": round(peak / 2**20, 1)}


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
        self._failing = False
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
        waited for (FINAL_WRITE_PATIENCE_S), so the result lands once it is writable."""
        if self._echo:
            self._echo_output(job)
        with self._cond:
            self._closed = True
            self._cond.notify()
        give_up_at = time.monotonic() + FINAL_WRITE_PATIENCE_S
        while True:
            with self._cond:
                if self._write_locked(job, durable=True):
                    return
            if time.monotonic() > give_up_at:
                raise OSError(f"cannot write the final state to {self.path}")
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
            if not self._failing:
                _say(f"cannot write the job file ({exc.strerror or exc}); retrying")
            self._failing = True
            self._last_write = time.monotonic()
            self._dirty = True
            if not self._closed:
                self._wake_flusher()
            return False
        if self._failing:
            _say("the job file is written again")
            self._failing = False
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


def _say(text: str) -> None:
    """A line for the job's log, which may itself be unwritable."""
    try:
        print(text, file=sys.stderr, flush=True)
    except OSError:
        pass


class _CappedOutput:
    """A runner's sys.stdout or sys.stderr when its log is capped: after every
    LOG_CHECK_BYTES of output the log is cut in place past the cap (its start, a
    note, its latest output), so a runner printing without end cannot fill the disk."""

    def __init__(self, stream: TextIO, log_path: str, max_bytes: int,
                 written: list[int]) -> None:
        self._stream = stream
        self._log_path = log_path
        self._max_bytes = max_bytes
        self._written = written  # shared by stdout and stderr: one log file

    def write(self, text: str) -> int:
        n = self._stream.write(text)
        self._written[0] += len(text)
        if self._written[0] >= LOG_CHECK_BYTES:
            self._written[0] = 0
            self._stream.flush()
            p.cap_log(self._log_path, self._max_bytes)
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _cap_output(job_file: str) -> None:
    try:
        max_bytes = int(os.environ.get("OFFLOAD_LOG_MAX_BYTES", ""))
    except ValueError:
        return
    if max_bytes <= 0 or sys.stdout is None or sys.stdout.isatty():
        return
    log_path = p.sibling(job_file, p.LOG_FILE)
    written = [0]
    sys.stdout = _CappedOutput(sys.stdout, log_path, max_bytes, written)
    if sys.stderr is not None:
        sys.stderr = _CappedOutput(sys.stderr, log_path, max_bytes, written)


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


class _Stopper:
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


def main(
    kind: str,
    execute: Execute,
    add_arguments: DirectParser,
    direct_input: DirectInput,
    argv: Sequence[str] | None = None,
    direct_context: DirectContext | None = None,
) -> int:
    """`direct_context(args)`: a context manager around a run by hand (the chat runner
    starts a model server in it when none is configured)."""
    trust.private_files()  # forked or exec'd, by the supervisor or by hand: private files
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 2 and argv[0] == "--job-file":
        # The launcher's exact form: skip argparse, every millisecond of start counts.
        return run_job_file(argv[1], execute)
    if argv == [remote.REMOTE_FLAG]:
        return run_remote(execute)
    problem = _read_env_file()  # before the parser: its defaults may come from it
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    import argparse

    spec = getattr(sys.modules.get("__main__"), "__spec__", None)  # a kind of one's own too
    parser = argparse.ArgumentParser(prog=f"python -m {spec.name if spec else 'runners.' + kind}")
    parser.add_argument("--job-file", help="run this job file in the foreground")
    parser.add_argument("--force", action="store_true",
                        help="with --job-file: run it again even if it has finished")
    parser.add_argument("--timeout", type=_deadline, default=None,
                        help="seconds (direct mode)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.job_file is not None:
        return run_job_file(args.job_file, execute, force=args.force)
    try:  # before anything starts (the chat's model server): bad usage, exit 2
        job_input = direct_input(args)
    except (ValueError, RunnerError) as exc:
        parser.error(str(exc))
    data = p.new_job("0" * 32, kind, job_input, args.timeout or 0)
    if direct_context is None:
        return _run(Job(data, ConsoleSink()), execute, _Stopper(None), args.timeout)
    try:
        with direct_context(args):
            return _run(Job(data, ConsoleSink()), execute, _Stopper(None), args.timeout)
    except RunnerError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_FAILED


def _read_env_file() -> str | None:
    """By hand, the settings of the `.env` the server reads (the environment first, even
    where it sets one empty): the model server and its key, say; only the names the server
    reads (OFFLOAD_*, OPENAI_*; any case, as it reads them), and never the API's token,
    which no runner is given. Why it is not read, if it is not to be."""
    path = trust.env_file()
    try:
        values = trust.env_file_values(path)
    except trust.UnsafeSettingsFile as exc:  # it could send the chat to another's listener
        return (f"refusing to read {path}: {exc}. Run from a folder of your own, or set "
                "OFFLOAD_ENV_FILE to a file of yours")
    except (OSError, UnicodeError) as exc:
        return f"cannot read {path} ({exc}); it must be UTF-8 text"
    for name, value in values.items():
        name = name.upper()
        if (value is not None and name.startswith(("OFFLOAD_", "OPENAI_"))
                and name != "OFFLOAD_API_TOKEN" and name not in os.environ):
            try:
                os.environ[name] = value
            except ValueError:  # a NUL in it: no environment can hold it
                return f"{path} sets {name} to a value with a NUL character in it"
    return None


def run_remote(execute: Execute) -> int:
    """A job sent by the Ray launcher: its JSON travels in the environment (see
    `remote.job_env`), its snapshots go back on stdout, and a scratch job file on this node
    keeps the usual machinery (stop reason, data folder) working."""
    # The launch's secret for its snapshot lines; out of the environment the job's own
    # child processes inherit.
    key = os.environ.pop(remote.SNAPSHOT_KEY_ENV, "")
    try:
        data = remote.pop_job(os.environ)
    except ValueError as exc:
        print(f"error: cannot read the job from the environment: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not key:
        print(f"error: {remote.SNAPSHOT_KEY_ENV} is not set: the launcher that sent this job "
              "gives each launch its own key, and snapshots are only read with it",
              file=sys.stderr)
        return EXIT_USAGE
    # The node's own data folder when it has one (a shared disk for training data),
    # else a new private folder of its own (a fixed name in the shared /tmp could be
    # another account's, or its link); never the jobs/ folder an API there may own.
    import shutil
    import tempfile

    data_dir = os.environ.get("OFFLOAD_DATA_DIR")
    root = data_dir or tempfile.mkdtemp(prefix="offload-remote-")
    folder = os.path.join(root, "remote", data[p.F_ID])
    try:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, p.JOB_FILE)
        p.write_json(path, data)
        return run_job_file(path, execute, force=True, emit_key=key)
    finally:
        shutil.rmtree(folder if data_dir else root, ignore_errors=True)


def _host() -> str:
    if sys.platform == "win32":
        return os.environ.get("COMPUTERNAME", "")
    return os.uname().nodename


def _other_runner(data: dict[str, Any]) -> str | None:
    """The runner that runs this job now, in words, if it is another process than this
    one (a supervisor launches only queued jobs: a running one was started before)."""
    pid, host = data.get(p.F_PID), data.get(p.F_HOST)
    if data.get(p.F_STATE) != p.JobState.RUNNING or not isinstance(pid, int) or pid <= 0:
        return None
    if isinstance(host, str) and host and host != _host():
        return f"pid {pid} on {host}"
    return f"pid {pid}" if pid != os.getpid() and _alive(pid) else None


def _alive(pid: int) -> bool:
    if sys.platform == "win32":
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x100000, False, pid)  # SYNCHRONIZE
        if not handle:
            return False
        try:
            return bool(kernel32.WaitForSingleObject(handle, 0) == 0x102)  # WAIT_TIMEOUT
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another account's process
    return True


def run_job_file(path: str, execute: Execute, force: bool = False,
                 emit_key: str | None = None) -> int:
    try:
        data = p.read_json(path)
    except p.CorruptJobFile as exc:
        print(f"error: cannot read job file: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if data is None:
        print(f"error: no job file at {path}", file=sys.stderr)
        return EXIT_USAGE
    if data.get(p.F_STATE) in p.FINAL_STATES and not force:
        print(f"error: job {p.id_of(path)} has already finished ({data.get(p.F_STATE)}); "
              "pass --force to run it again", file=sys.stderr)
        return EXIT_USAGE
    runner = _other_runner(data)
    if runner is not None:  # one writer per job file: a second runner would undo its states
        print(f"error: job {p.id_of(path)} is running ({runner}); cancel it first "
              f"(offload cancel {p.id_of(path)}) or wait for it to end", file=sys.stderr)
        return EXIT_USAGE
    try:
        p.sync_claim(path)  # nothing of the job runs before its claim is on disk
    except OSError as exc:
        # A transient failure: queued again while the job has attempts left.
        print(f"error: cannot put the job's claim on disk ({exc.strerror or exc}); "
              "nothing of the job ran", file=sys.stderr)
        return EXIT_RETRY
    _cap_output(path)
    stopper = _Stopper(path)
    if hasattr(signal, "SIGHUP"):
        # The API's terminal closing must not end the job (it is not a new session).
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    data.update({
        p.F_STATE: p.JobState.RUNNING, p.F_STARTED_AT: p.now_iso(), p.F_FINISHED_AT: None,
        p.F_PID: os.getpid(), p.F_EXIT_CODE: None, p.F_ERROR: None, p.F_RESULT: None,
        p.F_OUTPUT: "", p.F_PROGRESS: None, p.F_HOST: _host(),
        p.F_LAUNCHER: p.RAY if emit_key else p.LOCAL,
    })
    sink = FileSink(path, echo=sys.stdout.isatty() and not emit_key, emit_key=emit_key)
    # <data>/jobs/<id>/job.json
    job = Job(data, sink, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(path)))))
    timeout = data.get(p.F_TIMEOUT_S)
    try:  # a deadline that passes at once (1e-300 s) is met here: as any other
        stopper.install(float(timeout) if isinstance(timeout, (int, float)) else None)
        sink.start(job)
    except StopRequested as stop:
        # Stopped before it could even say it runs: record that, then leave.
        return _stopped(job, stop.reason, stopper)
    return _run(job, execute, stopper, None)


def _run(job: Job, execute: Execute, stopper: _Stopper, timeout: float | None) -> int:
    sink = job._sink
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
        return _stopped(job, stop.reason, stopper)
    except RunnerError as exc:
        if not isinstance(sink, ConsoleSink):  # by hand, `_finish` says it, once
            print(f"error: {exc.message}", file=sys.stderr)
        error = {"type": exc.error_type, "message": exc.message}
        attempt, most = p.attempts(job.data)
        if exc.transient and attempt < most and stopper.job_file is not None:
            # Not final: the supervisor queues the job again, and a client polling it
            # sees it still in progress meanwhile.
            return _finish(job, sink, p.JobState.RUNNING, None, error, EXIT_RETRY, stopper)
        return _finish(job, sink, p.JobState.FAILED, None, error, EXIT_FAILED, stopper)
    except Exception as exc:
        import traceback

        traceback.print_exc()  # the whole story goes to the log; the job gets one line
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        error = {"type": p.ErrorType.RUNNER, "message": message}
        return _finish(job, sink, p.JobState.FAILED, None, error, EXIT_FAILED, stopper)
    return _finish(job, sink, p.JobState.COMPLETED, result or {}, None, EXIT_OK, stopper)


def _stopped(job: Job, reason: str, stopper: _Stopper) -> int:
    error = p.stop_error(reason, job.data.get(p.F_TIMEOUT_S))
    return _finish(job, job._sink, reason, None, error, EXIT_STOPPED, stopper)


def _finish(job: Job, sink: Sink, state: str, result: dict[str, Any] | None,
            error: dict[str, Any] | None, code: int, stopper: _Stopper) -> int:
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
