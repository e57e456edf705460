"""The supervisor process: `python -m jobs.supervisor [--parent PID]`.

Everything that starts, watches or kills processes runs here, outside the API's
processes: the supervisor, the metrics recorder (and the embedded model's server).
So a burst of spawns never competes with a request for the API's interpreter.

An API worker starts one when none leads (`jobs.api.keeper`); the supervisor's file lock
lets one lead. With `--parent`, it leaves when that process is gone, and gives up at once if
another supervisor already leads.

Its log records go to `<data>/supervisor.log`, rotated at `OFFLOAD_LOG_MAX_MB`; its
stdout and stderr (`supervisor.out`) and the model server's output (`llm-server.log`)
are written through inherited handles, so the leader cuts those in place now and then.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Any

import psutil

from jobs import protocol as p
from jobs.kinds import UnusableKinds, registry
from jobs.launch import pids
from jobs.launch.local import LocalLauncher
from jobs.llm import server as llm_server
from jobs.protocol import control, embedded
from jobs.protocol.trust import private_files
from jobs.protocol.wake import OUTPUT_FILE
from jobs.resilient import resilient
from jobs.settings import (
    HISTORY_KEEP_S,
    HISTORY_SAMPLE_S,
    LOG_BACKUPS,
    OUTPUT_CAP_S,
    Settings,
    UnusableSettings,
    get_settings,
)
from jobs.store.private import UnsafeDataFolder, make_private, refuse_foreign, refuse_planted
from jobs.supervisor.loop import Supervisor
from jobs.supervisor.metrics import MetricsRecorder

log = logging.getLogger(__name__)

PARENT_CHECK_S = 1.0
LAUNCH_PROBLEM_S = 1.0  # how often the leader's launcher problem is looked at
LEAD_WITHIN_S = 3.0
LOG_FILE = "supervisor.log"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


async def serve(settings: Settings, parent: int | None = None) -> bool:
    """Runs until stopped; whether it left because its lock was taken from it."""
    supervisor = Supervisor.from_settings(settings)
    recorder = MetricsRecorder(Path(p.metrics_file(settings.data_dir)),
                               HISTORY_KEEP_S, HISTORY_SAMPLE_S)
    model = None if settings.openai_base_url else llm_server.EmbeddedServer(
        settings.data_dir, settings.embedded_slots, settings.embedded_engine,
        settings.local_model)
    if model is not None and settings.llm_engine == embedded.LLAMA_SERVER != model.engine:
        log.warning("llama-server is not built here (launch.py builds it); the embedded "
                    "model runs on llama-cpp-python's server")
    if model is not None:
        _give_key_to_runners(supervisor, model.key)
    lead_within = LEAD_WITHIN_S if parent is not None else None
    main = asyncio.create_task(supervisor.run(lead_within), name="supervisor")
    with contextlib.suppress(NotImplementedError, AttributeError):  # Windows: no such handler
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    # A helper that fails restarts after a pause; it never takes the supervisor down.
    helpers = [asyncio.create_task(resilient("recording metrics", lambda: record_metrics(
        recorder, supervisor)), name="metrics"),
               asyncio.create_task(resilient("telling the API", lambda: (
                   tell_the_api(settings, supervisor))), name="telling the API")]
    if model is not None:
        helpers.append(asyncio.create_task(resilient("the embedded model", lambda: _embedded_model(
            settings, model, supervisor)), name="llm"))
    if p.LOGS_CUT_WHILE_WRITTEN:  # elsewhere cut only before a start
        helpers.append(asyncio.create_task(resilient("capping outputs", lambda: cap_outputs(
            settings, supervisor)), name="output caps"))
    if parent is not None:
        helpers.append(asyncio.create_task(resilient("watching the API process", lambda: (
            _watch_parent(parent))), name="parent"))
    try:
        await asyncio.wait([main, *helpers], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in [main, *helpers]:
            task.cancel()
        for task in [main, *helpers]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.to_thread(supervisor.wait_for_stoppers, 10)
    return supervisor.lock_lost


async def record_metrics(recorder: MetricsRecorder, supervisor: Supervisor) -> None:
    """Only the leader records, so one series is written however many workers run."""
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    failing = False  # said once, not every second (the health says it while it lasts)
    while True:
        # Each CPU reading is of the time since the one before: the first, since the prime.
        next_at = max(next_at + recorder.interval_s, loop.time())
        await asyncio.sleep(next_at - loop.time())
        if supervisor.is_leader:
            try:
                await recorder.record()
            except OSError as exc:
                if not failing:
                    log.warning("cannot record metrics (tried again every %g s): %s",
                                recorder.interval_s, exc)
                failing = True
            else:
                if failing:
                    log.info("metrics are recorded again")
                failing = False


async def tell_the_api(settings: Settings, supervisor: Supervisor) -> None:
    """Once it leads, the leader's shared settings and its launcher's problem (Ray not
    reachable), written where /api/health reads them; what an earlier leader left is
    replaced once this one leads, and removed as it leaves. A write that fails (a folder
    put in a file's place) is said once and tried again: the health says what to do."""
    told: str | None = None  # the launcher's problem as written
    settings_told = problem_told = False
    failing: dict[str, str] = {}  # what could not be told -> why, as said
    try:
        while not supervisor.is_leader:
            await asyncio.sleep(LAUNCH_PROBLEM_S)
        while True:
            if not settings_told:
                settings_told = await _tell(
                    "what this supervisor runs with", failing, control.set_leader_settings,
                    settings.data_dir, settings.shared(sorted(registry())))
            problem = supervisor.launch_problem() if supervisor.is_leader else None
            if (problem != told or not problem_told) and await _tell(
                    "what keeps its launcher from running jobs", failing,
                    control.set_launcher_problem, settings.data_dir, problem):
                told, problem_told = problem, True
            await asyncio.sleep(LAUNCH_PROBLEM_S)
    finally:
        if not supervisor.lock_lost:  # else those files are the next leader's
            if told is not None:  # a failure was said above; the next leader replaces it
                with contextlib.suppress(OSError):
                    control.set_launcher_problem(settings.data_dir, None)
            if settings_told:
                with contextlib.suppress(OSError):
                    control.set_leader_settings(settings.data_dir, None)


async def _tell(what: str, failing: dict[str, str], write: Callable[..., None],
                *args: Any) -> bool:
    """`write(*args)` in a thread; whether it was written. A failure is said once, until
    it is written (or fails otherwise)."""
    try:
        await asyncio.to_thread(write, *args)
    except OSError as exc:  # its target, not the temporary file's random name
        target = exc.filename2 or exc.filename
        why = f"{exc.strerror}: {target}" if exc.strerror else str(exc)
        if failing.get(what) != why:
            log.warning("cannot tell the API %s (%s); trying again every %g s", what, why,
                        LAUNCH_PROBLEM_S)
            failing[what] = why
        return False
    if failing.pop(what, None) is not None:
        log.info("the API is told %s again", what)
    return True


async def cap_outputs(settings: Settings, supervisor: Supervisor) -> None:
    """Cut the outputs other processes write through an inherited handle, as runner logs
    are cut: opened to append, so their writers go on at the new end."""
    paths = [settings.data_dir / OUTPUT_FILE, settings.data_dir / llm_server.LOG_FILE]
    while True:
        if supervisor.is_leader:
            for path in paths:
                dropped = await asyncio.to_thread(p.cap_log, path, settings.log_max_bytes)
                if dropped:
                    log.info("%s capped (%d bytes dropped)", path.name, dropped)
        await asyncio.sleep(OUTPUT_CAP_S)


async def _embedded_model(settings: Settings, model: llm_server.EmbeddedServer,
                          supervisor: Supervisor) -> None:
    """The leader runs the embedded model's server, loaded once for every chat."""
    while not supervisor.is_leader:
        await asyncio.sleep(0.2)
    if model.engine == embedded.LLAMA_CPP_PYTHON and (settings.llm_slots or 1) > 1:
        log.warning("OFFLOAD_LLM_SLOTS=%d is ignored: the embedded model runs on "
                    "llama-cpp-python's server, which answers one chat at a time (the others "
                    "wait queued); llama-server, which launch.py builds, runs that many at "
                    "once", settings.llm_slots)
    # Before its server writes to it (each load writes some 200 KB): bounded on Windows too.
    await asyncio.to_thread(p.cap_log, settings.data_dir / llm_server.LOG_FILE,
                            settings.log_max_bytes)
    await model.run()


def _give_key_to_runners(supervisor: Supervisor, key: str) -> None:
    """Before any runner starts: local runners get the model server's key in their
    environment (the fork server too, which passes its own on to the runners it forks).
    Not Ray's: it keeps a job's environment in its records, and its nodes cannot reach
    this machine's loopback anyway."""
    launcher = supervisor.launcher
    if isinstance(launcher, LocalLauncher):
        launcher.runner_env = {**launcher.runner_env, embedded.KEY_ENV: key}


async def _watch_parent(parent: int) -> None:
    """Until the API process `parent` has ended. Known by its pid and create time, not by
    `os.getppid()`: on Windows that goes on naming a parent that has exited, whose pid
    another process may have by then."""
    try:
        born: float | None = pids.created(parent)
    except psutil.Error:
        born = None  # gone before this supervisor looked
    while born is not None and pids.find(parent, born) is not None:
        await asyncio.sleep(PARENT_CHECK_S)
    log.info("the API process %s is gone; the supervisor leaves (runners keep running)",
             parent)


def _lower_priority(nice: int) -> None:
    """Launching and reaping can wait a few milliseconds; a request to the API cannot."""
    try:
        if hasattr(os, "nice"):
            os.nice(nice)
            try:  # Linux: lower its autogroup too (it is a session of its own)
                with open("/proc/self/autogroup", "w") as f:
                    f.write(str(nice))
            except OSError:
                pass  # no autogroups here: the nice value is what counts
        else:  # Windows
            psutil.Process().nice(psutil.BELOW_NORMAL_PRIORITY_CLASS)  # type: ignore[attr-defined,unused-ignore]
    except OSError as exc:
        log.debug("could not lower the supervisor's priority: %s", exc)


def _log_to_file(settings: Settings) -> None:
    """Log records to a rotated supervisor.log (stderr if it cannot be opened)."""
    handler: logging.Handler
    problem = None
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        handler = RotatingFileHandler(settings.data_dir / LOG_FILE, encoding="utf-8",
                                      maxBytes=settings.log_max_bytes, backupCount=LOG_BACKUPS)
    except OSError as exc:
        handler, problem = logging.StreamHandler(), exc
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, handlers=[handler])
    if problem is not None:
        log.warning("cannot open %s (%s); logging to stderr", LOG_FILE, problem)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.supervisor")
    parser.add_argument("--parent", type=int, default=None,
                        help="leave when this process is gone (the API worker that started it)")
    args = parser.parse_args(argv)
    try:
        settings = get_settings()
        registry()  # a job kind defined twice stops the start
    except (UnusableSettings, UnusableKinds) as exc:  # started by hand: said, no traceback
        print(f"the supervisor cannot start: {exc}", file=sys.stderr)
        return 3
    _lower_priority(settings.supervisor_nice)
    private_files()  # before its log file is made
    try:
        refuse_foreign(settings.data_dir)  # nor opened through another account's link
        refuse_planted(settings.data_dir)  # nor its log through a link put in it while open
    except UnsafeDataFolder as exc:
        print(f"the supervisor cannot start: {exc}", file=sys.stderr)
        return 3
    _log_to_file(settings)
    make_private(settings.data_dir)  # it may be started by hand, before any API
    if args.parent is None:  # by hand, in a terminal: not silent, as if hung
        print(f"the supervisor runs on {settings.data_dir} (it leads, or waits its turn); "
              f"it logs to {settings.data_dir / LOG_FILE}; Ctrl+C stops it", file=sys.stderr)
    try:
        lock_lost = asyncio.run(serve(settings, args.parent))
    except KeyboardInterrupt:
        return 0
    if lock_lost:  # a service manager restarts it: it then waits its turn to lead
        print(f"the supervisor left: its lock in {settings.data_dir} was removed or replaced "
              "while it led, so another supervisor may lead there now (supervisor.log)",
              file=sys.stderr)
        return 1
    return 0

