"""Offload's API: build the app, include the routes, serve.

    python api_entry.py [--host H] [--port P]
    uvicorn api_entry:app --port 8001 --workers 4
    gunicorn api_entry:app -k uvicorn.workers.UvicornWorker -w 4 -b 127.0.0.1:8001
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import psutil
import uvicorn
from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from jobs import protocol as p, schedules
from jobs.api import (
    errors,
    openapi,
    routes_chat,
    routes_control,
    routes_jobs,
    routes_metrics,
    routes_status,
    single_values,
)
from jobs.api.body_limit import BodyLimit
from jobs.api.follow import end_following
from jobs.api.guards import RequestGuard
from jobs.api.lifespan import lifespan
from jobs.kinds import UnusableKinds, registry
from jobs.protocol.trust import private_files
from jobs.schedules import ScheduleError
from jobs.settings import MAKE_TOKEN, Settings, UnusableSettings, get_settings
from jobs.store.private import UnsafeDataFolder, refuse_foreign, refuse_planted

STATIC_DIR = Path(__file__).resolve().parent / "static"
# How long a stop waits for requests under way, but event streams and waits: those end
# as it begins (`_Server`), as otherwise they would hold it for good.
SHUTDOWN_GRACE_S = 5
# Each family's loopback address: `localhost` names both, and browsers and curl try ::1
# first, so the one the server does not listen on is held too (below).
LOOPBACK = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}


def create_app() -> FastAPI:
    settings = usable_settings()
    # /docs from files installed with the app: no CDN, no third-party script beside the
    # token. No /redoc: ReDoc loads its logo from its CDN, whatever its options.
    app = FastAPIOffline(title="Offload", version=routes_status.VERSION, lifespan=lifespan,
                         description="Slow jobs in short-lived subprocesses; the API never "
                                     "blocks.", redoc_url=None,
                         dependencies=[Depends(single_values.each_given_once)])
    routers = [routes_chat.router, routes_jobs.router, routes_control.router,
               routes_metrics.router, routes_status.router]  # last: its /api catch-all
    for router in routers:
        app.include_router(router)
    # What the catch-all names in a 405's Allow (its routes match as the app's do).
    app.state.api_routes = [route for router in routers for route in router.routes
                            if isinstance(route, APIRoute)]
    errors.install(app)
    openapi.install(app)
    app.add_middleware(BodyLimit, max_bytes=p.MAX_BODY_BYTES)
    origins = settings.cors_origin_list
    if origins:  # closed unless configured: other sites' pages cannot call the API
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_credentials=False,
                           # every method a route takes (a PUT was left out once)
                           allow_methods=sorted({method for route in app.state.api_routes
                                                 for method in route.methods} - {"HEAD"}),
                           allow_headers=["Authorization", "Content-Type", "Idempotency-Key",
                                          "Last-Event-ID"])
    app.add_middleware(RequestGuard, settings=settings)  # outermost: every path
    app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="static")
    return app


def usable_settings() -> Settings:
    """The settings, or a stop that says what to mend: a setting to change is said as
    such, not as a traceback through uvicorn's or gunicorn's."""
    try:
        settings = get_settings()  # refuses a weak OFFLOAD_API_TOKEN, however it is served
        registry()  # a job kind defined twice stops the start
        schedules.schedule_file()  # and so does a schedules file that cannot be used
        # Checked again as the app starts (make_private); here, said in a line.
        refuse_foreign(settings.data_dir)
        refuse_planted(settings.data_dir)
    except (UnusableSettings, UnusableKinds, ScheduleError, UnsafeDataFolder) as exc:
        cannot_start(str(exc))
    for variable, by_kind in (("OFFLOAD_KIND_CAPS", settings.kind_cap_map),
                              ("OFFLOAD_MAX_ATTEMPTS", settings.attempts_map)):
        unknown = sorted(set(by_kind) - set(registry()))
        if unknown:  # a typo (`trian=1`) left the kind it meant without its number
            cannot_start(f"{variable} names {', '.join(map(repr, unknown))}, no job kind "
                         f"here; the kinds are {', '.join(sorted(registry()))}")
    if not settings.host_is_loopback and settings.api_token is None:
        cannot_start(f"refusing to serve on {settings.host} without OFFLOAD_API_TOKEN: "
                     "anyone on the network could run jobs. Set OFFLOAD_API_TOKEN (make one "
                     f"with: {MAKE_TOKEN}) or listen on 127.0.0.1.")
    open_to_all = [each for each in settings.cors_origin_list if each in ("*", "null")]
    if open_to_all and settings.api_token is None:
        cannot_start(f"refusing OFFLOAD_CORS_ORIGINS={open_to_all[0]} without OFFLOAD_API_TOKEN: "
                     "the pages of any site you visit could read your jobs and chats. Name "
                     "the origins that may (https://app.example.com), or set "
                     f"OFFLOAD_API_TOKEN (make one with: {MAKE_TOKEN}).")
    return settings


def cannot_start(problem: str) -> NoReturn:
    print(f"Offload cannot start: {problem}", file=sys.stderr, flush=True)
    # 3: gunicorn's "worker failed to boot", so its master stops instead of booting
    # workers again and again.
    raise SystemExit(3)


app = create_app()


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 0 to 65535, not {text!r}")
    return port


def _launcher() -> psutil.Process | None:
    """The launch.py process that started this server (LAUNCHER_PID_ENV), or None; taken
    out of the environment, which the supervisor and the runners inherit."""
    pid = os.environ.pop(p.LAUNCHER_PID_ENV, "")
    if not pid.isdigit():
        return None
    try:
        return psutil.Process(int(pid))
    except psutil.Error:
        print(f"launch.py (pid {pid}), which started this server, is gone", file=sys.stderr)
        raise SystemExit(0) from None


def _gone(proc: psutil.Process) -> bool:
    try:  # a zombie too: its parent has not yet read its end
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def main(argv: list[str] | None = None) -> int:
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python api_entry.py")
    parser.add_argument("--host", default=settings.host)
    parser.add_argument("--port", type=_port, default=settings.port)
    parser.add_argument("--no-access-log", action="store_true",
                        help="no line for each request (start_dashboard.pyw's log file "
                             "would grow with every poll of the dashboard)")
    args = parser.parse_args(argv)
    private_files()  # before anything is written; the app's lifespan does it for uvicorn's CLI
    os.environ["OFFLOAD_HOST"] = args.host  # the app checks the token rule against it
    get_settings.cache_clear()
    usable_settings()
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = _Server(uvicorn.Config(app, host=args.host, port=args.port,
                                    access_log=not args.no_access_log,
                                    timeout_graceful_shutdown=SHUTDOWN_GRACE_S))
    server.launcher = _launcher()
    with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl+C: a stop without grace
        server.run()
    return 0 if server.started else 3  # 3: uvicorn's own code when it could not start


class LoopbackTaken(Exception):
    """Another program listens on the other loopback address at the server's port."""


def hold_other_loopback(servers: list[asyncio.Server]) -> list[socket.socket]:
    """Sockets bound, never listening, on the loopback address of each family the server
    does not listen on, at its port: another account listening on [::1]:8001 beside our
    127.0.0.1:8001 is where `localhost:8001` leads, and gets the dashboard's visits, their
    chats and the token. Bound alone, it refuses connections at once, and browsers and
    curl go on to the other address. An address this machine lacks is left."""
    listening = [each for server in servers for each in server.sockets]
    if not listening:
        return []
    port = listening[0].getsockname()[1]
    held = []
    for family, address in LOOPBACK.items():
        if any(each.family == family for each in listening):
            continue
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no IPv6 in this kernel: nobody can listen on it
            continue
        try:
            if family == socket.AF_INET6:  # ::1 alone, whatever the system's default
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            exclusive = getattr(socket, "SO_EXCLUSIVEADDRUSE", None)  # Windows: not shared
            if exclusive is not None:
                sock.setsockopt(socket.SOL_SOCKET, exclusive, 1)
            sock.bind((address, port))
        except OSError as exc:
            sock.close()
            # Windows' EACCES also marks a port it reserves, where no one can listen.
            if p.port_taken(exc) and (exc.errno == errno.EADDRINUSE
                                      or _answers(family, address, port)):
                shown = f"[{address}]" if ":" in address else address
                raise LoopbackTaken(f"{shown}:{port} is taken by another program, and "
                                    f"localhost:{port} leads there as well as here: it would "
                                    "get this server's visitors, their chats and token; stop "
                                    "it, or pass another --port") from exc
            continue  # no such address here (IPv6 turned off): nobody can listen on it
        held.append(sock)
    return held


def _answers(family: socket.AddressFamily, address: str, port: int) -> bool:
    """Whether something listens at the address."""
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            probe.connect((address, port))
    except OSError:
        return False
    return True


class _Server(uvicorn.Server):
    """Uvicorn's server, which ends the event streams and waits as its stop begins: a
    dashboard tab or an `offload wait` held each stop for the whole grace, then saw its
    request cancelled (an error and a traceback in the log). A closed terminal (SIGHUP)
    stops it as Ctrl+C does, where it cut every stream and request on the spot."""

    launcher: psutil.Process | None = None  # the launch.py that started it, if one did
    held: list[socket.socket] = []  # hold_other_loopback's, kept open while it serves

    async def on_tick(self, counter: int) -> bool:
        # launch.py killed outright (kill -9, Task Manager): no one would stop this server.
        if self.launcher is not None and counter % 10 == 0 and _gone(self.launcher):
            logging.getLogger(__name__).info("launch.py (pid %s) is gone; stopping",
                                             self.launcher.pid)
            self.launcher, self.should_exit = None, True
        return await super().on_tick(counter)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        try:
            self.held = hold_other_loopback(self.servers)
        except LoopbackTaken as exc:
            for server in self.servers:
                server.close()
            await self.lifespan.shutdown()
            cannot_start(str(exc))

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        end_following()
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        hangup = getattr(signal, "SIGHUP", None)  # none on Windows
        if (hangup is None or threading.current_thread() is not threading.main_thread()
                or signal.getsignal(hangup) is signal.SIG_IGN):  # nohup's, left as asked
            with super().capture_signals():
                yield
            return
        previous = signal.signal(hangup, self.handle_exit)
        with super().capture_signals():
            try:
                yield
            finally:
                # Before uvicorn raises the signals it caught again, as it does SIGTERM's:
                # a hang-up then ends the process as it would have, only after the stop.
                signal.signal(hangup, previous)


if __name__ == "__main__":
    sys.exit(main())
