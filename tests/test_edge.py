"""The edge, tried from outside: weak tokens, DNS rebinding, cross-site writes, /docs
offline, credentials in OPENAI_BASE_URL. Each through a real server."""

from __future__ import annotations

import base64
import json
import re
import socket
import sys
import time
from collections.abc import Callable, Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, urljoin

import httpx
import pytest

from jobs import protocol as p
from jobs.launch.ray import RayLauncher
from jobs.settings import Settings
from tests.conftest import (
    RunningSupervisor,
    free_port,
    start_process,
    stop_process,
    wait_for,
    wait_job,
)
from tests.fake_llm import FakeLLM
from tests.fake_ray import FakeRay
from tests.http_fake import JSONHandler, ScriptedServer
from tests.server import Server

MakeServer = Callable[..., Server]
TOKEN = "edge-token-7c1e93b04d2a"
SLEEP = {"kind": "sleep", "input": {"seconds": 30}}


# -- 1. a weak token refuses to start, however the app is served ----------------------

def _command(how: str, port: int) -> list[str]:
    if how == "supervisor":  # started by hand
        return ["-m", "jobs.supervisor"]
    if how == "api_entry":
        return ["api_entry.py", "--port", str(port)]
    if how == "uvicorn":
        return ["-m", "uvicorn", "api_entry:app", "--host", "127.0.0.1", "--port", str(port)]
    return ["-m", "gunicorn", "api_entry:app", "-k", "uvicorn.workers.UvicornWorker",
            "-w", "1", "-b", f"127.0.0.1:{port}"]


@pytest.mark.parametrize(("how", "token"), [
    ("api_entry", ""), ("uvicorn", ""), ("gunicorn", ""),  # an unset variable in a compose file
    ("uvicorn", "   "), ("uvicorn", "short-but-15-ch"),
    # Long enough, and guessed at once: a repeat, a run.
    ("uvicorn", "t" * 40), ("api_entry", "passwordpassword"), ("uvicorn", "0123456789abcdef"),
    ("uvicorn", "pässwörd-0123456789abc")])  # the CLI and browsers send it as Latin-1
def test_weak_token_refuses_to_start(how: str, token: str, tmp_path: Path,
                                     data_dir: Path) -> None:
    if how == "gunicorn" and sys.platform == "win32":
        pytest.skip("gunicorn does not run on Windows")
    port, log = free_port(), tmp_path / "server.log"
    proc = start_process(_command(how, port), env={
        "OFFLOAD_API_TOKEN": token, "OFFLOAD_DATA_DIR": str(data_dir)}, log=log)
    try:
        deadline = time.monotonic() + 90
        while proc.poll() is None:
            try:  # the attack: an empty token matched `Authorization: Bearer`
                answer = httpx.get(f"http://127.0.0.1:{port}/api/jobs", timeout=2,
                                   headers={b"Authorization": f"Bearer {token}".rstrip().encode()})
            except httpx.HTTPError:
                pass
            else:
                pytest.fail(f"started with a weak token; /api/jobs answered {answer.status_code}")
            assert time.monotonic() < deadline, "neither refused nor served within 90 s"
            time.sleep(0.2)
    finally:
        stop_process(proc)
    output = log.read_text(errors="replace")
    assert proc.returncode != 0
    said = ("OFFLOAD_API_TOKEN is too weak" if token.isascii()
            else "OFFLOAD_API_TOKEN holds a space, a control character or a letter beyond ASCII")
    assert said in output, output[-3000:]
    assert "secrets.token_urlsafe(32)" in output  # says how to make a good one
    assert "Traceback" not in output, output[-3000:]  # a setting to mend, not a crash
    if token.strip():
        assert token not in output  # and never shows the one it refused


# A variable that stops the start, its value, and what is said.
ONE_VARIABLE = {
    "kind": ("OFFLOAD_KINDS", "sleep=runners.train", "job kind 'sleep' is defined twice"),
    # A typo left `train` without its cap, silently.
    "caps": ("OFFLOAD_KIND_CAPS", "trian=1",
             "OFFLOAD_KIND_CAPS names 'trian', no job kind here; the kinds are chat"),
    # A typo left chats with one attempt, silently.
    "attempts": ("OFFLOAD_MAX_ATTEMPTS", "chats=3",
                 "OFFLOAD_MAX_ATTEMPTS names 'chats', no job kind here; the kinds are chat"),
    # The last of the two won, silently.
    "twice": ("OFFLOAD_KIND_CAPS", "chat=1,chat=3", "a setting is wrong (set in the "
              "environment):\n  OFFLOAD_KIND_CAPS: OFFLOAD_KIND_CAPS "
              "names 'chat' twice; keep one of them"),
    # Read as '' before, it let every Host that reads as '' in.
    "hosts": ("OFFLOAD_ALLOWED_HOSTS", "offload.test, http://offload.test",
              "a setting is wrong"),
    # Each job of it was lost at its start.
    "kinds": ("OFFLOAD_KINDS", "x=nonexistent.module",
              "OFFLOAD_KINDS holds 'x=nonexistent.module', but no module 'nonexistent'"),
    # It started, and logged the model's probe failing with a traceback every 5 s.
    "llm": ("OPENAI_BASE_URL", "notaurl", "a setting is wrong (set in the environment):"
            "\n  OPENAI_BASE_URL: not an http:// or https:// address"),
    # It started, and every chat failed (sent 40000 to its server, or refused by its runner).
    "tokens": ("OFFLOAD_LLM_MAX_TOKENS", "40000", "a setting is wrong (set in the environment):"
               "\n  OFFLOAD_LLM_MAX_TOKENS: Input should be less than or equal to "
               "32768"),
    # It started, and every job was lost at its runner's start.
    "endless": ("OFFLOAD_JOB_TIMEOUT_S", "inf",
                "a setting is wrong (set in the environment):\n  "
                "OFFLOAD_JOB_TIMEOUT_S")}


@pytest.mark.parametrize(("how", "problem"), [
    ("uvicorn", "open"), ("api_entry", "open"), ("uvicorn", "kind"), ("api_entry", "schedule"),
    ("uvicorn", "hosts"), ("uvicorn", "cors"), ("api_entry", "cors"), ("uvicorn", "ages"),
    ("uvicorn", "caps"), ("uvicorn", "attempts"), ("api_entry", "twice"),
    ("api_entry", "port"), ("supervisor", "hosts"),
    ("api_entry", "endless"), ("api_entry", "tokens"), ("supervisor", "kinds"),
    ("api_entry", "file"),
    ("supervisor", "file"), ("api_entry", "llm"), ("supervisor", "llm"),
    ("api_entry", "elsewhere"), ("supervisor", "elsewhere")])
def test_a_start_that_cannot_serve_says_what_to_mend(how: str, problem: str, tmp_path: Path,
                                                     data_dir: Path) -> None:
    """Settings that stop the start are said as such, not as a traceback."""
    bad_schedules = tmp_path / "schedules.toml"
    bad_schedules.write_text('[beat]\nkind = "sleep"\nevery = "0s"\n')
    port = free_port()
    command, env = _command(how, port), {"OFFLOAD_DATA_DIR": str(data_dir)}
    if problem in ONE_VARIABLE:
        variable, value, said = ONE_VARIABLE[problem]
        env[variable] = value
    elif problem == "open":  # every address, and no token: anyone on the network runs jobs
        if how == "api_entry":
            command += ["--host", "0.0.0.0"]
        else:
            env["OFFLOAD_HOST"] = "0.0.0.0"
        said = "refusing to serve on 0.0.0.0 without OFFLOAD_API_TOKEN"
    elif problem == "cors":  # without a token, every site's pages could read the chats
        # In capitals `null` passed, and matched a sandboxed frame's `Origin: null`.
        env["OFFLOAD_CORS_ORIGINS"] = "https://app.example, *" if how == "uvicorn" else "NULL"
        said = (f"refusing OFFLOAD_CORS_ORIGINS={'*' if how == 'uvicorn' else 'null'} without "
                "OFFLOAD_API_TOKEN")
    elif problem == "ages":  # its next run was no date: /api/schedules answered 500
        bad_schedules.write_text('[beat]\nkind = "sleep"\nevery = 1e300\n')
        env["OFFLOAD_SCHEDULES_FILE"] = str(bad_schedules)
        said = f"{bad_schedules}, schedule [beat]: `every` must be at most \"36500d\""
    elif problem == "elsewhere":  # it said "set in the environment or in .env"
        settings = tmp_path / "offload.env"
        settings.write_text("OFFLOAD_LLM_MAX_TOKENS=40000\n")
        env["OFFLOAD_ENV_FILE"] = str(settings)
        said = (f"a setting is wrong (set in the environment or in {settings}):\n"
                "  OFFLOAD_LLM_MAX_TOKENS: Input should be less than or equal to 32768")
    elif problem == "port":  # uvicorn's traceback, exit 1
        command += ["--port", "99999"]
        said = "a port is a number from 0 to 65535, not '99999'"
    elif problem == "file":  # it served, and every request was a 500
        env["OFFLOAD_DATA_DIR"] = str(bad_schedules / "var")
        said = (f"a setting is wrong (set in the environment):\n  OFFLOAD_DATA_DIR: "
                f"{bad_schedules} is a file, not a folder: set OFFLOAD_DATA_DIR to "
                "a folder")
    else:
        env["OFFLOAD_SCHEDULES_FILE"] = str(bad_schedules)
        said = f"{bad_schedules}, schedule [beat]: `every` must be at least 1 s"
    log = tmp_path / "server.log"
    proc = start_process(command, env=env, log=log)
    try:
        proc.wait(90)
    finally:
        stop_process(proc)
    output = log.read_text(errors="replace")
    if problem == "port":  # an argument: a usage error, as argparse says them
        assert proc.returncode == 2 and said in output, output[-3000:]
        return
    assert proc.returncode == 3, output[-3000:]
    who = "the supervisor" if how == "supervisor" else "Offload"
    assert f"{who} cannot start: {said}" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]


def test_token_is_trimmed_and_an_empty_bearer_refused(make_server: MakeServer) -> None:
    server = make_server(env={"OFFLOAD_API_TOKEN": f"  {TOKEN}\n"})  # as read from a file
    with server.client() as client:
        for value in ("Bearer", "bearer", "Bearer \"\""):  # curl -H "Authorization: Bearer "
            assert client.get("/api/jobs", headers={"Authorization": value}).status_code == 401
        good = client.get("/api/jobs", headers={"Authorization": f"Bearer {TOKEN}"})
        assert good.status_code == 200


# -- 2. DNS rebinding: without a token only loopback names are answered -----------------

PATHS = ["/", "/app.js", "/docs", "/openapi.json", "/api/jobs", "/api/health"]


def test_foreign_host_is_refused_without_a_token(make_server: MakeServer) -> None:
    server = make_server(env={"OFFLOAD_ALLOWED_HOSTS": "offload.test, Other.Test:9, 2001:db8::5"})
    port = server.port
    with server.client() as client:
        for path in PATHS:
            for host in (f"attacker.example:{port}", "attacker.example",
                         f"localhost.attacker.example:{port}", f"127.0.0.1.nip.io:{port}",
                         f"offload.test.attacker.example:{port}",
                         # Read loosely, these named loopback (no browser sends them).
                         "[::1].attacker.example", "[::1]@attacker.example",
                         "127.0.0.1%attacker.example", "localhost:attacker", "[::1",
                         f"[::1:{port}"):
                answer = client.get(path, headers={"Host": host})
                assert answer.status_code == 421, (path, host, answer.status_code)
                detail = answer.json()["detail"]
                # What is no name and port cannot be allowed: the start would refuse it.
                no_name = host.startswith("[::1") or host == "localhost:attacker"
                assert (("is no host name and port" in detail, "OFFLOAD_ALLOWED_HOSTS" in detail)
                        == (no_name, not no_name)), (host, detail)
            for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LocalHost",
                         f"offload.test:{port}", "OFFLOAD.test", "other.test:8001",
                         f"[2001:db8::5]:{port}"):
                answer = client.get(path, headers={"Host": host})
                assert answer.status_code == 200, (path, host, answer.status_code)
        refused = client.post("/api/jobs", json=SLEEP, headers={"Host": "attacker.example"})
        assert refused.status_code == 421
        assert client.get("/api/jobs").json()["jobs"] == []  # nothing was created
        # The script that removes a service worker left here goes only where a page does.
        worker = {"Service-Worker": "script"}
        refused = client.get("/sw.js", headers={**worker, "Host": "attacker.example"})
        assert refused.status_code == 421
        remover = client.get("/sw.js", headers=worker)
        assert remover.status_code == 200
        assert remover.headers["content-type"].startswith("text/javascript")
        assert "unregister()" in remover.text


def test_a_request_without_host_is_told_to_send_one(make_server: MakeServer) -> None:
    """HTTP/1.0 may leave `Host` out: it was told to add '' to OFFLOAD_ALLOWED_HOSTS."""
    server = make_server()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
        conn.sendall(b"GET /api/health HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].endswith(b" 421 Misdirected Request"), answer[:300]
    detail = json.loads(body)["detail"]
    assert "send a Host header" in detail and "OFFLOAD_ALLOWED_HOSTS" not in detail, detail


def test_with_a_token_any_host_meets_the_token(make_server: MakeServer) -> None:
    server = make_server(env={"OFFLOAD_API_TOKEN": TOKEN})
    rebound = {"Host": f"attacker.example:{server.port}"}
    with server.client() as client:
        assert client.get("/", headers=rebound).status_code == 200
        assert client.get("/api/jobs", headers=rebound).status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert client.get("/api/jobs", headers={**rebound, **auth}).status_code == 200
        # The Origin check holds with a token too: a page elsewhere that has the token
        # (pasted into it, say) still cannot make this server act.
        foreign = {**auth, "Origin": "http://attacker.example"}
        assert client.post("/api/jobs", json=SLEEP, headers=foreign).status_code == 403
        assert client.get("/api/jobs", headers=auth).json()["jobs"] == []


# -- 2. a state-changing request from another site's page gets 403 ----------------------

def test_foreign_origin_cannot_change_anything(make_server: MakeServer) -> None:
    server = make_server(env={"OFFLOAD_CORS_ORIGINS": "http://dash.example"})
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    with server.client() as client:
        own = {"Origin": server.url}
        job = client.post("/api/jobs", json=SLEEP, headers=own)
        assert job.status_code == 202
        job_path = f"/api/jobs/{job.json()['id']}"
        for origin in ("http://attacker.example", "null", f"https://127.0.0.1:{server.port}",
                       f"http://127.0.0.1:{server.port + 1}", "http://dash.example.attacker"):
            foreign = {"Origin": origin}
            for method, path, body in (("POST", "/api/jobs", SLEEP),
                                       ("POST", "/api/ai_chat_async", chat),
                                       ("DELETE", job_path, None)):
                answer = client.request(method, path, json=body, headers=foreign)
                assert answer.status_code == 403, (origin, method, path, answer.status_code)
                assert "OFFLOAD_CORS_ORIGINS" in answer.json()["detail"]
            assert client.get("/api/jobs", headers=foreign).status_code == 403  # nor read
            # A foreign Origin first and the server's own last: the guard read the last,
            # the framework the first.
            twice = client.post("/api/jobs", json=SLEEP,
                                headers=[("Origin", origin), ("Origin", server.url)])
            assert twice.status_code == 400, (origin, twice.text)
        assert len(client.get("/api/jobs").json()["jobs"]) == 1
        assert client.get(job_path).json()["state"] not in p.FINAL_STATES
        listed = client.post("/api/jobs", json=SLEEP, headers={"Origin": "http://dash.example"})
        assert listed.status_code == 202
        for done in (job_path, f"/api/jobs/{listed.json()['id']}"):
            assert client.delete(done, headers=own).status_code == 200
        # Without Origin (curl, scripts, the CLI) nothing changes.
        assert client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0.1}}
                           ).status_code == 202


def test_a_listed_site_may_call_every_route(make_server: MakeServer) -> None:
    # Its pages could pause and cancel, but never set the cap: a PUT failed the preflight.
    server = make_server(env={"OFFLOAD_CORS_ORIGINS": "http://dash.example"})
    with server.client() as client:
        paths = client.get("/openapi.json").json()["paths"]
        methods = sorted({method.upper() for each in paths.values() for method in each})
        assert "PUT" in methods, methods
        for method in methods:
            for origin, allowed in (("http://dash.example", True),
                                    ("http://attacker.example", False)):
                preflight = client.options("/api/queue/cap", headers={
                    "Origin": origin, "Access-Control-Request-Method": method,
                    "Access-Control-Request-Headers": "content-type"})
                assert (preflight.status_code == 200) is allowed, (method, origin, preflight)
        capped = client.put("/api/queue/cap", json={"max_concurrent": 3},
                            headers={"Origin": "http://dash.example"})
        assert capped.status_code == 200, capped.text
        assert capped.headers["access-control-allow-origin"] == "http://dash.example"
        assert capped.json()["max_concurrent"] == 3


# -- 12. /docs loads only local assets ----------------------------------------------------

EXTERNAL = re.compile(r"""https?://[^\s"'<>()\\]+""")
CSS_LOADS = re.compile(r"""(?:url\(\s*['"]?|@import\s+['"]?)(https?://[^'")\s]+)""")


def test_docs_page_references_nothing_outside(make_server: MakeServer) -> None:
    server = make_server()
    with server.client() as client:
        answer = client.get("/docs")
        assert answer.status_code == 200
        outside = [u for u in EXTERNAL.findall(answer.text) if not u.startswith(server.url)]
        assert not outside, outside
        assets = re.findall(r"""(?:src|href)=["']([^"']+)""", answer.text)
        assert any(a.endswith(".js") for a in assets), assets
        for asset in assets:
            loaded = client.get(urljoin(f"{server.url}/docs", asset))
            assert loaded.status_code == 200, asset
            if asset.endswith(".css"):
                assert not CSS_LOADS.findall(loaded.text), (asset, CSS_LOADS.findall(loaded.text))
        # ReDoc shows a logo from its CDN whatever its options: not served.
        assert client.get("/redoc").status_code == 404


@pytest.fixture
def rebinding_browser() -> Iterator[Any]:
    """Chromium whose resolver sends offload.test and attacker.example to 127.0.0.1, as
    DNS does for a rebound name."""
    from tests.test_dashboard import CHROMIUM_FLAGS, chromium_path

    path = chromium_path()
    if path is None:
        pytest.skip("no system Chromium here (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    rules = "MAP offload.test 127.0.0.1, MAP attacker.example 127.0.0.1"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path, headless=True,
                                     args=[*CHROMIUM_FLAGS, f"--host-resolver-rules={rules}"])
        yield browser
        browser.close()


@pytest.mark.browser
def test_docs_render_from_local_files_in_a_browser(rebinding_browser: Any,
                                                   make_server: MakeServer) -> None:
    # A name that is not loopback, as users reach a server (Swagger UI's validator badge,
    # for one, shows only for those).
    server = make_server(env={"OFFLOAD_ALLOWED_HOSTS": "offload.test"})
    base = f"http://offload.test:{server.port}"
    page = rebinding_browser.new_page()
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(f"{base}/docs")
    try:  # the operations listed: the page's script ran and read the schema
        page.wait_for_function("document.body.innerText.includes('/api/jobs/{job_id}')",
                               timeout=30_000)
        page.wait_for_load_state("networkidle", timeout=30_000)
        rendered = True
    except Exception:  # reported below, after what was requested
        rendered = False
    outside = [u for u in requested if not u.startswith((base, "data:", "blob:"))]
    assert not outside, outside
    assert rendered, "Swagger UI did not list the operations"
    # The rebinding attack as a browser makes it: the page is refused.
    refused = page.goto(f"http://attacker.example:{server.port}/")
    assert refused is not None and refused.status == 421
    page.close()


# -- 12. no page shows in another site's frame (clickjacking) -----------------------------

class _FramingPage(JSONHandler):
    """Another site's page showing the dashboard and /docs in frames: an attack makes
    them invisible over its own bait, so that a click lands on their buttons."""

    def do_GET(self) -> None:
        target = self.server.fake.target  # type: ignore[attr-defined]
        self._html("".join(f'<iframe src="{target}{path}"></iframe>'
                           for path in ("/", "/docs")))


@pytest.mark.browser
def test_another_site_cannot_frame_a_page(rebinding_browser: Any,
                                          make_server: MakeServer) -> None:
    with ScriptedServer(ThreadingHTTPServer(("127.0.0.1", 0), _FramingPage)) as site:
        listed = f"http://offload.test:{site.port}"  # a site trusted to change things
        server = make_server(env={"OFFLOAD_CORS_ORIGINS": listed})
        site.target = server.url  # type: ignore[attr-defined]
        page = rebinding_browser.new_page()

        def shown(framing_page: str) -> list[str]:
            page.goto(framing_page)  # loaded: its frames too
            frames = page.frames[1:]
            assert len(frames) == 2
            return [frame.url for frame in frames
                    if frame.query_selector("#jobs-table, #swagger-ui") is not None]

        assert not shown(f"http://attacker.example:{site.port}/")
        assert shown(f"{listed}/") == [f"{server.url}/", f"{server.url}/docs"]
        page.close()


def test_no_answer_is_sniffed_into_a_page_or_a_script(make_server: MakeServer) -> None:
    # A job's log is text/plain of whatever its runner printed (`<script>...`): a browser
    # that sniffs could take it, or a job's JSON, for a page or a script.
    server = make_server()
    with server.client() as client:
        job_id = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0}}
                             ).json()["id"]
        wait_for(lambda: client.get(f"/api/jobs/{job_id}").json()["state"] == "completed",
                 60, 0.1, "the job")
        for path in ("/", "/docs", "/openapi.json", "/api/health", f"/api/jobs/{job_id}",
                     f"/api/jobs/{job_id}/log", "/api/jobs/0/log", "/metrics"):
            answer = client.get(path)
            assert answer.headers.get("x-content-type-options") == "nosniff", (path, answer)
        refused = client.get("/api/health", headers={"Host": "rebound.example"})
        assert refused.status_code == 421
        assert refused.headers.get("x-content-type-options") == "nosniff"


# -- 13. credentials in OPENAI_BASE_URL: used to connect, never shown ---------------------

USER, PASSWORD = "offload", "pw-sentinel-5f1c9e"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


def _with_credentials(url: str) -> str:
    return url.replace("//", f"//{USER}:{PASSWORD}@", 1)


def _chat(client: httpx.Client) -> dict[str, Any]:
    job_id = client.post("/api/jobs", json={"kind": "chat", "input": {
        "messages": [{"role": "user", "content": "hi"}], "session_id": "s1"}}).json()["id"]

    def final() -> dict[str, Any] | None:
        job: dict[str, Any] = client.get(f"/api/jobs/{job_id}").json()
        return job if job["state"] in p.FINAL_STATES else None

    return wait_for(final, 60, 0.1, "the chat")


def _llm_ready(client: httpx.Client) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        llm: dict[str, Any] = client.get("/api/health").json()["llm"]
        return llm if llm["ready"] else None

    return wait_for(ready, 30, 0.2, "the LLM probe to succeed")


def _everything_shown(server: Server, client: httpx.Client, job_id: str) -> list[str]:
    paths = ["/api/health", "/api/history", "/api/jobs", f"/api/jobs/{job_id}",
             f"/api/jobs/{job_id}/log", f"/api/jobs/{job_id}/events",
             f"/api/ai_chat_result/{job_id}", "/api/sessions/s1"]
    files = [f for f in server.data_dir.rglob("*") if f.is_file()] + [server.log]
    return [client.get(path).text for path in paths] + [
        f.read_text(errors="replace") for f in files]


def test_base_url_credentials_are_used_and_never_shown(make_server: MakeServer) -> None:
    with FakeLLM(pieces=["All ", "good."], auth=BASIC) as llm:
        public = llm.base_url
        server = make_server(env={"OPENAI_BASE_URL": _with_credentials(public)})
        with server.client() as client:
            job = _chat(client)
            assert job["state"] == "completed", job["error"]  # the runner sent them
            assert llm.requests[0]["headers"]["Authorization"] == BASIC
            assert _llm_ready(client)["base_url"] == public  # the probe used them too
            shown = _everything_shown(server, client, job["id"])
    assert len(shown) > 10
    assert not [text[:300] for text in shown if PASSWORD in text]


def test_base_url_credentials_stay_out_of_errors(make_server: MakeServer) -> None:
    # A server that fails, and echoes the password back in its error.
    echo = json.dumps({"error": {"message": f"no luck for {USER}:{PASSWORD} ({BASIC})"}})
    with FakeLLM(status=400, error_body=echo, auth=BASIC) as llm:
        server = make_server(env={"OPENAI_BASE_URL": _with_credentials(llm.base_url)})
        with server.client() as client:
            job = _chat(client)
            assert job["state"] == "failed"
            assert f"127.0.0.1:{llm.port}" in job["error"]["message"]  # says where
            assert "[redacted]" in job["error"]["message"]
            shown = _everything_shown(server, client, job["id"])
    assert f"asking the model at {llm.base_url}" in "".join(shown)  # the progress, stripped
    assert not [text[:300] for text in shown if PASSWORD in text or BASIC[6:] in text]


KEY = "sk-proj/canary-4b7e91d2"


def _escaped(text: str) -> str:
    return "".join(f"\\u{ord(c):04x}" for c in text)


_QUOTED, _BASE64 = quote(KEY, safe=""), base64.b64encode(KEY.encode()).decode()
_IN_BASE64 = base64.b64encode(f"Bearer {KEY}".encode()).decode()  # a header encoded whole


@pytest.mark.parametrize("echo", [
    # After the first piece, an error event naming the header it was sent.
    {"stream_error": json.dumps({"error": {"message": f"rejected Bearer {KEY} for: hi"}})},
    # JSON-escaped: "/" as "\/" (PHP's default), or every character as \uXXXX.
    {"status": 400, "error_body": '{"error": {"message": "bad key Bearer '
                                  + KEY.replace("/", "\\/") + '"}}'},
    {"status": 400, "error_body": '{"error": {"message": "bad key ' + _escaped(KEY) + '"}}'},
    # Cut off partway into the key (a proxy that shortens bodies).
    {"status": 400, "error_body": json.dumps({"error": {"message": "bad key " + KEY[:14]}})},
    # A body cut short, so not JSON: shown as it came, the key escaped in it.
    {"status": 400, "error_body": '{"error": {"message": "bad key Bearer '
                                  + KEY.replace("/", "\\/") + '", "param": nul'},
    # Percent-encoded, or in base64, as a server quoting a URL or a header may.
    {"status": 400, "error_body": json.dumps({"error": {"message": f"bad key {_QUOTED}"}})},
    {"status": 400, "error_body": json.dumps({"error": {"message": f"bad key {_BASE64}"}})},
    {"status": 400, "error_body": json.dumps({"error": {"message": f"bad {_IN_BASE64}"}})},
    {"status": 400, "error_body": json.dumps({"error": {"message": f"bad {_QUOTED.lower()}"}})},
], ids=["mid-reply", "slash-escaped", "unicode-escaped", "cut-off", "escaped-not-json",
        "percent-encoded", "base64", "within-base64", "percent-encoded-lowercase"])
def test_a_key_the_server_sends_back_is_never_shown(make_server: MakeServer,
                                                     echo: dict[str, Any]) -> None:
    with FakeLLM(pieces=["one ", "two"], auth=f"Bearer {KEY}", fail_times=None, **echo) as llm:
        server = make_server(env={"OPENAI_BASE_URL": llm.base_url, "OPENAI_API_KEY": KEY})
        with server.client() as client:
            job = _chat(client)
            assert job["state"] == "failed", job
            assert "[redacted]" in job["error"]["message"], job["error"]
            shown = _everything_shown(server, client, job["id"])
    written = (KEY, KEY.replace("/", "\\/"), _escaped(KEY), _QUOTED, _QUOTED.lower(), _BASE64,
               _IN_BASE64[12:])
    assert f"[redacted]{_BASE64[-2:]}" not in job["error"]["message"], job["error"]  # its end
    assert not [text[:300] for text in shown if any(form[:12] in text for form in written)]


def test_what_a_failed_chat_said_stays_out_of_the_supervisors_log(
        make_server: MakeServer) -> None:
    # The log is kept by size, not with the jobs: a user's words deleted with their chat
    # lived on there, quoted by the server's error and logged with each attempt.
    words = "my-private-diagnosis-7d1f"
    echo = json.dumps({"error": {"message": f"internal error processing prompt: {words}"}})
    with FakeLLM(status=500, error_body=echo) as llm:
        server = make_server(env={"OPENAI_BASE_URL": llm.base_url,
                                  "OFFLOAD_MAX_ATTEMPTS": "chat=2", "OFFLOAD_RETRY_BASE_S": "0"})
        with server.client() as client:
            job_id = client.post("/api/jobs", json={"kind": "chat", "input": {
                "messages": [{"role": "user", "content": words}]}}).json()["id"]
            job = wait_job(client, job_id, timeout=120)
    assert job["state"] == "failed" and job["attempt"] == 2, job
    assert words in job["error"]["message"]  # the user's own job says what happened
    log = (server.data_dir / "supervisor.log").read_text(errors="replace")
    assert f"job {job_id}: attempt 1 failed (provider)" in log
    assert words not in log


def test_base_url_credentials_never_reach_ray(
        make_supervisor: Callable[..., RunningSupervisor]) -> None:
    with FakeRay() as fake:
        settings = Settings(OPENAI_BASE_URL=f"https://{USER}:{PASSWORD}@llm.example/v1",
                            OFFLOAD_RAY_ADDRESS=fake.address, OFFLOAD_LAUNCHER="ray")
        sup = make_supervisor(launcher=RayLauncher.from_settings(settings))
        sup.submit(seconds=1)
        sent = wait_for(lambda: next((body for method, _, body in list(fake.requests)
                                      if method == "POST"), None), what="the job submitted")
        assert "OPENAI_BASE_URL" not in sent["runtime_env"]["env_vars"]
        assert PASSWORD not in json.dumps(fake.requests)


def test_unencoded_credentials_refuse_to_start(tmp_path: Path, data_dir: Path) -> None:
    """A '/' in a password hides the credentials from the URL parser: they would be shown."""
    secret = "pa/ss-sentinel"
    log = tmp_path / "server.log"
    proc = start_process(_command("api_entry", free_port()), env={
        "OPENAI_BASE_URL": f"https://user:{secret}@llm.example/v1",
        "OFFLOAD_DATA_DIR": str(data_dir)}, log=log)
    try:
        proc.wait(90)
    finally:
        stop_process(proc)
    output = log.read_text(errors="replace")
    assert proc.returncode != 0
    assert "percent-encode" in output and "%2F" in output, output[-3000:]
    assert secret not in output
