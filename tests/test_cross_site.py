"""Another site's page, as a browser sends its requests: it holds none of the server's
waits or event streams, calls no API and changes nothing; the dashboard, a link followed
and programs (curl, the CLI) go on as before. Each through a real server but the
WebSocket handshake, which the server installed here cannot take (no WebSocket library)."""

from __future__ import annotations

import importlib
import uuid
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from typing import Any

import pytest
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

from tests.http_fake import JSONHandler, ScriptedServer
from tests.server import Server
from tests.test_edge import rebinding_browser  # noqa: F401  (a fixture)

MakeServer = Callable[..., Server]
SLEEP = {"kind": "sleep", "input": {"seconds": 600}}  # running all along
TOKEN = "cross-site-token-4f9a2c71"


class _AttackPage(JSONHandler):
    """Another site's page that asks the server for long polls and an event stream with
    tags that need no token and no answer read, and in a frame; and links to the API."""

    def do_GET(self) -> None:
        job = self.server.fake.job  # type: ignore[attr-defined]
        count = ("onload='window.settled = (window.settled || 0) + 1' "
                 "onerror='window.settled = (window.settled || 0) + 1'")
        tags = [f"<img {count} src='{job}?wait_s=60&n={n}'>" for n in range(3)]
        tags += [f"<script {count} src='{job}/events'></script>",
                 f"<iframe {count} src='{job}?wait_s=60&n=9'></iframe>",
                 f"<a id='link' href='{job}'>the job</a>"]
        self._html("".join(tags))


@pytest.mark.browser
def test_another_sites_page_holds_none_of_the_servers_slots(
        rebinding_browser: Any, make_server: MakeServer) -> None:  # noqa: F811
    server = make_server(env={"OFFLOAD_MAX_EVENT_STREAMS": "2"})
    with server.client() as client, \
            ScriptedServer(ThreadingHTTPServer(("127.0.0.1", 0), _AttackPage)) as site:
        job_path = f"/api/jobs/{client.post('/api/jobs', json=SLEEP).json()['id']}"
        site.job = f"{server.url}{job_path}"  # type: ignore[attr-defined]
        page = rebinding_browser.new_page()
        # Another site, and another port of the same host (a same-site page: any program
        # of this machine serving pages on 127.0.0.1).
        for attacker in (f"http://attacker.example:{site.port}/", f"http://127.0.0.1:{site.port}/"):
            page.goto(attacker, wait_until="commit")  # its tags may hang
            try:  # each tag answered at once (held, they are answered in 60 s)
                page.wait_for_function("window.settled === 5", timeout=20_000)
            except Exception:  # said by the owner's requests below
                pass
            # The owner's own wait and event stream find their slots.
            waited = client.get(job_path, params={"wait_s": 0.2})
            assert waited.status_code == 200, (attacker, waited.text)
            with client.stream("GET", f"{job_path}/events") as stream:
                assert stream.status_code == 200, attacker
            # A link on that page, followed by its user, still shows the job.
            with page.expect_navigation() as followed:
                page.click("#link")
            assert followed.value.status == 200, attacker
            assert job_path.rsplit("/", 1)[1] in page.content()
        page.close()
        client.delete(job_path)


def test_what_a_browser_sends_from_another_site_is_refused(make_server: MakeServer) -> None:
    server = make_server(env={"OFFLOAD_CORS_ORIGINS": "http://dash.example"})
    with server.client() as client:
        job_path = f"/api/jobs/{client.post('/api/jobs', json=SLEEP).json()['id']}"
        wait = f"{job_path}?wait_s=0.1"

        def fetch(site: str, mode: str, dest: str, **more: str) -> dict[str, str]:
            return {"Sec-Fetch-Site": site, "Sec-Fetch-Mode": mode, "Sec-Fetch-Dest": dest,
                    **more}

        refused = [  # path, headers
            (wait, fetch("cross-site", "no-cors", "image")),  # <img>
            (f"{job_path}/events", fetch("same-site", "no-cors", "script")),  # <script>
            (wait, fetch("cross-site", "navigate", "iframe")),  # in a frame, unseen
            (wait, fetch("cross-site", "navigate", "document", **{"Sec-Purpose": "prefetch"})),
            ("/metrics", fetch("cross-site", "no-cors", "image")),
            ("/app.js", fetch("cross-site", "no-cors", "script")),
            ("/openapi.json", fetch("same-site", "cors", "empty",
                                    Origin=f"http://localhost:{server.port + 1}")),
            # fetch() from pages of other origins (browsers without Fetch Metadata too):
            # a sandboxed frame or a file:// page says `null`; an empty one is no better.
            (wait, {"Origin": "http://attacker.example"}),
            (wait, {"Origin": "null"}),
            (wait, {"Origin": ""}),
        ]
        for path, headers in refused:
            answer = client.get(path, headers=headers)
            assert answer.status_code == 403, (path, headers, answer.status_code)
            assert "OFFLOAD_CORS_ORIGINS" in answer.json()["detail"], answer.text
        for origin in ("null", ""):  # a form or fetch() of such a page, text/plain
            posted = client.post("/api/jobs", content=b'{"kind": "sleep", "input": {}}',
                                 headers={"Origin": origin, "Content-Type": "text/plain"})
            assert posted.status_code == 403, (origin, posted.text)
        allowed = [
            (wait, {}),  # curl, the CLI, Python
            (wait, fetch("same-origin", "cors", "empty")),  # the dashboard's own calls
            (wait, fetch("none", "navigate", "document")),  # typed in the address bar
            (wait, fetch("cross-site", "navigate", "document", **{"Sec-Fetch-User": "?1"})),
            ("/", fetch("cross-site", "navigate", "document")),  # a link to the dashboard
            (wait, fetch("cross-site", "cors", "empty", Origin="http://dash.example")),
            (wait, {"Origin": server.url}),
        ]
        for path, headers in allowed:
            answer = client.get(path, headers=headers)
            assert answer.status_code == 200, (path, headers, answer.status_code)
        assert len(client.get("/api/jobs").json()["jobs"]) == 1  # nothing was added
        client.delete(job_path)


def test_a_websocket_handshake_meets_the_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    # The app as api_entry builds it; uvicorn with a WebSocket library (uvicorn[standard])
    # hands it such a handshake. No route takes one: it was routed past every check.
    monkeypatch.setenv("OFFLOAD_API_TOKEN", TOKEN)
    app = importlib.import_module("api_entry").create_app()
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    client = TestClient(app, base_url="http://127.0.0.1:8001")
    for headers, status, said in (
            ({}, 401, "missing or wrong API token"),
            ({**bearer, "Origin": "http://attacker.example"}, 403, "OFFLOAD_CORS_ORIGINS"),
            ({**bearer, "Origin": "null"}, 403, "OFFLOAD_CORS_ORIGINS")):
        with pytest.raises(WebSocketDenialResponse) as refused, \
                client.websocket_connect("/api/jobs", headers=headers):
            pass
        assert refused.value.status_code == status, headers
        assert said in refused.value.json()["detail"]
    # Its own page's handshake passes, to be closed by routing as before.
    with pytest.raises(WebSocketDisconnect), client.websocket_connect(
            "/api/jobs", headers={**bearer, "Origin": "http://127.0.0.1:8001"}) as socket:
        socket.receive_text()


def test_a_server_open_to_every_site_with_its_token_answers_them(make_server: MakeServer) -> None:
    """`OFFLOAD_CORS_ORIGINS=*` (allowed with a token) let no other site call the API once
    calls were judged by their Origin: no Origin equals `*`, so its preflight and its
    fetch() with the token were 403s."""
    token = uuid.uuid4().hex
    server = make_server(env={"OFFLOAD_API_TOKEN": token, "OFFLOAD_CORS_ORIGINS": "*"})
    page = {"Origin": "https://other.example", "Sec-Fetch-Site": "cross-site",
            "Sec-Fetch-Mode": "cors", "Sec-Fetch-Dest": "empty"}
    with server.client() as client:
        preflight = client.options("/api/jobs", headers={
            **page, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] in ("*", page["Origin"])
        posted = client.post("/api/jobs", json=SLEEP,
                             headers={**page, "Authorization": f"Bearer {token}"})
        assert posted.status_code == 202, posted.text
        listed = client.get("/api/jobs", headers={**page, "Authorization": f"Bearer {token}"})
        assert listed.status_code == 200 and len(listed.json()["jobs"]) == 1, listed.text
        # The token still protects: without it, another site's call is refused.
        assert client.get("/api/jobs", headers=page).status_code == 401
