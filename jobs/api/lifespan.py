"""What runs beside the routes: the supervisor process kept alive, the LLM probe, the job
index refreshed and the schedules file looked at.

The API process itself only reads and writes files; everything that starts, watches or
kills processes runs in the supervisor process (`jobs.supervisor`). Stopping the app stops
that process, never the runners: they finish on their own and the next supervisor
adopts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from fastapi import FastAPI

from jobs import protocol as p
from jobs.api.follow import end_following, start_following, stop_following
from jobs.api.history import MachineHistory
from jobs.api.keeper import SupervisorKeeper
from jobs.api.predictor import Predictor
from jobs.api.service import JobService
from jobs.llm.status import LLMStatus
from jobs.resilient import resilient
from jobs.schedules import RELOAD_CHECK_S, schedule_file
from jobs.settings import (
    GIL_SWITCH_S,
    HISTORY_KEEP_S,
    HISTORY_SAMPLE_S,
    INDEX_REFRESH_S,
    get_settings,
)
from jobs.store.errors import StoreUnavailable
from jobs.store.job_store import JobStore
from jobs.store.private import make_private

log = logging.getLogger(__name__)

Handler = Callable[[int, FrameType | None], Any]
# SIGQUIT: gunicorn's quick stop (its master's SIGINT or SIGQUIT) stops its uvicorn workers
# with it; plain uvicorn leaves it to the default, a stop without grace, chained to nothing.
STOP_SIGNALS = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT",
                                                   "SIGBREAK") if hasattr(signal, name)]


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    # Here, not only in api_entry.main: uvicorn and gunicorn import the app without it.
    make_private(settings.data_dir)
    # A worker thread doing Python work (reading job files, say) holds the GIL for up to
    # the switch interval before the event loop gets it back: 5 ms by default.
    sys.setswitchinterval(GIL_SWITCH_S)
    start_following()
    keeper = SupervisorKeeper(settings)
    history = MachineHistory(Path(p.metrics_file(settings.data_dir)),
                             HISTORY_KEEP_S, HISTORY_SAMPLE_S)
    app.state.settings = settings
    store = JobStore(settings.jobs_dir, settings.kind_cap_map, settings.model_slots)
    app.state.service = JobService(settings, store, history)
    app.state.machine_history = history
    app.state.predictor = Predictor(settings.data_dir, history)
    app.state.llm = LLMStatus(settings)
    app.state.keeper = keeper
    # Each restarts after a failure, so /api/health never freezes on a dead task.
    tasks = [
        asyncio.create_task(resilient("keeping the supervisor", keeper.run),
                            name="offload-supervisor-keeper"),
        asyncio.create_task(resilient("the LLM probe", lambda: _probe_llm(app.state.llm)),
                            name="offload-llm-probe"),
        asyncio.create_task(resilient("the job index", lambda: _keep_index_fresh(
            app.state.service.store)), name="offload-index"),
        asyncio.create_task(resilient("the schedules file", _follow_schedules),
                            name="offload-schedules"),
    ]
    # What is loaded by now lives as long as the app: out of the cyclic collector's way,
    # whose full collections over it stalled the event loop.
    gc.freeze()
    try:
        with _streams_end_when_asked_to_stop():
            yield
    except asyncio.CancelledError:
        # A stop without grace (a second Ctrl+C) skips the app's shutdown, and the loop's
        # end cancels it here: cleaned up all the same below, it is no failure (passed
        # on, it is logged as an error with a traceback). After a SIGTERM or SIGHUP the
        # signal raised again ends the process first; its supervisor sees it gone.
        log.info("stopped without grace")
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await keeper.stop()
        await stop_following()


@contextlib.contextmanager
def _streams_end_when_asked_to_stop() -> Iterator[None]:
    """The server's own stop signals (uvicorn's SIGINT and SIGTERM, api_entry.py's SIGHUP,
    gunicorn's uvicorn worker's SIGQUIT) end the event streams and waits as they arrive.
    Uvicorn runs the app's shutdown only once the requests under way have ended: too late
    to end them there, so `uvicorn api_entry:app` waited for a followed job to end before
    it stopped (api_entry.py's server also ends them itself, for a stop without a signal:
    launch.py gone)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # a test's server on a thread: its signals are not its own
        return
    loop = asyncio.get_running_loop()
    chained: dict[int, tuple[Handler, Handler]] = {}
    for number in STOP_SIGNALS:
        server_handler = signal.getsignal(number)
        # Not Python's default Ctrl+C, SIG_DFL or SIG_IGN: no server stops on those.
        if not callable(server_handler) or server_handler is signal.default_int_handler:
            continue

        def end_then_stop(sig: int, frame: FrameType | None,
                          server_handler: Handler = server_handler) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nothing to end
                loop.call_soon_threadsafe(end_following)
            server_handler(sig, frame)

        signal.signal(number, end_then_stop)
        chained[number] = (end_then_stop, server_handler)
    try:
        yield
    finally:
        for number, (ours, server_handler) in chained.items():
            if signal.getsignal(number) is ours:
                signal.signal(number, server_handler)


async def _keep_index_fresh(store: JobStore) -> None:
    """The job index refreshed in a worker thread several times a second, so that
    `/api/history` and `/api/health` answer from its snapshot and never wait for a
    refresh (under load one reads dozens of changed job files)."""
    said = None
    while True:
        try:
            await asyncio.to_thread(store.refresh)
            said = None
        except StoreUnavailable as exc:  # once, not ten times a second: the health says it
            if str(exc) != said:
                log.warning("the job index cannot be refreshed: %s", exc)
                said = str(exc)
        except Exception:
            log.exception("refreshing the job index failed; retrying")
        await asyncio.sleep(INDEX_REFRESH_S)


async def _follow_schedules() -> None:
    """Look at the schedules file as often as the supervisor does, so that a change it
    cannot use leaves here the same last good schedules as there (not those of this
    process's last request for them)."""
    schedules = schedule_file()
    while True:
        await asyncio.to_thread(schedules.current)
        await asyncio.sleep(RELOAD_CHECK_S)


async def _probe_llm(status: LLMStatus) -> None:
    while True:
        await asyncio.to_thread(status.probe)
        await asyncio.sleep(status.probe_every_s)
