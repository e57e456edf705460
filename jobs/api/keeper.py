"""Each API worker makes sure a supervisor process runs (`python -m jobs.supervisor`).

Once a second it looks at the supervisor lock; when nobody holds it, it starts one.
With several workers several may start one at once: the lock lets one lead and the
others leave: one runs per data folder. Stopping the worker stops the supervisor it
started (another worker's keeper starts the next), never the runners.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import subprocess
import time

from filelock import FileLock, Timeout

from jobs import protocol as p
from jobs.protocol import embedded, trust
from jobs.protocol.wake import OUTPUT_FILE, lock_file
from jobs.settings import API_TOKEN_ENV, Settings

log = logging.getLogger(__name__)

CHECK_S = 1.0
_WRITABLE = "; make the data folder writable"
_WHAT_TO_DO = {errno.EROFS: _WRITABLE, errno.EACCES: _WRITABLE, errno.EPERM: _WRITABLE,
               errno.ENOSPC: "; free some space on its disk",
               errno.EDQUOT: "; free some space on its disk",
               errno.EISDIR: "; move away what is in its place"}
STOP_WAIT_S = 5.0


class SupervisorKeeper:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock_path = lock_file(settings.jobs_dir)
        self._child: subprocess.Popen[bytes] | None = None
        # Why the latest start failed (None: it did not): while none leads, no job runs.
        self.start_problem: str | None = None
        # Why the lock cannot be taken at all (None: it can): no supervisor started leads.
        self.lock_problem: str | None = None
        # When this worker first saw the lock held, since it last saw it free.
        self.led_since: float | None = None

    def led(self) -> bool:
        """Whether some supervisor holds the lock (blocking: call it from a thread). A lock
        no process can take (a folder in its place, a data folder made immutable) leaves
        every supervisor waiting its turn for good: kept as `lock_problem`."""
        probe = FileLock(str(self._lock_path), thread_local=False, mode=0o600)
        self.lock_problem = None
        try:
            probe.acquire(timeout=0)
        except Timeout:
            if self.led_since is None:
                self.led_since = time.time()
            return True
        except OSError as exc:
            self.lock_problem = _problem("no supervisor can take its lock", exc)
            self.led_since = None
            return False
        probe.release()
        self.led_since = None
        return False

    async def run(self) -> None:
        while True:
            try:
                if (self._child is None or self._child.poll() is not None) and not await (
                        asyncio.to_thread(self.led)):
                    await asyncio.to_thread(self._start)
                    self.start_problem = None
            except OSError as exc:  # an unwritable data folder: try again later
                problem = _problem("no supervisor can start", exc)
                if problem != self.start_problem:  # with what to do, as the health says it
                    log.warning("%s", problem)
                self.start_problem = problem
            await asyncio.sleep(CHECK_S)

    def _start(self) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        out_path = self.settings.data_dir / OUTPUT_FILE
        # Cut before a supervisor writes to it: the one moment Windows allows (its
        # handles do not append); the leader also cuts it while it runs elsewhere.
        p.cap_log(out_path, self.settings.log_max_bytes)
        # Absolute: the supervisor runs in the project's folder, not in this one.
        env = dict(os.environ, **p.PYTHON_ENV, OFFLOAD_DATA_DIR=str(self.settings.data_dir),
                   OFFLOAD_SCHEDULES_FILE=str(self.settings.schedules_file),
                   # the engine whose slots this API counts, not the one found now
                   **{embedded.ENGINE_ENV: self.settings.embedded_engine},
                   # the settings the API read, also from .env
                   **{trust.ENV_FILE_ENV: trust.env_file()})
        env.pop(API_TOKEN_ENV, None)  # it answers no request: the token stays the API's
        with open(out_path, "ab") as out:
            self._child = subprocess.Popen(
                [p.PYTHON, "-m", "jobs.supervisor", "--parent", str(os.getpid())],
                cwd=p.ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                # A session of its own is, on Linux, an autogroup of its own, which the
                # supervisor lowers: its bursts of launching then weigh little against
                # the API. It still leaves with the API (it watches its parent).
                stderr=subprocess.STDOUT, start_new_session=True)
        log.info("started a supervisor process (pid %s)", self._child.pid)

    def problem(self) -> str | None:
        """Why no supervisor leads, where that is known (call it when none does)."""
        return self.start_problem or self.lock_problem

    async def stop(self) -> None:
        child = self._child
        if child is None or child.poll() is not None:
            return
        child.terminate()
        try:
            await asyncio.wait_for(asyncio.to_thread(child.wait), STOP_WAIT_S)
        except asyncio.TimeoutError:
            with contextlib.suppress(OSError):
                child.kill()
            await asyncio.to_thread(child.wait)


def _problem(what: str, exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    return (f"{what}, so no job runs: {exc.strerror or exc}{where}"
            f"{_WHAT_TO_DO.get(exc.errno or 0, '')}")
