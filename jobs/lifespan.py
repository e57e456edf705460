"""What runs beside the routes: the supervisor, the metrics recorder, the LLM probe.

Stopping the app stops these (never the runners: they finish on their own and the
next supervisor adopts them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from jobs.history import MetricsReader, MetricsRecorder
from jobs.llm_status import LLMStatus
from jobs.service import JobService
from jobs.settings import HISTORY_KEEP_S, HISTORY_SAMPLE_S, get_settings
from jobs.store import JobStore
from jobs.supervisor import Supervisor

log = logging.getLogger(__name__)

LLM_PROBE_S = 15.0


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    if not settings.host_is_loopback and settings.api_token is None:
        raise RuntimeError(f"refusing to serve on {settings.host} without OFFLOAD_API_TOKEN: "
                           "anyone on the network could run jobs. Set OFFLOAD_API_TOKEN or "
                           "listen on 127.0.0.1.")
    store = JobStore(settings.jobs_dir)
    supervisor = Supervisor.from_settings(settings)
    metrics_file = settings.data_dir / "history" / "metrics.jsonl"
    app.state.settings = settings
    app.state.service = JobService(settings, store, supervisor)
    app.state.metrics = MetricsReader(metrics_file, HISTORY_KEEP_S, HISTORY_SAMPLE_S)
    app.state.llm = LLMStatus(settings)
    recorder = MetricsRecorder(metrics_file, HISTORY_KEEP_S, HISTORY_SAMPLE_S)
    tasks = [
        asyncio.create_task(supervisor.run(), name="offload-supervisor"),
        asyncio.create_task(_record_metrics(recorder, supervisor), name="offload-metrics"),
        asyncio.create_task(_probe_llm(app.state.llm), name="offload-llm-probe"),
    ]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _record_metrics(recorder: MetricsRecorder, supervisor: Supervisor) -> None:
    """Only the leading worker records, so several workers write one series."""
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while True:
        if supervisor.is_leader:
            try:
                await asyncio.to_thread(recorder.record)
            except OSError as exc:
                log.warning("cannot record metrics: %s", exc)
        next_at += recorder.interval_s
        await asyncio.sleep(max(0.0, next_at - loop.time()))


async def _probe_llm(status: LLMStatus) -> None:
    while True:
        await asyncio.to_thread(status.probe)
        await asyncio.sleep(LLM_PROBE_S)
