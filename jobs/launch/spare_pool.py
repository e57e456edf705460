"""The supervisor's warm spares (`jobs.launch.spare`): started ahead, each given exactly
one job, replaced in the background, stopped with the launcher."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from jobs import protocol as p
from jobs.launch import processes
from jobs.launch.spare import READY
from jobs.launch.warm import TITLE_ROOM, TITLE_ROOM_ENV

log = logging.getLogger(__name__)

SPARE_MODULE = "jobs.launch.spare"  # what a spare's command line shows until it takes a job

SPARES = 2  # warm at a time: a job and the next find one; more only wait on the same CPUs
# After a spare could not be started, or ended before it was warm (a broken environment,
# a project file mid-edit): the next waits this long, twice as long after each further
# failure up to MAX_RETRY_S, so a pool that cannot start spares neither spins nor floods
# the log; jobs start as new interpreters meanwhile.
RETRY_S = 5.0
MAX_RETRY_S = 300.0
# A spare's imports take the CPU the runner just started needs: spares are started once
# no job has been launched for this long, about a short job's run, so that jobs back to
# back still find one. Under a burst, jobs start as new interpreters.
QUIET_S = 0.02


@dataclass(eq=False)
class _Spare:
    child: processes.Child
    pipes: processes.Pipes  # its stdin takes the job; its stdout says when it is warm
    modules: tuple[str, ...]  # the runners it was asked to import
    warm: bool = False


class SparePool:
    """Up to `size` warm spares, started in the background once the first is asked for
    and replaced there as they are taken, once launches pause (QUIET_S). Each imports the
    runner of the latest job launched, as jobs come in runs of one kind (a chat's runner
    imports its HTTP client and TLS, which a spare for a run of other jobs would import
    for each of them), if it is one of `preloadable`: the project's own, whose import does
    nothing but define (another kind's import could exit, block or leave threads in the
    next job's process; its runner imports it, as a forked one does). Thread-safe."""

    def __init__(self, env: dict[str, str], preloadable: Sequence[str],
                 size: int = SPARES) -> None:
        self._preloadable = frozenset(preloadable)
        self._modules: tuple[str, ...] = ()  # what the next spare started imports
        # The room for its runner's title, as the fork server has it (see fork_client.py).
        self._env = {**env, TITLE_ROOM_ENV: " " * TITLE_ROOM}
        self._size = size
        self._idle: deque[_Spare] = deque()
        self._changed = threading.Condition()
        self._closed = False
        self._filler: threading.Thread | None = None
        self._last_asked = 0.0  # time.monotonic() of the latest take()
        self._retry_s = RETRY_S  # the next pause after a failed start
        self._resume_at = 0.0  # time.monotonic() before which no spare is started

    def take(self, module: str, job_file: Path) -> processes.Child | None:
        """A warm spare that has been given this job (it is now its runner), or None when
        none is warm: the caller starts a new interpreter (a spare still importing may have
        more left to do than that). Never waits for one."""
        line = (json.dumps({"module": module, "job_file": str(job_file)}) + "\n").encode()
        with self._changed:
            self._last_asked = time.monotonic()
            if module in self._preloadable:
                self._modules = (module,)
            if self._filler is None:
                self._filler = threading.Thread(target=self._fill, daemon=True,
                                                 name="spares")
                self._filler.start()
        while True:
            with self._changed:
                warm = [each for each in self._idle if each.warm]
                # One that imported this job's runner, else any: a runner imports the rest.
                spare = next((each for each in warm if module in each.modules),
                             warm[0] if warm else None)
                if spare is None:
                    return None
                self._idle.remove(spare)
                self._changed.notify_all()  # the filler replaces it once launches pause
            try:
                spare.pipes.stdin.write(line)
            except OSError as exc:  # it died idle: its stdin has no reader
                log.warning("spare %s is gone (%s); trying another", spare.child.pid, exc)
                _discard(spare, kill=False)
                continue
            _close(spare.pipes.stdin)  # it reads one line only
            return spare.child

    def close(self) -> None:
        """Stop the idle spares (those given a job are runners: they run on)."""
        with self._changed:
            self._closed = True
            idle, self._idle = list(self._idle), deque()
            self._changed.notify_all()
        for spare in idle:
            _discard(spare, kill=True)

    def _fill(self) -> None:
        while True:
            with self._changed:
                while not self._closed:
                    now = time.monotonic()
                    start_at = max(self._last_asked + QUIET_S, self._resume_at)
                    if len(self._idle) < self._size and now >= start_at:
                        break
                    self._changed.wait(start_at - now if now < start_at else None)
                if self._closed:
                    return
                modules = self._modules
            try:
                argv = [p.PYTHON, "-m", SPARE_MODULE, *modules]
                child, pipes = processes.new_interpreter(argv, self._env, None)
            except OSError as exc:
                with self._changed:
                    pause = self._pause()
                log.warning("cannot start a spare interpreter (runners start as new "
                            "interpreters meanwhile; another try in %.0f s): %s", pause, exc)
                continue
            assert pipes is not None
            processes.lower_priority_of(child.pid)
            spare = _Spare(child, pipes, modules)
            with self._changed:
                if not self._closed:
                    self._idle.append(spare)
                    threading.Thread(target=self._listen, args=(spare,), daemon=True,
                                     name=f"spare-{child.pid}").start()
                    continue
            _discard(spare, kill=True)
            spare.pipes.stdout.close()  # no listener was started to close it
            return

    def _listen(self, spare: _Spare) -> None:
        """Until its stdout closes (it took a job, or ended): is it warm yet?"""
        with spare.pipes.stdout as stdout:
            for line in stdout:
                if line == READY:
                    with self._changed:
                        spare.warm = True
                        self._retry_s = RETRY_S  # spares start again
                        self._changed.notify_all()
        with self._changed:
            if spare not in self._idle:
                return  # given a job, or closed
            self._idle.remove(spare)  # ended by itself: the filler replaces it
            pause = 0.0 if spare.warm else self._pause()  # killed, or could not start
            self._changed.notify_all()
        _close(spare.pipes.stdin)
        code = spare.child.wait()  # its stdout closed as it ended
        if pause:
            log.warning("spare %s ended with exit code %s before it was warm (its own "
                        "errors are on the supervisor's stderr, supervisor.out); runners "
                        "start as new interpreters, another spare in %.0f s",
                        spare.child.pid, code, pause)
        else:
            log.warning("spare %s ended with exit code %s before it was given a job",
                        spare.child.pid, code)

    def _pause(self) -> float:
        """No spare started for a while, longer after each failure (holding _changed);
        spares started before the pause and failing during it do not lengthen it."""
        now = time.monotonic()
        if self._resume_at > now:
            return self._resume_at - now
        pause = self._retry_s
        self._resume_at = now + pause
        self._retry_s = min(pause * 2, MAX_RETRY_S)
        return pause


def _discard(spare: _Spare, kill: bool) -> None:
    """End an idle spare and reap it (in the background: it may be mid-import)."""
    _close(spare.pipes.stdin)
    if kill:  # still our unreaped child: its pid cannot be another process's yet
        try:
            os.kill(spare.child.pid, signal.SIGTERM)  # TerminateProcess on Windows
        except OSError:
            pass  # gone already
    threading.Thread(target=spare.child.wait, daemon=True, name="spare-reaper").start()


def _close(stdin: IO[bytes]) -> None:
    try:
        stdin.close()
    except OSError:
        pass  # no reader left: nothing to tell it
