"""What the dashboard polls: /api/history, /api/health and /api/predict; and a 404 in
JSON for any other /api path."""

from __future__ import annotations

import time
from importlib import metadata
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.routing import Route

from jobs import protocol as p
from jobs.api.errors import methods_at, not_allowed
from jobs.api.history import MachineHistory, short_job
from jobs.api.keeper import SupervisorKeeper
from jobs.api.predictor import NoForecast, Predictor
from jobs.api.routes_control import queue_view
from jobs.api.routes_jobs import Service
from jobs.api.service import JobService
from jobs.kinds import registry
from jobs.llm.status import LLMStatus
from jobs.protocol import control
from jobs.settings import HISTORY_KEEP_S, HISTORY_SAMPLE_S, SUPERVISOR_STALLED_S
from jobs.store.errors import StoreUnavailable
from runners import train


def _installed_version() -> str:
    try:
        return metadata.version("offload")
    except metadata.PackageNotFoundError:  # run from a folder without `pip install -e .`
        return "unknown (not installed)"


VERSION = _installed_version()  # pyproject.toml's, as installed

router = APIRouter(prefix="/api", tags=["status"])


@router.get("/history")
async def history(request: Request, service: Service,
                  seconds: Annotated[float, Query(gt=0, le=HISTORY_KEEP_S)] = 300,
                  jobs: Annotated[int, Query(ge=0, le=200)] = 20) -> dict[str, Any]:
    """Machine metrics (CPU and memory, about one sample a second), recent jobs, counts;
    `kept` and `train_needs`: samples kept, and how many a training run (default input)
    needs, so the dashboard can say when training becomes possible."""
    history: MachineHistory = request.app.state.machine_history
    # Reading the metrics appended since the last call is one stat and a few hundred
    # bytes: microseconds, so it stays on the loop (a thread hop costs more under load).
    samples = history.read(seconds)
    recent, counts = await service.overview(jobs)
    return {
        "metrics": {"interval_s": HISTORY_SAMPLE_S, "samples": samples,
                    "kept": history.kept(), "train_needs": train.samples_needed(train.LAGS[0])},
        "jobs": [short_job(job) for job in recent],
        "counts": counts,
    }


@router.get("/predict", responses={409: {"description": "no model trained yet, its file damaged, "
                                                     "or no recent sample to forecast from"}})
async def predict(request: Request,
                  horizon: Annotated[int, Query(ge=1, le=3600)] = 60) -> dict[str, Any]:
    """CPU and memory forecast for the next `horizon` samples (about a second each)."""
    predictor: Predictor = request.app.state.predictor
    try:
        return await run_in_threadpool(predictor.predict, horizon)
    except NoForecast as exc:
        raise HTTPException(409, str(exc)) from None


@router.get("/health")
async def health(request: Request, service: Service) -> dict[str, Any]:
    unlisted = None
    try:
        counts = await service.counts()
    except StoreUnavailable as exc:  # the jobs folder cannot be listed: said, never a 500
        counts, unlisted = {state.value: 0 for state in p.JobState}, str(exc)
    llm: LLMStatus = request.app.state.llm
    keeper: SupervisorKeeper = request.app.state.keeper
    history: MachineHistory = request.app.state.machine_history
    predictor: Predictor = request.app.state.predictor
    supervisor = "starting"
    led = await run_in_threadpool(keeper.led)
    sampled = await run_in_threadpool(history.last_sample_at)
    if led:
        # It samples the machine every second: silence since its latest sample, or since
        # it took the lead, says it is stopped or hung (unless the samples cannot be read).
        alive = max(sampled or 0.0, keeper.led_since or time.time())
        silent = history.problem is None and time.time() - alive > SUPERVISOR_STALLED_S
        supervisor = "stalled" if silent else "running"
    queue = await run_in_threadpool(queue_view, service.settings)
    problems = await run_in_threadpool(_problems, service)
    problems += [each for each in (unlisted, history.problem) if each is not None]
    if not led and (why := keeper.problem()) is not None:  # "starting" for good
        problems.append(why)
    if supervisor == "stalled":
        problems.append(await run_in_threadpool(_stalled, service))
    return {
        "status": "degraded" if problems else "ok", "problems": problems, "version": VERSION,
        "running": counts[p.JobState.RUNNING], "queued": counts[p.JobState.QUEUED],
        "max_concurrent": queue["max_concurrent"],
        "supervisor": supervisor,
        "launcher": service.settings.launcher,
        "forecast_version": await run_in_threadpool(predictor.version),
        "llm": await run_in_threadpool(llm.now),
        "usage": service.store.usage_totals(),
        "queue": queue,
    }


def _stalled(service: JobService) -> str:
    """A leading supervisor stopped or hung, said with the way on: a hung one writes
    nothing to its log."""
    try:
        pid = control.leader_pid(service.settings.data_dir)
    except OSError:
        pid = None
    which = f" (pid {pid})" if pid is not None else ""
    return (f"the supervisor leading this data folder{which} has shown no sign of life for "
            f"{SUPERVISOR_STALLED_S:g} s (stopped or hung): no job starts or ends; end its "
            "process and another takes the lead within seconds, or restart the server")


def _problems(service: JobService) -> list[str]:
    """What keeps jobs from being stored or run now, in words (blocking: a statvfs)."""
    problems = service.storage_problems()
    try:
        launching = control.launcher_problem(service.settings.data_dir)
        theirs = control.leader_settings(service.settings.data_dir)
    except OSError as exc:
        return [*problems, f"the supervisor's word cannot be read: {exc.strerror or exc}"]
    problems += control.damaged(service.settings.data_dir)
    if launching:
        problems.append(launching)
    mine = service.settings.shared(sorted(registry()))
    differ = [f"{name} {_setting(theirs.get(name))} there, {_setting(value)} here"
              for name, value in mine.items() if theirs is not None and theirs.get(name) != value]
    if differ:
        problems.append("the supervisor leading this data folder runs with other settings "
                        f"than this API ({'; '.join(differ)}): it runs the jobs as its own "
                        "say; start every API of one data folder with the same settings")
    return problems


def _setting(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "none"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return "unset" if value is None else str(value)


async def unknown_route(request: Request) -> Response:
    """Anything else under /api, whatever its method: a 404 in JSON (never the dashboard's
    static files); on a route's path, OPTIONS answers the route's methods, and any other
    method is a 405 naming them (`/api/jobs/batch` is no job's id: its own route's)."""
    methods = methods_at(request, literal=True) or methods_at(request)
    if not methods:
        rest = str(request.path_params["rest"])[:100]
        raise HTTPException(404, f"no API route /api/{rest}; see /docs for the routes")
    return not_allowed(request, methods)


# Last, after every route of every router, and for any method (a Starlette route whose
# methods are an empty set matches them all), so that no /api path reaches the static files.
router.routes.append(Route("/api/{rest:path}", unknown_route, methods=[], include_in_schema=False))
