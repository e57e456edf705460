"""A scripted Ray Jobs REST API, for what a real head will not do on demand: answer
errors, garbage, a duplicate, or forget a job as a restarted head does."""

from __future__ import annotations

import json
import threading
import time
from http.server import ThreadingHTTPServer
from typing import Any

from tests.http_fake import JSONHandler, ScriptedServer


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeRay


class _Handler(JSONHandler):
    server: _Server

    def _handle(self, method: str) -> None:
        fake = self.server.fake
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length)) if length else None
        with fake.lock:
            fake.requests.append((method, self.path, body))
        if method == "POST" and self.path == "/api/jobs/":
            time.sleep(fake.submit_delay_s)  # a slow cluster: the submission in flight
        with fake.lock:
            scripted = fake.scripted.get((method, self.path))
            if scripted is not None:
                self._json(*scripted)
                return
            self._json(*fake.route(method, self.path, body))

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")


class FakeRay(ScriptedServer):
    """Jobs live in `jobs` (submission id -> details) and `logs`; tests change both."""

    def __init__(self, port: int = 0) -> None:
        """`port`: a head back at the address of one that went away."""
        self.jobs: dict[str, dict[str, Any]] = {}
        self.logs: dict[str, str] = {}
        self.requests: list[tuple[str, str, Any]] = []
        self.scripted: dict[tuple[str, str], tuple[int, Any]] = {}  # (method, path) -> answer
        self.lock = threading.Lock()
        self.stopped: set[str] = set()  # stop asked for
        self.stop_ends_job = True  # False: the test says when the job has stopped
        self.submit_delay_s = 0.0
        super().__init__(_Server(("127.0.0.1", port), _Handler))
        self.address = f"http://127.0.0.1:{self.port}"

    def route(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        parts = path.strip("/").split("/")  # api, jobs, [sid, [logs|stop]]
        if method == "POST" and parts == ["api", "jobs"]:
            sid = body["submission_id"]
            if sid in self.jobs:
                return 400, ("Traceback (most recent call last):\n  ...\nValueError: Job "
                             f"with submission_id {sid} already exists. Please use a "
                             "different submission_id.")
            self.jobs[sid] = {"submission_id": sid, "status": "PENDING", "message": "",
                              "entrypoint": body["entrypoint"], "start_time": 0,
                              "runtime_env": body["runtime_env"],
                              "metadata": body.get("metadata") or {}}
            return 200, {"submission_id": sid, "job_id": None}
        if method == "GET" and parts == ["api", "jobs"]:
            return 200, list(self.jobs.values())
        sid = parts[2] if len(parts) > 2 else ""
        if sid not in self.jobs:
            return 404, f"Job {sid} does not exist"
        tail = parts[3:]
        if method == "GET" and not tail:
            return 200, self.jobs[sid]
        if method == "GET" and tail == ["logs"]:
            return 200, {"logs": self.logs.get(sid, "")}
        if method == "POST" and tail == ["stop"]:
            self.stopped.add(sid)
            if self.stop_ends_job:
                self.jobs[sid]["status"] = "STOPPED"
            return 200, {"stopped": True}
        if method == "DELETE" and not tail:
            if self.jobs[sid]["status"] in ("PENDING", "RUNNING"):  # as Ray refuses it
                return 400, (f"Traceback (most recent call last):\n  ...\nRuntimeError: Job "
                             f"{sid} is not in a terminal state")
            del self.jobs[sid]
            return 200, {"deleted": True}
        return 404, "no such route"
