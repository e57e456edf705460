"""A real Offload server (uvicorn or gunicorn) in a subprocess, for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.conftest import ROOT, free_port


class Server:
    def __init__(self, data_dir: Path, log: Path, env: dict[str, str] | None = None,
                 workers: int = 1, gunicorn: bool = False, cwd: Path = ROOT,
                 python: str = sys.executable) -> None:
        self.data_dir = data_dir
        self.python = python  # the interpreter of the environment it runs in
        self.cwd = cwd  # the working folder, where a `.env` is read
        self.log = log
        self.env = env or {}
        self.workers = workers
        self.gunicorn = gunicorn
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        if self.gunicorn:
            return [self.python, "-m", "gunicorn", "api_entry:app", "-k",
                    "uvicorn.workers.UvicornWorker", "-w", str(self.workers),
                    "-b", f"127.0.0.1:{self.port}", "--graceful-timeout", "5"]
        return [self.python, "-m", "uvicorn", "api_entry:app", "--host", "127.0.0.1",
                "--port", str(self.port), "--workers", str(self.workers)]

    def start(self, timeout: float = 60) -> Server:
        env = {**os.environ, "OFFLOAD_DATA_DIR": str(self.data_dir), **self.env}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.command(), cwd=self.cwd, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/docs", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def supervisor(self) -> psutil.Process:
        """The supervisor process the API worker started (`python -m jobs.supervisor`)."""
        assert self.proc is not None
        return next(proc for proc in psutil.Process(self.proc.pid).children()
                    if "jobs.supervisor" in proc.cmdline())


class Event:
    """One event of `/api/jobs/{id}/events`: its id and its fields."""

    def __init__(self, id: str | None, fields: dict[str, Any]) -> None:
        self.id = id
        self.fields = fields


def read_events(client: httpx.Client, job_id: str, headers: dict[str, str] | None = None,
                params: dict[str, str] | None = None, until: Any = None,
                timeout: float = 60) -> list[Event]:
    """The events of a job's stream until it closes, or until `until(events)` is true."""
    events: list[Event] = []
    event_id: str | None = None
    with client.stream("GET", f"/api/jobs/{job_id}/events", headers=headers, params=params,
                       timeout=timeout) as stream:
        assert stream.status_code == 200, stream.read()
        for line in stream.iter_lines():
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: "):
                events.append(Event(event_id, json.loads(line[6:])))
                event_id = None
                if until is not None and until(events):
                    break
    return events


def apply(job: dict[str, Any], event: Event) -> dict[str, Any]:
    """A client's copy of the job after one event, as the contract says to apply it."""
    fields = dict(event.fields)
    output = job.get("output") or ""
    if "output_delta" in fields:
        fields["output"] = output + fields.pop("output_delta")
    return {**job, **fields}


def applied(events: list[Event], job: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The client's copy of the job after each event."""
    copies = []
    current = job or {}
    for event in events:
        current = apply(current, event)
        copies.append(current)
    return copies
