"""Security: the token on every route, CORS closed, traversal, secrets, bounds."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import httpx
import psutil
import pytest

from jobs import protocol as p
from tests.conftest import wait_for
from tests.fake_llm import FakeLLM
from tests.http_fake import JSONHandler, ScriptedServer
from tests.server import Server

MakeServer = Callable[..., Server]
SENTINEL = "sk-sentinel-7c41e9b2a05d4f68"
TOKEN = "t0ken-9d3f2c1b-5e7a"


def _api_routes(client: httpx.Client) -> list[tuple[str, str]]:
    """Every /api route of the OpenAPI schema, with its path parameters filled in."""
    paths = client.get("/openapi.json").json()["paths"]
    routes = []
    for path, operations in paths.items():
        if path.startswith("/api"):
            concrete = re.sub(r"\{[^}]+\}", "0" * 32, path)
            routes += [(method.upper(), concrete) for method in operations]
    return routes


def test_token_checked_on_every_api_route(make_server: MakeServer) -> None:
    server = make_server(env={"OFFLOAD_API_TOKEN": TOKEN})
    with server.client() as client:
        routes = _api_routes(client) + [("GET", "/api/no-such-route"), ("GET", "/metrics"),
                                        ("OPTIONS", "/api/jobs"), ("HEAD", "/api/health"),
                                        ("TRACE", "/api/jobs")]
        assert len(routes) >= 12  # the schema really was read
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                            {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Bearer"}):
                answer = client.request(method, path, headers=headers)
                assert answer.status_code == 401, (method, path, headers, answer.text)
                assert TOKEN not in answer.text
        # A newline at the end of a path (%0A): the route matched it, the guard did not.
        for path in ("/metrics%0A", "/api/jobs%0A", "/metrics%0D", "/metrics%00"):
            sneaked = client.get(path)
            assert sneaked.status_code in (400, 401), (path, sneaked.text)
        # Without an Origin, or with no OFFLOAD_CORS_ORIGINS, it is no browser's preflight.
        fake_preflight = client.options("/api/jobs",
                                        headers={"Access-Control-Request-Method": "POST"})
        assert fake_preflight.status_code == 401, fake_preflight.text
        # Before its body is read: a stranger learns nothing of what the API would take.
        for body in (b"{bad", b"\xff", b'{"kind": "nope"}'):
            answer = client.post("/api/jobs", content=body,
                                 headers={"Content-Type": "application/json"})
            assert answer.status_code == 401, (body, answer.text)
            assert answer.headers["www-authenticate"] == "Bearer"
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert client.get("/api/health", headers=good).status_code == 200


class _UnderARootPath(Server):
    """Served behind a proxy under a sub-path, as `uvicorn --root-path /offload` does."""

    def command(self) -> list[str]:
        return [*super().command(), "--root-path", "/offload"]


def test_the_token_is_checked_under_a_root_path(data_dir: Path, tmp_path: Path) -> None:
    # uvicorn puts the root path in front of the request's path; the routes match it
    # without: a guard that looked at the path as given let every request through.
    server = _UnderARootPath(data_dir, tmp_path / "server.log",
                             {"OFFLOAD_API_TOKEN": TOKEN}).start()
    try:
        with server.client() as client:
            answered = 0
            for prefix in ("", "/offload"):
                for method, path in (("GET", "/api/jobs"), ("GET", "/metrics"),
                                     ("POST", "/api/jobs"), ("GET", "/api/health")):
                    body = {"kind": "sleep"} if method == "POST" else None
                    stranger = client.request(method, prefix + path, json=body)
                    assert stranger.status_code in (401, 404, 405), (prefix + path, stranger.text)
                    owner = client.request(method, prefix + path, json=body,
                                           headers={"Authorization": f"Bearer {TOKEN}"})
                    answered += owner.status_code in (200, 202)
            assert answered >= 4, "the routes were not reached at all"
            owner_jobs = client.get("/api/jobs", headers={"Authorization": f"Bearer {TOKEN}"})
            assert [job["kind"] for job in owner_jobs.json()["jobs"]] == ["sleep"] * (answered // 4)
    finally:
        server.stop()


class _OnEveryAddress(Server):
    """Served as `uvicorn --host 0.0.0.0` would be, against the advice, without a token."""

    def command(self) -> list[str]:
        return [*super().command()[:-6], "--host", "0.0.0.0", "--port", str(self.port),
                "--workers", "1"]


def test_without_a_token_only_loopback_is_answered_on_every_path(data_dir: Path,
                                                                  tmp_path: Path) -> None:
    outside = next((address.address for addresses in psutil.net_if_addrs().values()
                    for address in addresses if address.family.name == "AF_INET"
                    and not address.address.startswith("127.")), None)
    if outside is None:
        pytest.skip("this machine has no address but loopback")
    server = _OnEveryAddress(data_dir, tmp_path / "server.log").start()
    try:
        for path in ("/", "/docs", "/openapi.json", "/api/queue", "/metrics"):
            answer = httpx.get(f"http://{outside}:{server.port}{path}",
                               headers={"Host": "localhost"}, timeout=30)
            assert answer.status_code == 403, (path, answer.status_code, answer.text[:200])
            assert "answers only on 127.0.0.1" in answer.json()["detail"]
        assert httpx.get(f"{server.url}/api/queue", timeout=30).json()["paused"] is False
    finally:
        server.stop()


def test_cors_is_closed_unless_configured(make_server: MakeServer) -> None:
    preflight = {"Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    closed = make_server()
    with closed.client() as client:
        answer = client.options("/api/jobs", headers=preflight)
        assert "access-control-allow-origin" not in answer.headers
        # Refused before it runs, not only unread: a wait it asked for would hold a slot.
        simple = client.get("/api/health", headers={"Origin": "http://elsewhere.example"})
        assert simple.status_code == 403
        assert "access-control-allow-origin" not in simple.headers
    opened = make_server(env={"OFFLOAD_CORS_ORIGINS": "http://dash.example"})
    with opened.client() as client:
        allowed = client.options("/api/jobs", headers={**preflight,
                                                       "Origin": "http://dash.example"})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "http://dash.example"
        refused = client.options("/api/jobs", headers=preflight)
        assert "access-control-allow-origin" not in refused.headers
        resume = client.options(f"/api/jobs/{'a' * 32}/events", headers={
            "Origin": "http://dash.example", "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization, last-event-id"})
        assert resume.status_code == 200, "a page elsewhere may resume a stream"


TRAVERSALS = ["/..%2F..%2Fpyproject.toml", "/%2e%2e/%2e%2e/pyproject.toml",
              "/static/../pyproject.toml", "/..\\..\\pyproject.toml", "/....//pyproject.toml",
              "/api/sessions/..%2F..%2Fjobs", "/api/sessions/%2e%2e",
              "/api/jobs/..%252F..%252Fpyproject.toml", "/api/ai_chat_result/..%2F..%2Fx",
              "/api/jobs/" + "a" * 32 + "%2F..%2F..%2F..%2Fpyproject.toml"]


@pytest.fixture
def server(make_server: MakeServer) -> Server:
    return make_server()


@pytest.mark.parametrize("path", TRAVERSALS)
def test_traversal_tricks_reach_nothing(server: Server, path: str) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        answer = client.get(path)
    assert answer.status_code in (200, 404, 422), answer.status_code
    assert "[project]" not in answer.text and "job.json" not in answer.text
    if path.startswith("/api/sessions/"):  # a session id is a label, never a path
        assert answer.status_code in (404, 422) or answer.json()["turns"] == []
    elif path.startswith("/api/"):
        assert answer.status_code in (404, 422) or answer.json() == {"status": "not_found"}


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    with FakeLLM(pieces=["All ", "good."], delay_s=0.05) as fake:
        yield fake


def test_api_key_never_shows(make_server: MakeServer, llm: FakeLLM, data_dir: Path) -> None:
    server = make_server(env={"OPENAI_BASE_URL": llm.base_url, "OPENAI_API_KEY": SENTINEL,
                              "OFFLOAD_API_TOKEN": TOKEN})
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with server.client(headers=auth) as client:
        job = client.post("/api/jobs", json={"kind": "chat", "input": {
            "messages": [{"role": "user", "content": "hi"}], "session_id": "s1"}}).json()
        seen_in_ps, given_the_token = [], []
        assert server.proc is not None
        api = psutil.Process(server.proc.pid)

        def watch_processes() -> None:  # while the runner lives
            for proc in psutil.process_iter(["cmdline"]):
                seen_in_ps.append(" ".join(proc.info["cmdline"] or []))
            # The token is the API's alone: not the supervisor's, its fork server's or a
            # runner's (a kind of one's own, say), which never answer a request.
            for proc in api.children(recursive=True):
                try:
                    if "OFFLOAD_API_TOKEN" in proc.environ():
                        given_the_token.append(" ".join(proc.cmdline()))
                except psutil.Error:
                    pass  # ended meanwhile

        def finished() -> bool:
            watch_processes()
            return client.get(f"/api/jobs/{job['id']}").json()["state"] in p.FINAL_STATES

        wait_for(finished, 30, what="the chat")
        assert client.get(f"/api/jobs/{job['id']}").json()["state"] == "completed"
        assert llm.requests[0]["headers"]["Authorization"] == f"Bearer {SENTINEL}"
        answers = [client.get(path).text for path in (
            "/api/health", "/api/history", "/api/jobs", f"/api/jobs/{job['id']}",
            f"/api/jobs/{job['id']}/log", f"/api/jobs/{job['id']}/events",
            f"/api/ai_chat_result/{job['id']}", "/api/sessions/s1", "/openapi.json", "/")]
    assert any("runners.chat" in line for line in seen_in_ps)  # the runner was seen
    assert not [line for line in seen_in_ps if SENTINEL in line]
    assert not given_the_token, given_the_token
    assert all(SENTINEL not in text for text in answers)
    files = [f for f in data_dir.rglob("*") if f.is_file()] + [server.log]
    assert len(files) > 3
    for path in files:
        assert SENTINEL not in path.read_text(errors="replace"), path


def test_a_key_with_a_line_end_is_sent_without_it_and_shown_nowhere(
        make_server: MakeServer, llm: FakeLLM, data_dir: Path, tmp_path: Path) -> None:
    # `export OPENAI_API_KEY=$(cat key.txt)` of a file saved with Windows line ends leaves
    # a carriage return: each chat failed with http.client's "Invalid header value
    # b'Bearer sk-...\\r'" as its error, the key whole, in the job, its log and every answer.
    server = make_server(env={"OPENAI_BASE_URL": llm.base_url, "OPENAI_API_KEY": f"{SENTINEL}\r"})
    with server.client() as client:
        job = client.post("/api/jobs", json={"kind": "chat", "input": {
            "messages": [{"role": "user", "content": "hi"}]}}).json()
        done = wait_for(lambda: (j := client.get(f"/api/jobs/{job['id']}").json())["state"]
                        in p.FINAL_STATES and j, 30, what="the chat")
        answers = [json.dumps(done), client.get(f"/api/jobs/{job['id']}/log").text,
                   client.get("/api/health").text]
    assert done["state"] == "completed", done["error"]
    assert llm.requests[0]["headers"]["Authorization"] == f"Bearer {SENTINEL}"
    files = [f for f in data_dir.rglob("*") if f.is_file()] + [server.log]
    assert not [text for text in answers if SENTINEL in text]
    assert not [path for path in files if SENTINEL in path.read_text(errors="replace")]
    # One within it cannot be sent: the start stops, saying so without it.
    refused = subprocess.run(
        [sys.executable, "-m", "uvicorn", "api_entry:app", "--port", "0"], cwd=p.ROOT,
        env={**os.environ, "OFFLOAD_DATA_DIR": str(tmp_path / "other"),
             "OPENAI_BASE_URL": llm.base_url, "OPENAI_API_KEY": f"{SENTINEL}\nx"},
        capture_output=True, text=True, timeout=60)
    assert refused.returncode == 3 and "OPENAI_API_KEY holds a line break" in refused.stderr
    assert SENTINEL not in refused.stderr + refused.stdout


class _KeyQuoting(JSONHandler):
    """A model server that refuses the key and quotes it, as some proxies do."""

    def do_GET(self) -> None:
        key = self.headers.get("Authorization", "").removeprefix("Bearer ")
        self.send_response(401, f"invalid api key {key}")
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_a_model_server_quoting_the_key_shows_it_nowhere(make_server: MakeServer) -> None:
    # /api/health said "not reachable at ...: invalid api key sk-...", to every holder of
    # the API token.
    with ScriptedServer(ThreadingHTTPServer(("127.0.0.1", 0), _KeyQuoting)) as fake:
        server = make_server(env={"OPENAI_BASE_URL": f"http://127.0.0.1:{fake.port}/v1",
                                  "OPENAI_API_KEY": SENTINEL})
        with server.client() as client:
            llm = wait_for(lambda: (h := client.get("/api/health").json()["llm"])["detail"]
                           != "not checked yet" and h, 30, what="the model server's check")
    assert "invalid api key [redacted]" in llm["detail"], llm
    assert SENTINEL not in str(llm)


def test_event_streams_are_bounded(make_server: MakeServer) -> None:
    server = make_server(env={"OFFLOAD_MAX_EVENT_STREAMS": "2"})
    with server.client() as client:
        job = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 60}}).json()
        path = f"/api/jobs/{job['id']}/events"
        opened = threading.Event()
        release = threading.Event()

        def hold() -> None:
            with httpx.Client(base_url=server.url, timeout=60) as own, \
                    own.stream("GET", path) as stream:
                assert stream.status_code == 200
                lines = stream.iter_lines()  # kept: a dropped iterator closes the stream
                assert next(lines).startswith(("id: ", "data: "))
                opened.set()
                release.wait(30)

        holders = [threading.Thread(target=hold) for _ in range(2)]
        try:
            for holder in holders:
                opened.clear()
                holder.start()
                assert opened.wait(20)
            third = client.get(path)
            assert third.status_code == 503
            assert "too many open event streams and waits (2)" in third.json()["detail"]
            assert third.headers["Retry-After"] == "1"
        finally:
            release.set()
            for holder in holders:
                holder.join(30)

        def reopens() -> bool:
            with client.stream("GET", path) as again:
                return again.status_code == 200

        # A slot frees once the server has read each holder's close, which is asynchronous.
        wait_for(reopens, 20, what="a slot freed by the closed streams")
        client.delete(f"/api/jobs/{job['id']}")


def test_a_burst_of_streams_gets_no_more_than_the_limit(make_server: MakeServer) -> None:
    # Each request passed the check before any had taken its slot (taken once its
    # stream began): 300 at once got 267 streams where 256 were allowed.
    server = make_server(env={"OFFLOAD_MAX_EVENT_STREAMS": "2"})
    with server.client() as client:
        job = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 30}}).json()
        request = (f"GET /api/jobs/{job['id']}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                   ).encode()
        burst = [socket.create_connection(("127.0.0.1", server.port), timeout=30)
                 for _ in range(8)]
        try:
            for conn in burst:
                conn.sendall(request)
            statuses = [conn.recv(12).decode(errors="replace")[9:12] for conn in burst]
        finally:
            for conn in burst:
                conn.close()
        client.delete(f"/api/jobs/{job['id']}")
    assert sorted(statuses) == ["200"] * 2 + ["503"] * 6, statuses
