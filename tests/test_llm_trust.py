"""The LLM server Offload talks to can be trusted, and watching it never dies: the
status probe survives any answer, the embedded model's server takes requests only with
its key, and it is published as ready only once its port is known to be its own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import pytest

from jobs import protocol as p
from jobs.llm.status import LLMStatus
from jobs.protocol import embedded
from jobs.resilient import resilient
from jobs.settings import get_settings
from jobs.store.job_store import JobStore
from tests.conftest import ROOT, free_port, stop_process, wait_for
from tests.fake_llm import FakeLLM
from tests.http_fake import JSONHandler, ScriptedServer


class _ModelsHandler(JSONHandler):
    def do_GET(self) -> None:
        fake: ModelsServer = self.server.fake  # type: ignore[attr-defined]
        fake.seen.append(dict(self.headers))
        self._json(200, fake.answer)


class ModelsServer(ScriptedServer):
    """Answers `GET .../models` with whatever `answer` holds (bytes go out as they are),
    and keeps the headers it was sent."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.seen: list[dict[str, str]] = []
        super().__init__(ThreadingHTTPServer(("127.0.0.1", 0), _ModelsHandler))

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


# -- the status probe (/api/health) -----------------------------------------------------


@pytest.mark.parametrize("odd", [[], [1, 2]], ids=["empty-list", "list"])
def test_health_says_an_odd_models_answer_and_recovers(
        make_server: Callable[..., Any], odd: list[int]) -> None:
    """A /models answer that is a JSON list killed the probe task: /api/health then said
    "not checked yet" for ever, whatever the server did next."""
    with ModelsServer(odd) as fake:
        server = make_server(env={"OPENAI_BASE_URL": fake.base_url})
        with server.client() as client:
            llm = wait_for(lambda: (h := client.get("/api/health").json()["llm"])["detail"]
                           != "not checked yet" and h, 30, 0.2, "the first probe")
            assert llm["ready"] is False
            assert "/models" in llm["detail"] and "JSON list" in llm["detail"], llm
            assert llm["model"] is None, "no model known yet: null, not an empty name"
            fake.answer = {"object": "list", "data": [{"id": "m-1", "object": "model"}]}
            llm = wait_for(lambda: (h := client.get("/api/health").json()["llm"])["ready"]
                           and h, 60, 0.2, "the probe to see the server answer well")
            assert llm["detail"] == "ok" and llm["model"] == "m-1"
        log = server.log.read_text()
    assert "Traceback" not in log, log[-3000:]


class _RedirectHandler(JSONHandler):
    def do_GET(self) -> None:
        fake: Redirect = self.server.fake  # type: ignore[attr-defined]
        fake.seen.append(dict(self.headers))
        self.send_response(302)
        self.send_header("Location", fake.to)
        self.send_header("Content-Length", "0")
        self.end_headers()


class Redirect(ScriptedServer):
    """Answers every `GET` with a redirect to `to`, and keeps the headers it was sent."""

    def __init__(self, to: str) -> None:
        self.to = to
        self.seen: list[dict[str, str]] = []
        super().__init__(ThreadingHTTPServer(("127.0.0.1", 0), _RedirectHandler))


def test_the_probe_sends_the_key_nowhere_a_redirect_points(
        make_server: Callable[..., Any]) -> None:
    key = "sk-sentinel-of-the-redirect-test"
    with ModelsServer({"data": [{"id": "m"}]}) as elsewhere, \
            Redirect(f"{elsewhere.base_url}/models") as redirect:
        server = make_server(env={"OPENAI_BASE_URL": f"http://127.0.0.1:{redirect.port}/v1",
                                  "OPENAI_API_KEY": key})
        with server.client() as client:
            llm = wait_for(lambda: (h := client.get("/api/health").json()["llm"])["detail"]
                           != "not checked yet" and h, 30, 0.2, "the first probe")
    assert llm["ready"] is False and "redirected to" in llm["detail"], llm
    assert redirect.seen and all(headers.get("Authorization") == f"Bearer {key}"
                                 for headers in redirect.seen)
    assert elsewhere.seen == []


def test_the_probe_of_a_server_with_an_international_name_says_what_it_found(
        make_server: Callable[..., Any]) -> None:
    # urllib put the name in the Host header as it was: each probe failed on a character
    # beyond Latin-1, health said "not checked yet" for good, and the log had a traceback
    # every 5 s; the chats, sent by http.client in IDNA, went through.
    server = make_server(env={"OPENAI_BASE_URL": "http://модель.invalid/v1"})
    with server.client() as client:
        llm = wait_for(lambda: (h := client.get("/api/health").json()["llm"])["detail"]
                       != "not checked yet" and h, 30, 0.2, "the first probe")
    assert llm["ready"] is False and llm["detail"].startswith("not reachable at http://модель"), llm
    assert "Traceback" not in server.log.read_text()


@pytest.mark.parametrize("answer", [
    [], [1, 2], None, b'"models"', 7, True, {"data": 5}, {"data": {"id": "m"}}, {"object": "x"},
    b"<html>not json</html>", b"\xff\xfe", b'{"data": [',
])
def test_the_probe_survives_any_answer_and_says_what_it_was(
        answer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    with ModelsServer(answer) as fake:
        monkeypatch.setenv("OPENAI_BASE_URL", fake.base_url)
        get_settings.cache_clear()
        status = LLMStatus(get_settings())
        assert status.probe() is False
        assert status.ready is False and "/models" in status.detail, status.detail
        fake.answer = {"data": [{"id": "m-2"}]}
        assert status.probe() is True
        assert status.detail == "ok" and status.model == "m-2"


def test_data_with_odd_entries_is_a_model_list_without_a_name(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with ModelsServer({"data": [1, "x"]}) as fake:
        monkeypatch.setenv("OPENAI_BASE_URL", fake.base_url)
        get_settings.cache_clear()
        status = LLMStatus(get_settings())
        assert status.probe() is True and status.model is None  # not known: no name


# -- the embedded model's port ----------------------------------------------------------


@contextlib.contextmanager
def _listener(port: int, reuse_port: bool = False) -> Iterator[subprocess.Popen[bytes]]:
    """A process of its own listening on `port` (with SO_REUSEPORT a second one can share
    it, as any process can on Windows)."""
    code = ("import socket, time\n"
            "s = socket.socket()\n"
            f"if {reuse_port}: s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n"
            f"s.bind(('127.0.0.1', {port})); s.listen(); print('ok', flush=True)\n"
            "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ok\n"
        yield proc
    finally:
        stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="needs SO_REUSEPORT")
def test_a_port_is_ours_only_when_we_alone_listen_on_it() -> None:
    port = free_port()
    with _listener(port, reuse_port=True) as ours:
        assert embedded.owns_port({ours.pid}, port) is True
        assert embedded.owns_port({os.getpid()}, port) is None  # we do not listen there
        with _listener(port, reuse_port=True) as other:
            assert embedded.owns_port({ours.pid}, port) is False
            assert embedded.owns_port({ours.pid, other.pid}, port) is True


class _SquatHandler(JSONHandler):
    def _record(self) -> None:
        fake: Squatter = self.server.fake  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length", 0))
        fake.requests.append({"method": self.command, "path": self.path,
                              "headers": dict(self.headers), "body": self.rfile.read(length)})

    def do_GET(self) -> None:
        self._record()
        self._json(200, {"object": "list", "data": [{"id": "squatter", "object": "model"}]})

    def do_POST(self) -> None:
        self._record()
        self._json(200, {"model": "squatter", "choices": [{
            "message": {"role": "assistant", "content": "gotcha"}, "finish_reason": "stop"}]})


class Squatter(ScriptedServer):
    """An OpenAI-compatible impostor on a port taken before the model server's bind; it
    records whatever reaches it."""

    def __init__(self, port: int) -> None:
        self.requests: list[dict[str, Any]] = []
        super().__init__(ThreadingHTTPServer(("127.0.0.1", port), _SquatHandler))


def _model_server(api: subprocess.Popen[bytes], skip: set[int]) -> psutil.Process | None:
    """The embedded model's server among the API's descendants, once it runs as itself."""
    for proc in psutil.Process(api.pid).children(recursive=True):
        try:
            if proc.pid not in skip and embedded.is_server(proc.cmdline()):
                return proc
        except psutil.Error:
            pass
    return None


def _port_of(proc: psutil.Process) -> int | None:
    """Where it will listen: what any local account reads on its command line, or, once
    that no longer says, what a process of the same account reads in its environment."""
    try:
        command = proc.cmdline()
        if "--port" in command:
            return int(command[command.index("--port") + 1])
        environ = proc.environ()
        port = environ.get("LLAMA_ARG_PORT") or environ.get("PORT")
    except psutil.Error:
        return None
    return int(port) if port else None


class _Published:
    """Every status llm.json shows while the test runs (read every few milliseconds)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: list[tuple[bool, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            with contextlib.suppress(OSError, ValueError):
                status = json.loads(self.path.read_text())
                entry = (bool(status.get("ready")), str(status.get("base_url") or ""))
                if not self.seen or self.seen[-1] != entry:
                    self.seen.append(entry)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _squat(api: subprocess.Popen[bytes]) -> tuple[Squatter, int]:
    """Bind the model server's port before it does; a server that won the race is killed,
    and its successor's port squatted."""
    lost: set[int] = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        proc = _model_server(api, lost)
        port = _port_of(proc) if proc is not None else None
        if proc is None or port is None:
            time.sleep(0.002)
            continue
        try:
            return Squatter(port).__enter__(), port
        except OSError:  # it bound first: try the next one
            lost.add(proc.pid)
            with contextlib.suppress(psutil.Error):
                proc.kill()
    raise AssertionError("never got to bind the model server's port first")


@pytest.mark.llm
@pytest.mark.timeout(300)
def test_a_process_that_takes_the_model_port_first_gets_nothing(
        make_server: Callable[..., Any]) -> None:
    """Before: the port was on the model server's command line and in llm.json while it
    loaded, and whatever answered /models there was published as ready."""
    server = make_server()
    published = _Published(server.data_dir / embedded.STATUS_FILE)
    squatter, port = _squat(server.proc)
    try:
        with server.client() as client:
            wait_for(lambda: client.get("/api/health").json()["llm"]["ready"], 180, 0.1,
                     "the embedded model, on a port of its own")
            job_id = client.post("/api/jobs", json={"kind": "chat", "input": {
                "messages": [{"role": "user", "content": "Say hello."}],
                "max_tokens": 16}}).json()["id"]
            job = wait_for(lambda: (j := client.get(f"/api/jobs/{job_id}").json())["state"]
                           in ("completed", "failed", "cancelled", "timeout") and j, 120, 0.2)
    finally:
        published.stop()
        squatter.__exit__()
    squatted = f"http://127.0.0.1:{port}/v1"
    assert (True, squatted) not in published.seen, published.seen
    assert all(ready or not url for ready, url in published.seen), (
        "llm.json named an address before the server there was known to be ours",
        published.seen)
    assert squatter.requests == [], "nothing may reach the squatter"
    assert job["state"] == "completed", job
    assert job["result"]["model"] != "squatter" and job["result"]["reply"] != "gotcha"


@pytest.mark.llm
@pytest.mark.timeout(300)
@pytest.mark.parametrize("fork_server", ["1", "0"], ids=["forked", "exec"])
def test_the_model_server_answers_only_with_its_key_which_runners_alone_get(
        make_server: Callable[..., Any], fork_server: str) -> None:
    """Before: any local process could chat with the embedded model. Now it needs the key,
    which runners (forked by the fork server, or started fresh) get in their environment
    and nothing ever writes down or shows."""
    server = make_server(env={"OFFLOAD_FORK_SERVER": fork_server})
    with server.client() as client:
        wait_for(lambda: client.get("/api/health").json()["llm"]["ready"], 180, 0.1,
                 "the embedded model")
        status = json.loads((server.data_dir / embedded.STATUS_FILE).read_text())
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{status['base_url']}/models", timeout=10)
        refused.value.close()
        assert refused.value.code == 401
        job_id = client.post("/api/jobs", json={"kind": "chat", "input": {
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 16}}).json()["id"]
        job = wait_for(lambda: (j := client.get(f"/api/jobs/{job_id}").json())["state"]
                       in ("completed", "failed", "cancelled", "timeout") and j, 120, 0.2)
        assert job["state"] == "completed" and job["result"]["reply"].strip(), job
        environ = psutil.Process(status["pid"]).environ()
        key = environ.get("LLAMA_API_KEY") or environ["API_KEY"]
        assert len(key) >= 32
        for proc in psutil.Process(server.proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                assert key not in " ".join(proc.cmdline()), proc
    server.stop()
    for path in [server.log, *server.data_dir.rglob("*")]:
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("key", ["k" * 43, None], ids=["with-key", "by-hand"])
def test_a_chat_runner_sends_the_embedded_models_key_from_its_environment(
        data_dir: Path, key: str | None) -> None:
    """As the launcher starts it (the key in its environment), and by hand without it: a
    message that says what to do, and nothing sent."""
    with FakeLLM() as fake:
        data_dir.mkdir(parents=True, exist_ok=True)
        p.write_json(embedded.status_path(str(data_dir)),  # as its supervisor writes it
                     {"ready": True, "base_url": fake.base_url, "detail": "ok",
                      "key_id": embedded.key_id(key or "")})
        job = JobStore(data_dir / "jobs").create("chat", {"messages": [
            {"role": "user", "content": "hi"}]}, 60)
        env = {k: v for k, v in os.environ.items() if k != "OFFLOAD_EMBEDDED_KEY"}
        if key is not None:
            env["OFFLOAD_EMBEDDED_KEY"] = key  # as the launcher sets it
        subprocess.run([sys.executable, "-m", "runners.chat", "--job-file",
                        str(JobStore(data_dir / "jobs").path(job["id"]))],
                       cwd=ROOT, env=env, capture_output=True, timeout=60)
        done = JobStore(data_dir / "jobs").read(job["id"])
    if key is None:
        assert done["state"] == "failed" and fake.requests == []
        assert "OPENAI_BASE_URL" in done["error"]["message"], done["error"]
    else:
        assert done["state"] == "completed", done
        assert [r["headers"].get("Authorization") for r in fake.requests] == [f"Bearer {key}"]


# -- background work that fails starts again --------------------------------------------


def test_an_odd_pid_in_llm_json_does_not_stop_the_model_helper_for_good(
        make_server: Callable[..., Any], data_dir: Path) -> None:
    """The supervisor's model helper read the last server's pid from llm.json to stop it;
    a pid psutil refuses (here -1) failed it at every restart, so llm.json and
    /api/health never said anything again."""
    data_dir.mkdir(parents=True)
    (data_dir / embedded.STATUS_FILE).write_text(json.dumps({"ready": False, "pid": -1}))
    server = make_server(env={"OFFLOAD_LOCAL_MODEL": str(data_dir / "no-such-model.gguf")})
    with server.client() as client:
        llm = wait_for(lambda: (h := client.get("/api/health").json()["llm"])["detail"]
                       .startswith("the embedded model is unavailable") and h, 30, 0.2,
                       "the model helper to say why there is no model")
    assert "OFFLOAD_LOCAL_MODEL" in llm["detail"]
    assert "Traceback" not in (data_dir / "supervisor.log").read_text()


def test_resilient_logs_a_failure_and_starts_the_work_again(
        caplog: pytest.LogCaptureFixture) -> None:
    runs: list[int] = []

    async def work() -> None:
        runs.append(len(runs))
        if len(runs) < 3:
            raise RuntimeError(f"failure {len(runs)}")

    async def main() -> None:
        await asyncio.wait_for(resilient("the work", work, pause_s=0.01), 30)
        forever = asyncio.create_task(resilient("sleeping", lambda: asyncio.sleep(3600)))
        await asyncio.sleep(0.05)
        forever.cancel()  # cancelling stops it: never swallowed as a failure
        with pytest.raises(asyncio.CancelledError):
            await forever

    with caplog.at_level(logging.ERROR, logger="jobs.resilient"):
        asyncio.run(main())
    assert runs == [0, 1, 2]
    failures = [r for r in caplog.records if r.name == "jobs.resilient"]
    assert [r.getMessage() for r in failures] == [
        "the work failed; starting it again in 0.01 s"] * 2
    assert all(r.exc_info and "failure" in str(r.exc_info[1]) for r in failures)


# -- a status left by a supervisor killed outright -------------------------------------


def test_a_chat_never_goes_to_a_port_a_stale_status_names(data_dir: Path) -> None:
    # The status of a server whose supervisor was killed outright still says "ready" on
    # its port, which any account may hold now: the chat's prompt and the new key must
    # not go there. (The runner is started as a supervisor starts it, with its key.)
    store = JobStore(data_dir / "jobs")
    job = store.create("chat", {"messages": [{"role": "user", "content": "my secret"}]}, 8)
    with FakeLLM() as squatter:
        earlier = time.time() - 60
        p.write_json(embedded.status_path(str(data_dir)), {
            "ready": True, "base_url": squatter.base_url, "detail": "ready",
            "key_id": embedded.key_id("the killed supervisor's key"),
            "updated_at": p.iso(earlier)})
        env = {key: value for key, value in os.environ.items() if key != "OPENAI_BASE_URL"}
        done = subprocess.run(
            [sys.executable, "-m", "runners.chat", "--job-file", str(store.path(job["id"]))],
            cwd=ROOT, env={**env, embedded.KEY_ENV: "this supervisor's key"},
            capture_output=True, timeout=60)
        assert squatter.requests == []
    final = store.read(job["id"])
    assert done.returncode != 0 and final["state"] == "failed", final
    assert "embedded model is not ready" in final["error"]["message"]


# A server (an echoing proxy, a gateway that names the caller's credential in its model
# list or in each chunk's `model`) that put the key it was sent into a model's name had it
# shown in `/api/health`'s `llm.model`, `offload status` and a chat's `result.model`, to
# every holder of the API's token.
ECHOED_KEY = "sk-sentinel-model-name-0123456789"


class _EchoingHandler(JSONHandler):
    def _key(self) -> str:
        return self.headers.get("Authorization", "").partition(" ")[2]

    def do_GET(self) -> None:
        self._json(200, {"object": "list", "data": [{"id": f"proxy-for-{self._key()}"}]})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        model = f"proxy-for-{self._key()}"
        chunks = [{"model": model, "choices": [{"index": 0, "delta": {"content": "Hello"}}]},
                  {"model": model, "choices": [{"index": 0, "delta": {},
                                                "finish_reason": "stop"}]}]
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        self._answer(200, body.encode(), "text/event-stream", None)


class _KeyEchoingServer(ScriptedServer):
    def __init__(self) -> None:
        super().__init__(ThreadingHTTPServer(("127.0.0.1", 0), _EchoingHandler))

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def test_health_names_the_model_without_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    with _KeyEchoingServer() as fake:
        monkeypatch.setenv("OPENAI_BASE_URL", fake.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", ECHOED_KEY)
        get_settings.cache_clear()
        status = LLMStatus(get_settings())
        assert status.probe() is True
    assert status.model is not None and status.model.startswith("proxy-for-")
    assert ECHOED_KEY not in json.dumps(status.as_dict())
    # A short key (any does for Ollama) is no secret to cut out of every name: "x" made
    # "mixtral-8x7b" "mi[redacted]tral-8[redacted]7b".
    with _KeyEchoingServer() as fake:
        monkeypatch.setenv("OPENAI_BASE_URL", fake.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "x")
        get_settings.cache_clear()
        status = LLMStatus(get_settings())
        assert status.probe() is True
    assert status.model == "proxy-for-x"


def test_a_chats_result_names_the_model_without_the_key(data_dir: Path) -> None:
    with _KeyEchoingServer() as fake:
        store = JobStore(data_dir / "jobs")
        job = store.create("chat", {"messages": [{"role": "user", "content": "hi"}]}, 60)
        env = {**os.environ, "OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": ECHOED_KEY}
        subprocess.run([sys.executable, "-m", "runners.chat", "--job-file",
                        str(store.path(job["id"]))],
                       cwd=ROOT, env=env, capture_output=True, timeout=60)
        done = store.read(job["id"])
    assert done["state"] == "completed", done
    assert str(done["result"]["model"]).startswith("proxy-for-"), done["result"]
    assert ECHOED_KEY not in json.dumps(done)
    assert ECHOED_KEY not in (data_dir / "jobs" / job["id"] / "job.json").read_text()


# -- the status as a supervisor leaves -------------------------------------------------


def _leaving(data_dir: Path, next_leader: dict[str, Any] | None) -> dict[str, Any] | None:
    """An embedded model that said itself ready, then its supervisor left (cancelled, as
    `serve` cancels it once the lock is released); `next_leader`, where given, is the
    status the next leader wrote meanwhile. The status file as it is left."""
    from jobs.llm import server as llm_server

    model = llm_server.EmbeddedServer(data_dir, 4, embedded.LLAMA_SERVER)
    said_ready = threading.Event()

    async def serve_once(_model: str, _on_ready: Any) -> None:
        model.base_url = "http://127.0.0.1:9/v1"
        model._write(True, "ok", available=True)
        said_ready.set()
        await asyncio.sleep(3600)

    async def servable() -> str:
        return "model.gguf"

    model._stop_stale = lambda: None  # type: ignore[method-assign]
    model._servable = servable  # type: ignore[method-assign]
    model._serve_once = serve_once  # type: ignore[method-assign,assignment]

    async def scenario() -> None:
        task = asyncio.create_task(model.run())
        while not said_ready.is_set():
            await asyncio.sleep(0.01)
        if next_leader is not None:
            p.write_json(embedded.status_path(str(data_dir)), next_leader)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    return embedded.read_status(str(data_dir))


def test_a_leaving_supervisor_says_its_model_stopped(data_dir: Path) -> None:
    status = _leaving(data_dir, None)
    assert status is not None and status["ready"] is False, status
    assert "stopped" in status["detail"]


def test_a_leaving_supervisor_leaves_the_next_leaders_status_alone(data_dir: Path) -> None:
    # The API restarted (or its leading worker ended): the next supervisor took the lock
    # as this one released it, started its own model server and said it ready, before
    # this one had stopped its own. Saying "stopped" over that status held every chat
    # back (waiting for a ready model, up to two minutes) while the new server ran.
    theirs = {"ready": True, "detail": "ok", "base_url": "http://127.0.0.1:10/v1",
              "pid": None, "key_id": embedded.key_id("the next leader's key"),
              "data_dir": str(data_dir), "updated_at": p.now_iso()}
    assert _leaving(data_dir, theirs) == theirs
