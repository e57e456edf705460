"""Run a supervisor on its own event loop in a background thread.

For programs that are not asyncio applications (scripts, benchmarks, tests):

    with SupervisorThread(Supervisor(jobs_dir)) as thread:
        ...  # create jobs with a JobStore; call thread.supervisor.wake()
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

from jobs.supervisor.loop import Supervisor


class SupervisorThread:
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self._loop = asyncio.new_event_loop()
        self._task: asyncio.Task[None] | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="offload-supervisor",
                                        daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._task = self._loop.create_task(self.supervisor.run())
        self._loop.call_soon(self._started.set)
        with contextlib.suppress(asyncio.CancelledError):
            self._loop.run_until_complete(self._task)
        self._loop.run_until_complete(self._loop.shutdown_default_executor())
        self._loop.close()

    def start(self) -> SupervisorThread:
        self._thread.start()
        self._started.wait(10)
        return self

    def stop(self) -> None:
        """Stop supervising (runners keep running) and wait for pending stops."""
        if self._task is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop closed already
                self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(10)
        self.supervisor.wait_for_stoppers(10)

    def __enter__(self) -> SupervisorThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
