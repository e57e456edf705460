"""Start the supervisor with the app; stop it (never the runners) when the app stops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from jobs.settings import get_settings
from jobs.store import JobStore
from jobs.supervisor import Supervisor

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    store = JobStore(settings.jobs_dir)
    supervisor = Supervisor.from_settings(settings)
    app.state.settings = settings
    app.state.store = store
    app.state.supervisor = supervisor
    task = asyncio.create_task(supervisor.run(), name="offload-supervisor")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
