"""GET /metrics: the job system in Prometheus's exposition format (prometheus_client).

Gauges come from this worker's job index (at most OVERVIEW_MAX_AGE_S old) and its
LLM probe; counters and histograms from the file the leading supervisor keeps
(`jobs.protocol.counters`), so every API worker answers with the same counts and they
never go down while the service runs, pruning included.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, Response
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from starlette.concurrency import run_in_threadpool

from jobs import protocol as p
from jobs.api.routes_control import queue_view
from jobs.api.routes_jobs import Service
from jobs.api.service import OVERVIEW_MAX_AGE_S
from jobs.kinds import registry
from jobs.llm.status import LLMStatus
from jobs.protocol.counters import TOKEN_FIELDS, Histogram, JobCounters, counters_file
from jobs.store.index import JobIndex

LIVE_STATES = (p.JobState.QUEUED, p.JobState.RUNNING)

router = APIRouter(tags=["status"])


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}},
                             "description": "Prometheus text format (or OpenMetrics, "
                                            "when the Accept header asks for it)"},
                       406: {"description": "an Accept header whose version is no number"}})
async def metrics(request: Request, service: Service) -> Response:
    """Jobs by kind and state, finished jobs, failures, queue waits, run times, the LLM."""
    llm: LLMStatus = request.app.state.llm
    path = Path(counters_file(service.settings.data_dir))
    try:
        counters = await run_in_threadpool(JobCounters.load, path)
    except OSError as exc:  # never zeros: a scraper would take them for a reset
        raise HTTPException(503, f"cannot read the job counters now ({exc.strerror or exc}); "
                                 "try again shortly") from None
    queue = await run_in_threadpool(queue_view, service.settings)
    ready = bool((await run_in_threadpool(llm.now))["ready"])
    collector = JobMetrics(service.store, counters, ready, queue["max_concurrent"],
                           queue["kind_caps"])
    accept = request.headers.get("accept", "")
    try:
        # A quoted value is HTTP's too (version="1.0.0"); prometheus_client reads it as no number.
        encode, content_type = choose_encoder(re.sub(r'=\s*"([^"]*)"', r"=\1", accept))
    except (TypeError, ValueError):  # a version that is no number, such as version=abc
        raise HTTPException(406, f"cannot read the Accept header {accept[:200]!r}: ask for "
                                 "text/plain, or application/openmetrics-text; version=1.0.0, "
                                 "or send none") from None
    # The index's lock and the counters' file: a worker thread, never the event loop.
    body = await run_in_threadpool(encode, collector.registry())
    return Response(body, media_type=content_type)


# What a job that failed can say it was (`cancelled` is no failure: someone asked for it).
# No job ends `corrupt`: a job file damaged by hand only reads so (mended, it runs, and
# is counted then).
FAILURE_TYPES = frozenset(str(t) for t in p.ErrorType) - {
    str(p.ErrorType.CANCELLED), str(p.ErrorType.CORRUPT)}


class JobMetrics:
    """A prometheus_client collector over the job index and the supervisor's counters."""

    def __init__(self, index: JobIndex, counters: JobCounters, llm_ready: bool,
                 max_concurrent: int, kind_caps: dict[str, int]) -> None:
        self.index = index
        self.counters = counters
        self.llm_ready = llm_ready
        self.max_concurrent = max_concurrent
        self.kind_caps = kind_caps

    def registry(self) -> CollectorRegistry:
        found = CollectorRegistry(auto_describe=False)
        found.register(self)
        return found

    def collect(self) -> Iterator[Metric]:
        # As fresh as /api/history: a refresh looks at every live job, under the index's
        # lock, and scrapes at once (several Prometheus) share one.
        live = self.index.live_counts(OVERVIEW_MAX_AGE_S)
        counters = self.counters
        # Every kind known here shows, at zero too: a series that appears only with its
        # first job would hide that job from rate() and increase().
        kinds = sorted(set(registry()) | {kind for kind, _ in live} | set(counters.finished)
                       | set(counters.queue_wait) | set(counters.duration))

        jobs = GaugeMetricFamily("offload_jobs", "Jobs now queued or running.",
                                 labels=["kind", "state"])
        for kind in kinds:
            for state in LIVE_STATES:
                jobs.add_metric([kind, state.value], live.get((kind, state.value), 0))
        yield jobs
        yield GaugeMetricFamily("offload_max_concurrent", "Jobs that may run at once (the "
                                "cap in use).", value=self.max_concurrent)
        kind_caps = GaugeMetricFamily("offload_kind_max_concurrent", "Jobs of a kind that "
                                      "may run at once, for the kinds with a cap of their "
                                      "own.", labels=["kind"])
        for kind, cap in sorted(self.kind_caps.items()):
            kind_caps.add_metric([kind], cap)
        yield kind_caps

        finished = CounterMetricFamily("offload_jobs_finished", "Jobs that reached a final "
                                       "state.", labels=["kind", "state"])
        for kind in kinds:
            by_state = counters.finished.get(kind, {})
            for final in sorted({s.value for s in p.FINAL_STATES} | set(by_state)):
                finished.add_metric([kind, final], by_state.get(final, 0))
        yield finished

        failures = CounterMetricFamily("offload_job_failures", "Jobs that ended failed or "
                                       "timed out, by error.type.", labels=["kind", "type"])
        retries = CounterMetricFamily("offload_job_retries", "Attempts that failed for a "
                                      "transient reason and were queued again, by error.type.",
                                      labels=["kind", "type"])
        for by_error, counted in ((failures, counters.failures), (retries, counters.retries)):
            # At zero too, as the jobs above: the first failure is then an increase.
            for kind in sorted(set(kinds) | set(counted)):
                by_type = counted.get(kind, {})
                for error_type in sorted(FAILURE_TYPES | set(by_type)):
                    by_error.add_metric([kind, error_type], by_type.get(error_type, 0))
            yield by_error

        for name, histograms, what in (
                ("offload_queue_wait_seconds", counters.queue_wait,
                 "Seconds from when a job was due (created, or its run_at) to its launch."),
                ("offload_job_duration_seconds", counters.duration,
                 "Seconds from a job's start to its final state.")):
            family = HistogramMetricFamily(name, what, labels=["kind"])
            for kind in kinds:
                histogram = histograms.get(kind) or Histogram()
                family.add_metric([kind], histogram.cumulative(), histogram.sum)
            yield family

        yield GaugeMetricFamily("offload_llm_ready", "1 when the LLM chats go to answers, "
                                "else 0.", value=1 if self.llm_ready else 0)

        tokens = CounterMetricFamily("offload_llm_tokens", "Tokens of completed chats "
                                     "(result.usage).", labels=["direction"])
        for direction in TOKEN_FIELDS:
            tokens.add_metric([direction], counters.tokens[direction])
        yield tokens
