"""Runs the embedded model's server for the leading supervisor: start it on a free
loopback port, check its health, restart it with backoff when it dies, stop it with the
supervisor. Its state goes to `<data>/llm.json` for the API and the chat runners.

Any local process could bind that port first and take the prompts. So the server needs
a key that only the runners Offload starts get (in their environment), and its address
is published as ready only once the socket on the port is known to be the server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from jobs import protocol as p
from jobs.launch.processes import lower_priority_of
from jobs.protocol import embedded, trust

log = logging.getLogger(__name__)

START_TIMEOUT_S = 180.0
HEALTH_EVERY_S = 5.0
WARM_UP_TIMEOUT_S = 30.0
HEALTH_FAILURES = 3  # in a row, before a live but silent server is restarted
BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
UNAVAILABLE_RECHECK_S = 60.0
ENGINE_RECHECK_S = 1.0  # llama-server missing (a reinstall under way): looked for this often
# llama-server asked to stop while it answers two requests or more never ends (it waits for
# answers it no longer makes); it keeps nothing on disk, so it is killed after this.
STOP_GRACE_S = 1.0
LOG_FILE = "llm-server.log"  # the server's output, in the data folder; the supervisor caps it
PR_SET_PDEATHSIG = 1  # linux/prctl.h
ENGINE_MISSING = (
    "llama-server, which the embedded model runs on, is missing from Offload's environment "
    "(a reinstall under way?); the model starts again once it is back. Or restart Offload: "
    "`python launch.py --reinstall` builds llama-server again; without it the model runs on "
    "llama-cpp-python's server (one chat at a time)")


class EmbeddedServer:
    def __init__(self, data_dir: Path, slots: int = 1, engine: str = embedded.LLAMA_CPP_PYTHON,
                 local_model: str | None = None) -> None:
        self.data_dir = data_dir
        self.local_model = local_model  # OFFLOAD_LOCAL_MODEL: a GGUF file of one's own
        # Chosen once, at start (Settings.embedded_engine), and kept across restarts of the
        # server: the supervisor starts no more chats than its slots.
        self.engine = engine
        self.slots = embedded.chat_slots(slots, engine)
        self.proc: subprocess.Popen[bytes] | None = None
        self.base_url: str | None = None  # set once the server is ready
        self.restarts = 0
        # One key while this supervisor runs: its runners get it when they start, and a
        # chat that waits while the server restarts must still get in.
        self.key = embedded.new_key()

    def _write(self, ready: bool, detail: str, **extra: Any) -> None:
        status = {"ready": ready, "detail": detail, "base_url": self.base_url if ready else "",
                  "pid": self.proc.pid if self.proc else None, "restarts": self.restarts,
                  "key_id": embedded.key_id(self.key), "data_dir": str(self.data_dir),
                  "updated_at": p.now_iso(), **extra}
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            p.write_json(embedded.status_path(str(self.data_dir)), status)
        except OSError as exc:
            log.warning("cannot write the LLM status: %s", exc)

    async def run(self, on_ready: Any = None) -> None:
        """Keep the server up until cancelled; `on_ready(base_url, model)` on each start."""
        await asyncio.to_thread(self._stop_stale)
        try:
            while True:
                model = await self._servable()
                try:
                    await self._serve_once(model, on_ready)
                except OSError as exc:  # say, its log cannot be opened: the folder is read-only
                    log.warning("cannot run the embedded model server: %s", exc)
                delay = BACKOFF_S[min(self.restarts, len(BACKOFF_S) - 1)]
                self.restarts += 1
                self._write(False, f"the embedded model server stopped; restarting in "
                                   f"{delay:g} s", available=True)
                await asyncio.sleep(delay)
        finally:
            await asyncio.to_thread(self.stop)
            if self._status_is_ours():
                self._write(False, "the embedded model server is stopped (Offload is not "
                                   "running)")

    def _status_is_ours(self) -> bool:
        """Whether llm.json is still this supervisor's (or is not there): once it has
        released its lock, the next leader may have started its own server and said it
        ready while this one was stopping; saying "stopped" over that would hold every
        chat back (they wait for a ready model) while the new server runs."""
        status = embedded.read_status(str(self.data_dir))
        return status is None or status.get("key_id") == embedded.key_id(self.key)

    async def _servable(self) -> str:
        """The model file to serve, once it can be served; until then llm.json says why."""
        said_missing = False
        while True:
            reason = embedded.unavailable_reason(self.local_model)
            if reason is not None:
                self._write(False, reason, available=False)
                log.warning("%s", reason)
                await asyncio.sleep(UNAVAILABLE_RECHECK_S)
            elif self.engine == embedded.LLAMA_SERVER and embedded.server_binary() is None:
                # Not llama-cpp-python's server meanwhile: its one slot would hold chats
                # the supervisor starts for llama-server's, waiting in it with no word.
                if not said_missing:
                    log.warning("%s", ENGINE_MISSING)
                    self._write(False, ENGINE_MISSING, available=True, engine=self.engine,
                                slots=self.slots)
                    said_missing = True
                await asyncio.sleep(ENGINE_RECHECK_S)
            else:
                model = embedded.model_path(self.local_model)
                assert model is not None
                return model

    async def _serve_once(self, model: str, on_ready: Any) -> None:
        port = embedded.free_port()
        self.base_url = None
        engine, slots = self.engine, self.slots
        running = {"engine": engine, "slots": slots}
        log_path = self.data_dir / LOG_FILE
        with open(log_path, "ab") as out:
            cpus = embedded.model_cpus()
            self.proc = subprocess.Popen(
                embedded.server_command(model, cpus=cpus, slots=slots, engine=engine),
                env=embedded.server_env(port, self.key, engine),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                umask=trust.PRIVATE_UMASK, preexec_fn=_in_the_child(cpus))
        # At once, before the server has loaded the model: the threads it starts for it
        # inherit it.
        lower_priority_of(self.proc.pid)
        # Its pid before it loads: a supervisor killed meanwhile leaves it to the next one.
        self._write(False, "loading the embedded model", available=True,
                    model=embedded.model_name(model), **running)
        started = time.monotonic()
        if not await self._until_ready(port, log_path):
            return
        self.base_url = f"http://127.0.0.1:{port}/v1"
        if slots > 1:
            await self._warm_up(slots)
        name = embedded.model_name(model)
        ready = {"available": True, "model": name,
                 "load_s": round(time.monotonic() - started, 2), **running}
        self._write(True, "ok", **ready)
        log.info("embedded model %s ready at %s (%s, %d slot(s))", name, self.base_url,
                 engine, slots)
        if on_ready is not None:
            on_ready(self.base_url, name)
        self.restarts = 0
        failures = 0
        said_stopped = False
        # Waiting on the process, not sleeping: llm.json stops saying ready the moment it
        # exits, before anything else can take its port.
        while not await asyncio.to_thread(_exited, self.proc, HEALTH_EVERY_S):
            # Connecting, not /models: llama-cpp-python's server answers /models only
            # between chats (one lock guards the model); a long chat is no reason to restart.
            # A process stopped by a signal (SIGSTOP, SIGTSTP, a debugger) still accepts
            # connections (the kernel completes them), but answers none: every chat would
            # wait out its first-token limit while llm.json said ready.
            stopped = _stopped(self.proc.pid)
            if stopped != said_stopped:  # said at once: chats then wait for it, not on it
                said_stopped = stopped
                if stopped:
                    self._write(False, "the embedded model server is stopped by a signal; "
                                "it is restarted unless it runs again", **ready)
                else:
                    self._write(True, "ok", **ready)
            answering = not stopped and await asyncio.to_thread(self._accepts, port)
            failures = 0 if answering else failures + 1
            if failures >= HEALTH_FAILURES and self.proc.poll() is None:
                log.warning("the embedded model server stopped answering; restarting it")
                await asyncio.to_thread(self.stop)
        log.warning("the embedded model server exited (%s)", self.proc.returncode)

    async def _until_ready(self, port: int, log_path: Path) -> bool:
        """Wait until the server listens on `port`, nothing else does, and it lists its
        model. Its key goes out only to a port known to be its own."""
        assert self.proc is not None
        base_url = f"http://127.0.0.1:{port}/v1"
        started = time.monotonic()
        while True:
            if self.proc.poll() is not None:  # one reason: another process had its port
                log.error("the embedded model server exited (%s); see %s",
                          self.proc.returncode, log_path)
                return False
            if time.monotonic() - started > START_TIMEOUT_S:
                log.error("the embedded model server did not answer in %s s", START_TIMEOUT_S)
                await asyncio.to_thread(self.stop)
                return False
            owned = await asyncio.to_thread(lambda: embedded.owns_port(self._pids(), port))
            if owned is False:
                log.error("another process listens on port %s beside the embedded model "
                          "server; starting it again on another port", port)
                await asyncio.to_thread(self.stop)
                return False
            if owned:
                listed: bool = await asyncio.to_thread(embedded.answers, base_url, self.key)
                if listed:
                    return True
            await asyncio.sleep(0.25)

    async def _warm_up(self, slots: int) -> None:
        """One token from every slot at once, before the server is said ready: the first
        batch that decodes several slots together is slower than any after it, and it
        would otherwise be the first chats sent together."""
        assert self.base_url is not None
        url, key = f"{self.base_url}/chat/completions", self.key

        def one(slot: int) -> None:
            # `id_slot`: llama-server's own field; without it a quick answer frees its slot
            # for the next request, and some slots stay cold.
            body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
                    "id_slot": slot}
            request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {key}"})
            try:
                with urllib.request.urlopen(request, timeout=WARM_UP_TIMEOUT_S) as answer:
                    answer.read()
            except OSError as exc:  # a chat then only starts slower
                log.info("warming the embedded model up: %s", exc)

        await asyncio.gather(*(asyncio.to_thread(one, slot) for slot in range(slots)))

    def _pids(self) -> set[int]:
        """The server's process and those it started."""
        assert self.proc is not None
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            children = []
        return {self.proc.pid, *(child.pid for child in children)}

    def _stop_stale(self) -> None:
        """A server left by a supervisor that was killed outright: stop it."""
        status = embedded.read_status(str(self.data_dir)) or {}
        pid = status.get("pid")
        if not isinstance(pid, int) or pid <= 0:  # psutil refuses those with ValueError
            return
        folder = status.get("data_dir")
        if isinstance(folder, str) and not p.same_folder(folder, self.data_dir):
            return  # a copy's (a backup restored beside it): the original's server, live
        try:
            proc = psutil.Process(pid)
            if embedded.is_server(proc.cmdline()):
                log.info("stopping a stale embedded model server (pid %s)", pid)
                proc.terminate()
                try:
                    proc.wait(STOP_GRACE_S)
                except psutil.TimeoutExpired:
                    proc.kill()
        except psutil.Error:
            pass  # gone already, or not ours

    @staticmethod
    def _accepts(port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        if sys.platform != "win32":  # a stopped process acts on SIGTERM only once it runs
            with contextlib.suppress(OSError):
                os.kill(proc.pid, signal.SIGCONT)
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait(10)


def _in_the_child(cpus: set[int] | None) -> Callable[[], None] | None:
    """Linux: the server is killed when the supervisor that started it dies, even by
    SIGKILL; elsewhere the next leader stops it (`_stop_stale`). Its key lives only in
    that supervisor and its runners, so no later one could use it anyway. And it keeps
    to `cpus` from its first instruction: set once it had started, a thread it started
    first (the machine busy) kept them all."""
    if sys.platform != "linux":
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the fork
    parent = os.getpid()

    def in_child() -> None:
        # The signal follows the thread that forked: the event loop's, which lives as long
        # as the supervisor.
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # it died before the line above
            os._exit(1)
        if cpus:
            with contextlib.suppress(OSError):  # it runs anywhere: only the API's latency
                os.sched_setaffinity(0, cpus)  # under load suffers

    return in_child


def _stopped(pid: int) -> bool:
    """Is the process stopped by a signal (it then answers nothing)?"""
    try:
        return psutil.Process(pid).status() in (psutil.STATUS_STOPPED,
                                                psutil.STATUS_TRACING_STOP)
    except psutil.Error:
        return False


def _exited(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True
