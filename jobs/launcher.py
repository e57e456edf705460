"""Start a runner, tell whether it lives, stop its whole tree. Knows nothing of HTTP.

A runner is identified by its pid *and* its create time, so a reused pid is never
mistaken for it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from jobs import protocol as p

log = logging.getLogger(__name__)

_TOLERANCE_S = 0.05  # create times compared to this precision
IS_WINDOWS = sys.platform == "win32"


@dataclass
class Runner:
    job_id: str
    pid: int
    create_time: float | None
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def record(self) -> dict[str, object]:
        return {"pid": self.pid, "create_time": self.create_time, "launched_ns": time.time_ns()}


def command(module: str, job_file: Path) -> list[str]:
    # sys.executable, never a bare "python": PATH may hold shims or another interpreter.
    return [sys.executable, "-m", module, "--job-file", str(job_file)]


def spawn(module: str, job_file: Path, env: dict[str, str] | None = None) -> Runner:
    """Start a detached, low-priority runner whose output goes to the job's log."""
    kwargs: dict[str, object] = {}
    if IS_WINDOWS:
        kwargs["creationflags"] = (
            subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW  # type: ignore[attr-defined,unused-ignore]
        )
    else:
        kwargs["start_new_session"] = True  # survives the API; Ctrl+C in its terminal too
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env["PYTHONUNBUFFERED"] = "1"
    # Runners start often: let them cache their bytecode (recompiling costs ~5 ms a start).
    full_env.pop("PYTHONDONTWRITEBYTECODE", None)
    full_env.setdefault("PYTHONIOENCODING", "utf-8")
    with open(p.sibling(job_file, p.LOG_SUFFIX), "ab") as log_file:
        popen = subprocess.Popen(  # type: ignore[call-overload]
            command(module, job_file),
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            close_fds=True, env=full_env, cwd=str(Path(__file__).resolve().parent.parent),
            **kwargs,
        )
    runner = Runner(p.id_of(job_file), popen.pid, None, popen)
    try:
        proc = psutil.Process(popen.pid)
        runner.create_time = proc.create_time()
        _lower_priority(proc)
    except psutil.Error:
        pass  # exited already (it stays a zombie until waited, so this is rare); reaped later
    return runner


def _lower_priority(proc: psutil.Process) -> None:
    try:
        if IS_WINDOWS:
            proc.nice(psutil.BELOW_NORMAL_PRIORITY_CLASS)  # type: ignore[attr-defined,unused-ignore]
        else:
            proc.nice(10)
    except psutil.Error as exc:
        log.debug("could not lower priority of %s: %s", proc.pid, exc)


def find(pid: int, create_time: float | None) -> psutil.Process | None:
    """The live process with this pid and create time, or None."""
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > _TOLERANCE_S:
            return None  # the pid was reused by another process
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.Error:
        return None


def is_alive(runner: Runner) -> bool:
    if runner.popen is not None:
        return runner.popen.poll() is None
    return find(runner.pid, runner.create_time) is not None


def exit_code(runner: Runner) -> int | None:
    """The exit code when we started it (negative: killed by that signal), else None."""
    if runner.popen is None:
        return None
    return runner.popen.poll()


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
    _, alive = psutil.wait_procs(tree, timeout=grace_s)
    for leftover in alive:
        try:
            leftover.kill()
        except psutil.Error:
            pass  # exited between the wait and the kill; fine
    psutil.wait_procs(alive, timeout=grace_s)
    kill_group(runner)


def _terminate(proc: psutil.Process, tree: list[psutil.Process]) -> None:
    if IS_WINDOWS:
        try:
            # The runner turns CTRL_BREAK into a clean `cancelled`/`timeout` final state.
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
    """POSIX: kill what is left of the runner's process group (orphaned grandchildren)."""
    if IS_WINDOWS:
        return
    try:
        os.killpg(runner.pid, signal.SIGKILL)  # type: ignore[attr-defined,unused-ignore]
    except (ProcessLookupError, PermissionError):
        pass  # ESRCH: the group is empty; fine


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exit code unknown (it was started by an earlier API process)"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"exit code {code}, killed by {name}"
    return f"exit code {code}"
