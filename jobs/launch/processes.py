"""Start a runner, tell whether it lives, stop its whole tree. Knows nothing of HTTP.

A runner is identified by its pid *and* its create time, so a reused pid is never
mistaken for it.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

import psutil

from jobs import protocol as p
from jobs.launch.fork_client import Forked, ForkServer, ForkServerError
from jobs.launch.pids import created, find, identity, taken_by_another
from jobs.settings import API_TOKEN_ENV

log = logging.getLogger(__name__)

_CAN_SPAWN_IDLE = sys.platform == "linux"
RUNNER_NICE = 19  # the API must always win the CPU; runners take what it leaves


class Child(Protocol):
    """A started runner we can wait for: `subprocess.Popen`, or `_Spawned` below."""

    pid: int
    returncode: int | None

    def wait(self) -> int: ...


class _Spawned:
    """A child started with os.posix_spawn; `wait()` reaps it (call it from one thread)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def wait(self) -> int:
        if self.returncode is None:
            try:
                _, status = os.waitpid(self.pid, 0)
                self.returncode = os.waitstatus_to_exitcode(status)
            except ChildProcessError:  # reaped elsewhere: gone, exit code unknown
                log.warning("runner %s was reaped by someone else", self.pid)
                self.returncode = -1
        return self.returncode


@dataclass
class Runner:
    job_id: str
    pid: int
    create_time: float | None
    child: Child | None = field(default=None, repr=False)  # None: adopted, not our child
    # Started in a group of its own, ours to kill; not one run by hand (its group is its
    # shell's pipeline: `... | tee out`).
    own_group: bool = True

    def record(self) -> dict[str, object]:
        return {"pid": self.pid, "create_time": self.create_time, **identity(),
                "launched_ns": time.time_ns()}


def command(module: str, job_file: Path) -> list[str]:
    return [p.PYTHON, "-m", module, "--job-file", str(job_file)]


def runner_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ, **p.PYTHON_ENV)
    env.pop(API_TOKEN_ENV, None)  # the API's alone (a supervisor started by hand has it)
    env.update(extra or {})
    env["PYTHONUNBUFFERED"] = "1"
    env[p.LAUNCHED_ENV] = "1"
    env.setdefault("PYTHONIOENCODING", "utf-8")
    # `python -m runners.<kind>` finds the project from any working folder.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [p.ROOT, env.get("PYTHONPATH")]))
    # Runners start often: let them cache their bytecode instead of compiling it each time.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def spawn(module: str, job_file: Path, env: dict[str, str] | None = None,
          forker: ForkServer | None = None, spare: Child | None = None) -> Runner:
    """Start a detached, low-priority runner whose output goes to the job's log: the
    warm `spare` that has taken this job (`jobs.launch.spare`), or forked by `forker`
    when there is one (Linux), else a new interpreter. A new interpreter
    replaces a fork only when the fork server says it started none (ForkServerError);
    if it cannot tell, ForkInDoubt (an OSError) fails the job: never two runners."""
    argv = command(module, job_file)
    log_path = p.sibling(job_file, p.LOG_FILE)
    child: Child | None = spare
    if child is None and forker is not None:
        try:
            child = forker.spawn(module, job_file, log_path)
        except ForkServerError as exc:
            log.warning("job %s: %s; starting its runner as a new interpreter",
                        p.id_of(job_file), exc)
    if child is None:
        child, _ = new_interpreter(argv, runner_env(env), log_path)
    runner = Runner(p.id_of(job_file), child.pid, None, child)
    # From here on its runner exists: nothing may raise (the caller would take the job
    # for one that never started, and run it again).
    try:
        proc = psutil.Process(child.pid)
        runner.create_time = created(child.pid)
        _lower_priority(proc)
    except (psutil.Error, OSError):  # exited already (reaped later), or out of file handles
        pass
    return runner


@dataclass
class Pipes:
    """A child's stdin, to write to, and its stdout, to read."""

    stdin: IO[bytes]
    stdout: IO[bytes]


def new_interpreter(argv: list[str], env: dict[str, str],
                    log_path: str | None) -> tuple[Child, Pipes | None]:
    """Start `argv` detached (a process group of its own; SCHED_IDLE on Linux). With a log:
    its output goes there and its stdin is empty (a runner). Without: its stdin and
    stdout are pipes, returned, and its stderr is this process's (a spare,
    `jobs.launch.spare`)."""
    if _CAN_SPAWN_IDLE:
        return _idle_spawner.spawn(argv, env, log_path)
    proc = _popen(argv, env, log_path)
    if log_path is not None:
        return proc, None
    assert proc.stdin is not None and proc.stdout is not None
    return proc, Pipes(proc.stdin, proc.stdout)


class _IdleSpawner:
    """Linux: runners are SCHED_IDLE from their first instruction.

    Lowering a runner after Popen returned left its interpreter start-up at normal
    priority, and fifty of those at once took the CPU from the API. posix_spawn cannot
    ask for SCHED_IDLE (glibc accepts only the POSIX policies), but a child inherits the
    policy of the thread that spawns it: so one thread, SCHED_IDLE for good (an
    unprivileged thread cannot go back), does every spawn.
    """

    def __init__(self) -> None:
        self._requests: queue.Queue[tuple[list[str], dict[str, str], str | None,
                                          Future[tuple[int, tuple[int, int] | None]]]] = (
            queue.Queue())
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def spawn(self, argv: list[str], env: dict[str, str],
              log_path: str | None) -> tuple[_Spawned, Pipes | None]:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="idle-spawner",
                                                daemon=True)
                self._thread.start()
        done: Future[tuple[int, tuple[int, int] | None]] = Future()
        self._requests.put((argv, env, log_path, done))
        pid, fds = done.result()
        if fds is None:
            return _Spawned(pid), None
        return _Spawned(pid), Pipes(os.fdopen(fds[0], "wb", buffering=0),
                                    os.fdopen(fds[1], "rb"))

    def _serve(self) -> None:
        if sys.platform == "win32":
            return  # never started there (Linux only)
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # this thread only
        except OSError as exc:
            log.warning("runners will start at normal priority: %s", exc)
        while True:
            argv, env, log_path, done = self._requests.get()
            try:
                done.set_result(_posix_spawn(argv, env, log_path))
            except BaseException as exc:  # handed to the caller, who raises it
                done.set_exception(exc)


def _posix_spawn(argv: list[str], env: dict[str, str],
                 log_path: str | None) -> tuple[int, tuple[int, int] | None]:
    """Its pid, and without a log our ends of its stdin and stdout (see new_interpreter)."""
    if sys.platform == "win32":
        raise OSError("posix_spawn is not on Windows")
    if log_path is None:
        # Not inheritable: no other child holds them open, so each end sees the other close.
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        try:
            pid = os.posix_spawn(argv[0], argv, env, setpgroup=0,
                                 file_actions=[(os.POSIX_SPAWN_DUP2, stdin_r, 0),
                                               (os.POSIX_SPAWN_DUP2, stdout_w, 1)])
        except BaseException:
            os.close(stdin_w)
            os.close(stdout_r)
            raise
        finally:
            os.close(stdin_r)
            os.close(stdout_w)
        return pid, (stdin_w, stdout_r)
    log_fd = p.open_log(log_path)
    try:
        return os.posix_spawn(
            argv[0], argv, env, setpgroup=0,  # its own process group, as in _popen
            file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                          (os.POSIX_SPAWN_DUP2, log_fd, 1),
                          (os.POSIX_SPAWN_DUP2, log_fd, 2)]), None
    finally:
        os.close(log_fd)


_idle_spawner = _IdleSpawner()


def _popen(argv: list[str], env: dict[str, str],
           log_path: str | None) -> subprocess.Popen[bytes]:
    kwargs: dict[str, object] = {}
    if sys.platform == "win32":
        kwargs["creationflags"] = (
            subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW)
    elif sys.version_info >= (3, 11):
        # Its own process group: Ctrl+C in the API's terminal does not reach it, it
        # outlives the API, and killpg stops it with its children. Not a new session:
        # on Linux each session is a scheduling autogroup, which the kernel shares
        # equally with the API's, whatever the runner's priority.
        kwargs["process_group"] = 0
    else:
        # macOS on Python 3.10 (Linux spawns with posix_spawn): a session of its own, which
        # also leads a group of its number; preexec_fn may deadlock in a process with threads.
        kwargs["start_new_session"] = True
    if log_path is None:
        return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, close_fds=True,
            env=env, cwd=p.ROOT, **kwargs)
    with open(p.open_log(log_path), "ab") as log_file:
        return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
            argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            close_fds=True, env=env, cwd=p.ROOT, **kwargs)


def lower_priority_of(pid: int) -> None:
    """For helpers such as the embedded model's server: SCHED_IDLE where there is one."""
    try:
        _lower_priority(psutil.Process(pid))
        if sys.platform == "linux":
            os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
    except (psutil.Error, OSError) as exc:
        log.debug("could not lower priority of %s: %s", pid, exc)


def _lower_priority(proc: psutil.Process) -> None:
    """The API must always win the CPU; runners take what it leaves.

    Linux: SCHED_IDLE (set at spawn): a nice 19 runner still finishes its time slice
    before a woken API worker runs (EEVDF); a SCHED_IDLE one yields at once. Elsewhere:
    nice 19, or BELOW_NORMAL_PRIORITY_CLASS on Windows.
    """
    try:
        if sys.platform == "win32":
            proc.nice(psutil.BELOW_NORMAL_PRIORITY_CLASS)  # type: ignore[attr-defined,unused-ignore]
        else:
            proc.nice(RUNNER_NICE)
    except psutil.Error as exc:
        log.debug("could not lower priority of %s: %s", proc.pid, exc)


def is_alive(runner: Runner) -> bool:
    if runner.child is not None:
        # Our child: the supervisor's waiter thread reaps it and sets the return code.
        return runner.child.returncode is None
    return find(runner.pid, runner.create_time) is not None


def exit_code(runner: Runner) -> int | None:
    """The exit code when we started it (negative: killed by that signal), else None."""
    if runner.child is None or (isinstance(runner.child, Forked) and runner.child.lost):
        return None
    return runner.child.returncode


def stop_tree(runner: Runner, grace_s: float) -> None:
    """Terminate the runner and every descendant; kill what is left after `grace_s`."""
    proc = find(runner.pid, runner.create_time)
    if proc is None:
        kill_group(runner)
        return
    try:
        tree = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        tree = [proc]
    _terminate(proc, tree)
    alive = _wait_gone(runner, tree, grace_s)
    for leftover in alive:
        try:
            leftover.kill()
        except psutil.Error:
            pass  # exited between the wait and the kill; fine
    _wait_gone(runner, alive, grace_s)
    kill_group(runner)


def _wait_gone(runner: Runner, procs: list[psutil.Process],
               timeout: float) -> list[psutil.Process]:
    """Wait for `procs` to exit; those still alive. Our own child is never reaped here:
    its waiter thread does that, and keeps the exit code."""
    ours = [p for p in procs if runner.child is not None and p.pid == runner.pid]
    others = [p for p in procs if p not in ours]
    deadline = time.monotonic() + timeout
    _, alive = psutil.wait_procs(others, timeout=timeout)
    while ours and is_alive(runner) and time.monotonic() < deadline:
        time.sleep(0.01)
    return alive + [p for p in ours if is_alive(runner)]


def _terminate(proc: psutil.Process, tree: list[psutil.Process]) -> None:
    if sys.platform == "win32":
        try:
            # A runner of this console turns it into its `cancelled`/`timeout`; one in a
            # console of its own (no window) finds the stop request itself, within 0.1 s.
            os.kill(proc.pid, signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined,unused-ignore]
        except OSError:
            pass
        rest = tree[1:]
    else:
        rest = tree
    for each in rest:
        try:
            each.terminate()
        except psutil.Error:
            pass  # already gone; fine


def kill_group(runner: Runner) -> None:
    """POSIX: kill what is left of the runner's process group (orphaned grandchildren).
    The group bears the runner's pid, and no new process gets a pid that a group still
    bears: if another process has that pid now, the runner's group is gone, and the
    group of that number is another's."""
    if (sys.platform == "win32" or not runner.own_group
            or taken_by_another(runner.pid, runner.create_time)):
        return
    try:
        os.killpg(runner.pid, signal.SIGKILL)  # type: ignore[attr-defined,unused-ignore]
    except (ProcessLookupError, PermissionError):
        pass  # ESRCH: the group is empty; fine


def describe_exit(code: int | None) -> str:
    if code is None:
        return ("exit code unknown (it was started by an earlier supervisor, or by a "
                "fork server that ended first)")
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"exit code {code}, killed by {name}"
    return f"exit code {code}"
