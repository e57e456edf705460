"""A data folder over time, as an operator handles it: copied while the server runs (a
backup restored beside the original), with real servers on the original and the copy."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import wait_for
from tests.server import Server

# No model server of their own: these tests run sleep jobs only.
NO_LLM = {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()


def _serve(servers: list[Server], data_dir: Path, log: Path) -> Server:
    server = Server(data_dir, log, NO_LLM)
    servers.append(server)
    return server.start()


def _job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    answer: dict[str, Any] = client.get(f"/api/jobs/{job_id}").json()
    return answer


@pytest.mark.skipif(shutil.which("cp") is None, reason="copies with cp -a")
def test_a_copy_of_a_running_folder_leaves_the_originals_runners_alone(
        data_dir: Path, tmp_path: Path, servers: list[Server]) -> None:
    original = _serve(servers, data_dir, tmp_path / "original.log")
    with original.client() as client:
        job_id = client.post("/api/jobs", json={"kind": "sleep", "timeout_s": 300, "input": {
            "seconds": 60, "steps": 60}}).json()["id"]
        running = wait_for(lambda: _job(client, job_id)["state"] == "running"
                           and _job(client, job_id), timeout=30, what="the job running")
        # A backup taken while it runs, then served beside the original (a restore test).
        copy = tmp_path / "copy"
        subprocess.run(["cp", "-a", str(data_dir), str(copy)], check=True)
        beside = _serve(servers, copy, tmp_path / "copy.log")
        with beside.client() as on_copy:
            # The copy's job has no runner of its own: lost (a sleep has one attempt), not
            # the original's runner taken for its own ...
            lost = wait_for(lambda: _job(on_copy, job_id)["state"] != "running"
                            and _job(on_copy, job_id), timeout=30, what="the copy's job ended")
            assert lost["state"] == "failed" and lost["error"]["type"] == "lost", lost
            # ... so a cancel there (or its deadline) does not stop the original's job.
            assert on_copy.delete(f"/api/jobs/{job_id}").status_code == 409
        assert psutil.Process(running["pid"]).is_running()
        assert _job(client, job_id)["state"] == "running"
        assert client.delete(f"/api/jobs/{job_id}").status_code == 200


def test_a_copy_leaves_the_originals_model_server_running(
        data_dir: Path, tmp_path: Path, servers: list[Server]) -> None:
    # The original's model server, as a copy's llm.json names it: a process with its
    # command line (llama-server is not built everywhere the tests run).
    model_server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)",
                                     "llama_cpp.server"])
    try:
        copy = tmp_path / "copy"
        copy.mkdir(mode=0o700)
        (copy / "llm.json").write_text(json.dumps({
            "ready": True, "pid": model_server.pid, "restarts": 0,
            "data_dir": str(data_dir), "updated_at": "2026-01-01T00:00:00.000Z"}))
        # No model here to serve: the leader says so in llm.json once it has looked.
        server = Server(copy, tmp_path / "copy.log",
                        {"OFFLOAD_LOCAL_MODEL": str(tmp_path / "none.gguf")})
        servers.append(server.start())
        wait_for(lambda: json.loads((copy / "llm.json").read_text()).get("available") is False,
                 timeout=30, what="the copy's own model state")
        assert model_server.poll() is None, "the original's model server was stopped"
    finally:
        model_server.kill()
        model_server.wait(10)
