"""Several workers, one supervisor: any worker answers any poll; one global cap."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import httpx
import psutil
import pytest

from jobs import protocol as p
from jobs.protocol import embedded
from tests.conftest import process_gone, wait_for
from tests.server import Server

MakeServer = Callable[..., Server]
CAP = 2


def _holds_the_lock(proc: psutil.Process) -> bool:
    try:
        return any(f.path.endswith("supervisor.lock") for f in proc.open_files())
    except psutil.NoSuchProcess:  # a runner, or a child forked ahead, ended since listed
        return False


def _exercise(server: Server) -> None:
    """Submit and poll over fresh connections (so through many workers)."""
    ids = []
    for _ in range(8):
        with server.client() as client:
            answer = client.post("/api/jobs", json={"kind": "sleep",
                                                    "input": {"seconds": 0.8, "steps": 2}})
            assert answer.status_code == 202
            ids.append(answer.json()["id"])
    peak = 0
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        jobs = [httpx.get(f"{server.url}/api/jobs/{i}", timeout=10).json() for i in ids]
        alive = sum(1 for j in jobs if j["pid"] and not process_gone(j["pid"]))
        peak = max(peak, alive)
        assert alive <= CAP, "one supervisor, one global cap"
        if all(j["state"] in p.FINAL_STATES for j in jobs):
            break
        time.sleep(0.05)
    assert [j["state"] for j in jobs] == ["completed"] * len(ids)
    assert peak == CAP
    assert server.proc is not None
    workers = psutil.Process(server.proc.pid).children(recursive=True)
    holders = [w.pid for w in workers if _holds_the_lock(w)]
    assert len(workers) >= 4 and len(holders) == 1, (workers, holders)
    chat = httpx.post(f"{server.url}/api/ai_chat_async", timeout=10,
                      json={"messages": [{"role": "user", "content": "hi"}]}).json()
    result = wait_for(lambda: (r := httpx.get(
        f"{server.url}/api/ai_chat_result/{chat['job_id']}", timeout=10).json())["status"]
        != "processing" and r, 30)
    assert result["status"] == "error"  # no LLM configured: it says so from any worker
    assert "LLM" in result["message"]


@pytest.mark.slow
def test_uvicorn_with_four_workers(make_server: MakeServer) -> None:
    server = make_server(workers=4, env={"OFFLOAD_MAX_CONCURRENT": str(CAP),
                                         "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})
    _exercise(server)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="gunicorn does not run on Windows")
def test_gunicorn_with_uvicorn_workers(make_server: MakeServer) -> None:
    server = make_server(workers=4, gunicorn=True,
                         env={"OFFLOAD_MAX_CONCURRENT": str(CAP),
                              "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})
    _exercise(server)


def test_a_second_api_with_other_settings_is_told_its_supervisor_does_not_share_them(
        make_server: MakeServer) -> None:
    # A second API on the same data folder, started with a cap of 1, said "1 running of
    # 1" while the first's supervisor ran three at a time, and accepted kinds it never ran;
    # and, on another engine than the first's supervisor runs, counted other slots.
    first = make_server(env={"OFFLOAD_MAX_CONCURRENT": "3"})
    with first.client() as client:
        wait_for(lambda: client.get("/api/health").json()["supervisor"] == "running", 30,
                 what="the first API's supervisor leading")
        assert client.get("/api/health").json()["problems"] == []
    second = make_server(env={"OFFLOAD_MAX_CONCURRENT": "1",
                              "OFFLOAD_LLM_ENGINE": embedded.LLAMA_CPP_PYTHON,
                              "OFFLOAD_KINDS": "probe=tests.probe_runner,"
                                               "echo=tests.probe_runner"})
    with second.client() as client:
        health = wait_for(lambda: (h := client.get("/api/health").json())["status"]
                          == "degraded" and h, 30, what="the difference told")
        [problem] = health["problems"]
        assert "the supervisor leading this data folder runs with other settings" in problem
        assert "OFFLOAD_MAX_CONCURRENT 3 there, 1 here" in problem, problem
        if embedded.engine() == embedded.LLAMA_SERVER:  # else both run the one engine
            assert ("OFFLOAD_LLM_ENGINE llama-server there, llama-cpp-python here; "
                    "OFFLOAD_LLM_SLOTS 3 there, 1 here") in problem, problem
        assert ("OFFLOAD_KINDS chat,probe,sleep,train there, chat,echo,probe,sleep,train here"
                in problem), problem
    first.stop()  # its supervisor leaves; the second's leads, with the second's settings
    with second.client() as client:
        wait_for(lambda: client.get("/api/health").json()["problems"] == [], 60,
                 what="the second API's own supervisor leading")
