"""The supervisor process: `python -m jobs.daemon [--parent PID]`.

Everything that starts, watches or kills processes runs here, outside the API's
processes: the supervisor, the metrics recorder (and the embedded model's server).
So a burst of spawns never competes with a request for the API's interpreter.

Each API worker keeps one alive (`jobs.keeper`); the supervisor's file lock lets one
lead. With `--parent`, it leaves when that process is gone, and gives up at once if
another supervisor already leads.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

from jobs import embedded
from jobs.history import MetricsRecorder
from jobs.launchers import LocalLauncher
from jobs.llm_server import EmbeddedServer
from jobs.resilient import resilient
from jobs.settings import HISTORY_KEEP_S, HISTORY_SAMPLE_S, Settings, get_settings
from jobs.supervisor import Supervisor

log = logging.getLogger(__name__)

PARENT_CHECK_S = 1.0
LEAD_WITHIN_S = 3.0
DAEMON_NICE = int(os.environ.get("OFFLOAD_SUPERVISOR_NICE", "10"))


async def serve(settings: Settings, parent: int | None = None) -> None:
    supervisor = Supervisor.from_settings(settings)
    recorder = MetricsRecorder(settings.data_dir / "history" / "metrics.jsonl",
                               HISTORY_KEEP_S, HISTORY_SAMPLE_S)
    model = None if settings.openai_base_url else EmbeddedServer(settings.data_dir)
    if model is not None:
        _give_key_to_runners(supervisor, model.key)
    lead_within = LEAD_WITHIN_S if parent is not None else None
    main = asyncio.create_task(supervisor.run(lead_within), name="supervisor")
    with contextlib.suppress(NotImplementedError, AttributeError):  # Windows: no such handler
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    # A helper that fails restarts after a pause; it never takes the supervisor down.
    helpers = [asyncio.create_task(resilient("recording metrics", lambda: record_metrics(
        recorder, supervisor)), name="metrics")]
    if model is not None:
        helpers.append(asyncio.create_task(resilient("the embedded model", lambda: _embedded_model(
            model, supervisor)), name="llm"))
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


async def record_metrics(recorder: MetricsRecorder, supervisor: Supervisor) -> None:
    """Only the leader records, so one series is written however many workers run."""
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while True:
        if supervisor.is_leader:
            try:
                await asyncio.to_thread(recorder.record)
            except OSError as exc:
                log.warning("cannot record metrics: %s", exc)
        next_at = max(next_at + recorder.interval_s, loop.time())
        await asyncio.sleep(next_at - loop.time())


async def _embedded_model(model: EmbeddedServer, supervisor: Supervisor) -> None:
    """The leader runs the embedded model's server, loaded once for every chat."""
    while not supervisor.is_leader:
        await asyncio.sleep(0.2)
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
    while os.getppid() == parent:
        await asyncio.sleep(PARENT_CHECK_S)
    log.info("the API process %s is gone; the supervisor leaves (runners keep running)",
             parent)


def _lower_priority() -> None:
    """Launching and reaping can wait a few milliseconds; a request to the API cannot."""
    try:
        if hasattr(os, "nice"):
            os.nice(DAEMON_NICE)
            try:  # Linux: lower its autogroup too (it is a session of its own)
                with open("/proc/self/autogroup", "w") as f:
                    f.write(str(DAEMON_NICE))
            except OSError:
                pass  # no autogroups here: the nice value is what counts
        else:  # Windows
            import psutil

            psutil.Process().nice(psutil.BELOW_NORMAL_PRIORITY_CLASS)  # type: ignore[attr-defined,unused-ignore]
    except OSError as exc:
        log.debug("could not lower the supervisor's priority: %s", exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.daemon")
    parser.add_argument("--parent", type=int, default=None,
                        help="leave when this process is gone (the API worker that started it)")
    args = parser.parse_args(argv)
    _lower_priority()
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(get_settings(), args.parent))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
