"""Every log Offload writes or collects stays bounded, checked through the real daemon
(`make_server`: uvicorn, its keeper, `python -m jobs.supervisor`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from jobs import protocol as p
from jobs.launch.ray import submission_id
from jobs.protocol.wake import poke
from jobs.store.job_store import JobStore
from tests.conftest import wait_for
from tests.fake_ray import FakeRay

MakeServer = Callable[..., Any]
CAP_MB = 0.05
CAP = int(CAP_MB * 2**20)
# The runner cuts its log after every 64 KB of its own output; the rest is buffering.
SLACK = 128 * 1024
NO_MODEL = {"OFFLOAD_LOCAL_MODEL": "/nonexistent/model.gguf"}  # no model server to wait for

pytestmark = pytest.mark.faults


@pytest.mark.parametrize("fork_server", ["1", "0"])  # a forked runner, an exec'd one
def test_runaway_runner_log_is_capped_under_the_real_daemon(
        make_server: MakeServer, data_dir: Path, fork_server: str) -> None:
    server = make_server(env={"OFFLOAD_LOG_MAX_MB": str(CAP_MB), **NO_MODEL,
                              "OFFLOAD_FORK_SERVER": fork_server})
    with server.client() as client:
        # The API refuses test knobs: the job file is written as the API writes it.
        job_id = str(JobStore(data_dir / "jobs").create("probe", {"seconds": 3, "spew": True},
                                                        60)["id"])
        poke(data_dir / "jobs")
        log = data_dir / "jobs" / job_id / p.LOG_FILE
        sizes = []
        while client.get(f"/api/jobs/{job_id}").json()["state"] not in p.FINAL_STATES:
            with contextlib.suppress(FileNotFoundError):
                sizes.append(log.stat().st_size)
            time.sleep(0.01)
        assert client.get(f"/api/jobs/{job_id}").json()["state"] == "completed"
    text = log.read_text()
    lines = int(text.rsplit("spewed ", 1)[1].split()[0])
    assert lines * 111 > 10 * CAP  # uncapped, the log would be over ten times the cap
    assert max(sizes) <= CAP + SLACK, max(sizes)
    assert text.startswith("         0 spew xxx")  # its start is kept
    assert f"log capped at {CAP} bytes" in text
    assert text.endswith(f"spewed {lines} lines\n")  # and its latest output


def _fill(path: Path, size: int) -> None:
    with open(path, "ab") as f:
        f.write(b"an old line of output\n" * (size // 22))


def _capped(path: Path) -> bool:
    return path.stat().st_size <= CAP and "log capped at" in path.read_text()


def test_supervisor_log_rotates_and_outputs_are_capped(make_server: MakeServer,
                                                       data_dir: Path) -> None:
    """supervisor.log is a RotatingFileHandler's; what other processes write through an
    inherited handle (the daemon's stdout and stderr, the model server's output) is cut
    in place: before their writer starts, and while it runs."""
    data_dir.mkdir(parents=True)
    outputs = [data_dir / "supervisor.out", data_dir / "llm-server.log"]
    for path in [data_dir / "supervisor.log", *outputs]:
        _fill(path, 4 * CAP)  # left by earlier runs
    make_server(env={"OFFLOAD_LOG_MAX_MB": str(CAP_MB), **NO_MODEL})
    wait_for(lambda: (data_dir / "supervisor.log.1").exists(), 30, 0.1, "a rotation")
    assert (data_dir / "supervisor.log.1").stat().st_size == 4 * CAP // 22 * 22
    assert "supervisor leads" in (data_dir / "supervisor.log").read_text()
    assert (data_dir / "supervisor.log").stat().st_size <= CAP
    for path in outputs:
        wait_for(partial(_capped, path), 30, 0.1, f"{path.name} capped before its writer starts")
        _fill(path, 4 * CAP)  # as if its writer had printed that much meanwhile
    for path in outputs:
        wait_for(partial(_capped, path), 30, 0.1, f"{path.name} capped while it is written")


def test_supervisor_log_says_how_each_job_ended(make_server: MakeServer,
                                                data_dir: Path) -> None:
    """An operator greps supervisor.log for a job's id, or for `failed`: the ends a runner
    wrote itself are said there as those the supervisor writes, its error's type alone
    (its message may quote a chat)."""
    server = make_server(env=NO_MODEL)
    submissions = {
        "completed": {"kind": "sleep", "input": {"seconds": 0}},
        "failed (runner)": {"kind": "train", "input": {}},  # no history yet to learn from
        "timeout (timeout)": {"kind": "sleep", "input": {"seconds": 60}, "timeout_s": 1},
    }
    with server.client() as client:
        ids = {ending: client.post("/api/jobs", json=body).json()["id"]
               for ending, body in submissions.items()}
        for ending, job_id in ids.items():
            final = client.get(f"/api/jobs/{job_id}", params={"wait_s": 25}).json()
            assert ending.startswith(final["state"]), final
    log = data_dir / "supervisor.log"
    for ending, job_id in ids.items():
        line = f"job {job_id}: {ending}\n"
        wait_for(partial(_holds, log, line), 30, 0.1, f"{line!r} in supervisor.log")


def _holds(path: Path, text: str) -> bool:
    return text in path.read_text()


def _ends_with(path: Path, text: str) -> bool:
    return path.read_bytes().endswith(text.encode())


def test_remote_log_is_appended_and_capped(make_server: MakeServer, data_dir: Path) -> None:
    """Over Ray (a scripted head: Ray's log grows as a spewing runner's would): the local
    copy is appended to, never rewritten, so a reader following it sees each new line,
    and it is capped; the runner's own cap travels in the job's environment."""
    with FakeRay() as fake:
        server = make_server(env={"OFFLOAD_LAUNCHER": "ray", "OFFLOAD_RAY_ADDRESS": fake.address,
                                  "OFFLOAD_LOG_MAX_MB": str(CAP_MB), **NO_MODEL})
        with server.client() as client:
            job_id = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 60}}
                                 ).json()["id"]
            sid = submission_id(job_id)
            sent = wait_for(lambda: next((body for method, _, body in list(fake.requests)
                                          if method == "POST"), None), what="the submission")
            assert sent["runtime_env"]["env_vars"]["OFFLOAD_LOG_MAX_BYTES"] == str(CAP)
            with fake.lock:
                fake.jobs[sid]["status"] = "RUNNING"
                fake.logs[sid] = "first line\n"
            log = data_dir / "jobs" / job_id / p.LOG_FILE
            wait_for(lambda: log.exists() and log.read_text() == "first line\n", what="the log")
            with open(log, "rb") as follower:  # as `tail -f` reads it
                assert follower.read() == b"first line\n"
                chunk = CAP // 2
                for step in range(24):  # Ray's log grows to over ten times the cap
                    line = f"step {step} " + "x" * 100 + "\n"
                    with fake.lock:
                        fake.logs[sid] += line * (chunk // len(line))
                    wait_for(partial(_ends_with, log, line), 30, 0.02, f"step {step} logged")
                    assert log.stat().st_size <= CAP + chunk
                    if step == 0:
                        assert line.encode() in follower.read(), "appended, not replaced"
            assert len(fake.logs[sid]) > 10 * CAP
            text = log.read_text()
            assert text.startswith("first line\n") and f"log capped at {CAP} bytes" in text
            assert client.delete(f"/api/jobs/{job_id}").json()["state"] == "cancelled"


@pytest.mark.llm
@pytest.mark.slow
def test_model_server_output_is_capped_while_it_serves(make_server: MakeServer,
                                                       data_dir: Path) -> None:
    """The real model server: llama-cpp-python's, whose loading alone writes some 200 KB
    (llama-server's, a few lines); it is cut in place and the server goes on writing at
    the new end."""
    server = make_server(env={"OFFLOAD_LOG_MAX_MB": str(CAP_MB),
                              "OFFLOAD_LLM_ENGINE": "llama-cpp-python"})
    log = data_dir / "llm-server.log"
    with server.client() as client:
        wait_for(lambda: client.get("/api/health").json()["llm"]["ready"], 120, 0.2,
                 "the embedded model to load")
        wait_for(partial(_capped, log), 30, 0.1, "llm-server.log capped")
        job_id = client.post("/api/ai_chat_async", json={
            "messages": [{"role": "user", "content": "Say hi."}]}).json()["job_id"]
        wait_for(lambda: client.get(f"/api/ai_chat_result/{job_id}").json()["status"]
                 == "completed", 120, 0.2, "the reply")
    after_cut = log.read_text().rsplit("log capped at", 1)[1]
    assert "POST /v1/chat/completions" in after_cut, after_cut[-2000:]
    assert log.stat().st_size <= CAP + 64 * 1024


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="named pipes")
def test_a_pipe_or_a_folder_in_a_logs_place_is_said_not_waited_for(
        make_server: MakeServer) -> None:
    # A named pipe in place of job.log held each request for its log for good (and a
    # worker thread with it); a folder there answered 500.
    import os

    server = make_server()
    with server.client() as client:
        jobs = [client.post("/api/jobs", json={"kind": "sleep", "input": {}}).json()["id"]
                for _ in range(2)]
        def all_done() -> bool:
            return all(client.get(f"/api/jobs/{job_id}").json()["state"] == "completed"
                       for job_id in jobs)

        wait_for(all_done, 30)
        logs = [server.data_dir / "jobs" / job_id / p.LOG_FILE for job_id in jobs]
        for log in logs:
            log.unlink(missing_ok=True)
        os.mkfifo(logs[0])
        logs[1].mkdir()
        for job_id, why in zip(jobs, ("not a file", "Is a directory"), strict=True):
            answer = client.get(f"/api/jobs/{job_id}/log", timeout=10)
            assert answer.status_code == 200, answer.text
            assert answer.text.startswith(f"[the job's log cannot be read: {why}"), answer.text
