"""A real Offload server (uvicorn or gunicorn) in a subprocess, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import ROOT, free_port


class Server:
    def __init__(self, data_dir: Path, log: Path, env: dict[str, str] | None = None,
                 workers: int = 1, gunicorn: bool = False) -> None:
        self.data_dir = data_dir
        self.log = log
        self.env = env or {}
        self.workers = workers
        self.gunicorn = gunicorn
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        if self.gunicorn:
            return [sys.executable, "-m", "gunicorn", "api_entry:app", "-k",
                    "uvicorn.workers.UvicornWorker", "-w", str(self.workers),
                    "-b", f"127.0.0.1:{self.port}", "--graceful-timeout", "5"]
        return [sys.executable, "-m", "uvicorn", "api_entry:app", "--host", "127.0.0.1",
                "--port", str(self.port), "--workers", str(self.workers)]

    def start(self, timeout: float = 60) -> Server:
        env = {**os.environ, "OFFLOAD_DATA_DIR": str(self.data_dir), **self.env}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.command(), cwd=ROOT, env=env, stdout=out,
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
