"""A job run from its file: read, refused if it is not this runner's to run, claimed,
then run, its log kept under OFFLOAD_LOG_MAX_BYTES by the runner itself (a line it has no
room for dropped); or sent by the Ray launcher in the environment, its snapshots on stdout."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import time

from jobs import protocol as p
from jobs.protocol import remote
from runners.execution import EXIT_RETRY, EXIT_USAGE, Stopper, StopRequested, run, stopped
from runners.job import Job
from runners.sinks import FileSink

# Every runner pays for its imports at start: typing stays out of run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TextIO

    from runners.execution import Execute

LOG_CHECK_BYTES = 64 * 1024  # a runner with a capped log looks at its size this often


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


def _claim_by_hand(path: str) -> int | None:
    """This runner's claim of a queued job; where one is there already (a supervisor's),
    or it cannot be written, the exit code, said why. A supervisor about to launch the
    job finds the claim and watches this runner instead, as it watches the runners it
    finds after a restart."""
    # Its pid alone, as a supervisor's bare claim: its start shows in the job file (or its
    # command line) to tell it from a process that took its pid later.
    record = {"pid": os.getpid(), "claimed_by": os.getpid(), "launched_ns": time.time_ns(),
              "by_hand": True}
    path = os.path.abspath(path)  # taken from the supervisor's folder, not this one's
    try:
        p.write_json(p.sibling(path, p.RUN_FILE), p.launch_record(path, record),
                     exclusive=True)
    except FileExistsError:
        print(f"error: job {p.id_of(path)} is claimed already (its {p.RUN_FILE}): a "
              "supervisor is starting it, or one stopped as it did and the next takes it "
              f"on; wait for it (offload wait {p.id_of(path)}), and pause the queue "
              "(offload pause) before running a queued job by hand", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"error: cannot put the job's claim on disk ({exc.strerror or exc}); "
              "nothing of the job ran", file=sys.stderr)
        return EXIT_RETRY
    return None


def _take_back_claim(path: str) -> None:
    """Remove this runner's claim by hand, under which nothing ran: the job stays queued,
    for a supervisor (or another run by hand) to start."""
    with contextlib.suppress(OSError):
        os.unlink(p.sibling(path, p.RUN_FILE))


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


def run_job_file(path: str, execute: Execute, kind: str | None = None, force: bool = False,
                 emit_key: str | None = None) -> int:
    """`kind`: the runner's own; a job of another built-in kind is refused (one's own kinds
    may share a runner: `OFFLOAD_KINDS=nap=runners.sleep`)."""
    parent = os.getppid()  # its launcher's: another at its end if that one has left
    log_output(path)
    try:
        data = p.read_json(path)
    except p.CorruptJobFile as exc:
        print(f"error: cannot read job file: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if data is None:
        print(f"error: no job file at {path}", file=sys.stderr)
        return EXIT_USAGE
    its_kind = data.get(p.F_KIND)
    if kind is not None and its_kind != kind and its_kind in p.BUILT_IN_KINDS:
        # Its input run by another runner: a finished chat's reply replaced by a sleep's.
        print(f"error: job {p.id_of(path)} is a {its_kind} job, not a {kind} one: run it with "
              f"python -m {p.BUILT_IN_KINDS[its_kind]} --job-file {path}", file=sys.stderr)
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
    launched = os.environ.pop(p.LAUNCHED_ENV, None) is not None or emit_key is not None
    # A supervisor launches queued jobs too: one claim of the two is made.
    by_hand = not launched and data.get(p.F_STATE) == p.JobState.QUEUED
    if by_hand and (refused := _claim_by_hand(path)) is not None:
        return refused
    try:
        p.sync_claim(path)  # nothing of the job runs before its claim is on disk
    except OSError as exc:
        # A transient failure: queued again while the job has attempts left.
        if by_hand:
            _take_back_claim(path)
        print(f"error: cannot put the job's claim on disk ({exc.strerror or exc}); "
              "nothing of the job ran", file=sys.stderr)
        return EXIT_RETRY
    queued = data.get(p.F_STATE) == p.JobState.QUEUED  # as launched (a finished one: --force)
    stopper = Stopper(path, launched)
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
        if queued and (reason := p.stop_reason(path)) is not None:
            # Cancelled between its launch and now: left to the supervisor's next pass,
            # a supervisor stalled or restarting meanwhile let it run to its end.
            stopper.finishing = True  # one stop: a signal or the stop's watch now is none
            raise StopRequested(reason)
        sink.start(job)
    except StopRequested as stop:
        # Stopped before it could even say it runs: record that, then leave.
        return _leaving(stopped(job, stop, stopper), launched, parent)
    return _leaving(run(job, execute, stopper, None), launched, parent)


def _leaving(code: int, launched: bool, parent: int) -> int:
    """`code`, once a launched runner whose launcher has left (a supervisor's restart) has
    killed what it started and left in its process group, as that supervisor does at a
    runner's end it watches. Its group is its own while it lives: nobody else's is in it."""
    if sys.platform == "win32":  # no process groups
        return code
    me = os.getpid()
    if not launched or os.getppid() == parent or os.getpgrp() != me:
        return code
    for pid in _in_group(me):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return code


def _in_group(pgid: int) -> list[int]:
    """The other processes of process group `pgid`, as /proc lists them (Linux; elsewhere
    none is found: a runner imports no psutil)."""
    found = []
    for name in os.listdir("/proc") if sys.platform == "linux" else ():
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()  # state, ppid, pgrp, ...
            if name.isdigit() and int(fields[2]) == pgid and int(name) != pgid:
                found.append(int(name))
        except (OSError, IndexError, ValueError):
            continue  # not a process, or ended meanwhile
    return found




# A log that has no room for a line: the line is dropped, the job goes on (its job file
# holds what matters, and its final state waits for room).
LOG_FULL = p.DISK_FULL | {errno.EFBIG}


class _LogOutput:
    """A runner's sys.stdout or sys.stderr, its job's log. On a full disk a write fails:
    raised, it ended a runner whose job had failed while printing why (the job was then
    `lost`, its error never written). Capped, after every LOG_CHECK_BYTES of output the
    log is cut in place past the cap (its start, a note, its latest output), so a runner
    printing without end cannot fill the disk."""

    def __init__(self, stream: TextIO, log_path: str, max_bytes: int,
                 written: list[int]) -> None:
        self._stream = stream
        self._log_path = log_path
        self._max_bytes = max_bytes  # 0: not capped
        self._written = written  # shared by stdout and stderr: one log file

    def write(self, text: str) -> int:
        try:
            n = self._stream.write(text)
        except OSError as exc:
            if exc.errno not in LOG_FULL:
                raise
            return len(text)
        self._written[0] += len(text)
        if self._max_bytes and self._written[0] >= LOG_CHECK_BYTES:
            self._written[0] = 0
            self.flush()
            p.cap_log(self._log_path, self._max_bytes)
        return n

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            if exc.errno not in LOG_FULL:
                raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def log_output(job_file: str) -> None:
    """The runner's output into its job's log, as `_LogOutput` keeps it."""
    if sys.stdout is None or sys.stdout.isatty():
        return
    try:
        max_bytes = max(0, int(os.environ.get("OFFLOAD_LOG_MAX_BYTES", "")))
    except ValueError:
        max_bytes = 0
    if not p.LOGS_CUT_WHILE_WRITTEN:
        max_bytes = 0
    log_path = p.sibling(job_file, p.LOG_FILE)
    written = [0]
    sys.stdout = _LogOutput(sys.stdout, log_path, max_bytes, written)
    if sys.stderr is not None:
        sys.stderr = _LogOutput(sys.stderr, log_path, max_bytes, written)
