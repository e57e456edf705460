"""A data folder over time, as an operator handles it: written by an earlier version and
served by this one, copied while the server runs (a backup restored beside the
original), with real servers on it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import ROOT, free_port, wait_for, wait_job
from tests.fake_llm import FakeLLM
from tests.server import Server

# No model server of their own: these tests run sleep jobs only.
NO_LLM = {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}
# What Offload 0.9.0 (commit 240b0fd) wrote, as it wrote it: jobs of each kind and end, a
# conversation of two turns and a third queued, two trained models, the machine's
# history; stopped with two jobs queued behind two running, one runner killed after.
OLD_FOLDER = Path(__file__).parent / "fixtures" / "data-0.9.0"
OLD_CONVERSATION = ["73d87a2e20824c0f8bbe72a8e2fa9f9a", "51196b7bd9424f729d0b97ca036731b8",
                    "07a332d056004a2ca5badd051aaba149"]  # the last one queued
OLD_ENDS = {  # the jobs that had ended
    "73d87a2e20824c0f8bbe72a8e2fa9f9a": ("completed", None),
    "51196b7bd9424f729d0b97ca036731b8": ("completed", None),
    "4df8f2ac71134c5196442a38f6502f19": ("failed", "provider"),
    "ce49e067b1044c9fad9837043e7125f6": ("completed", None),
    "7b4dd52f39dd48c8b5834c1c0fcd7bae": ("timeout", "timeout"),
    "6a5e42309f944963b7c372f37acdc132": ("cancelled", "cancelled"),
    "20b93c262409427db0c8cb9471b9e462": ("failed", "runner"),
    "de33453a0282459f8051e98b531d1573": ("completed", None),  # model version 1
    "ea0b17bd60894bfbbe2c0111f08c29fa": ("completed", None),  # model version 2
}
OLD_RUNNING = ["11d2b0d3febb451fa0efa096a57e1317", "7653b12a247349468f48936c1fd48571"]
OLD_QUEUED_SLEEPS = ["369b0b44e5be4a5db7da0cccfa7fdd36", "5b2fe3add1f54039823a5fcc24138583",
                     "9c2d2331d32842aa8bd9fe56bff7e02c"]


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


def test_a_data_folder_written_by_0_9_0_is_served_as_it_was(
        data_dir: Path, tmp_path: Path, servers: list[Server]) -> None:
    shutil.copytree(OLD_FOLDER, data_dir)
    with FakeLLM() as llm:
        server = Server(data_dir, tmp_path / "server.log",
                        {"OPENAI_BASE_URL": llm.base_url, "OFFLOAD_MAX_CONCURRENT": "2"})
        servers.append(server.start())
        with server.client() as client:
            listed = {job["id"]: job for job in client.get("/api/jobs").json()["jobs"]}
            assert len(listed) == 16
            assert not [job for job in listed.values()
                        if (job["error"] or {}).get("type") == "corrupt"], listed
            for job_id, (state, error_type) in OLD_ENDS.items():
                job = _job(client, job_id)
                assert (job["state"], (job["error"] or {}).get("type")) == (state, error_type)
            # Their runners are gone: lost (a sleep has one attempt), never started again.
            for job_id in OLD_RUNNING:
                lost = wait_job(client, job_id)
                assert (lost["state"], lost["error"]["type"]) == ("failed", "lost"), lost
            # The queued ones run, the conversation's queued turn among them ...
            for job_id in [*OLD_QUEUED_SLEEPS, OLD_CONVERSATION[-1]]:
                assert wait_job(client, job_id)["state"] == "completed"
            # ... and the conversation goes on from its three turns.
            asked = client.post("/api/ai_chat_async", json={
                "messages": [{"role": "user", "content": "And now?"}],
                "session_id": "sess-old"}).json()["job_id"]
            assert wait_job(client, asked)["state"] == "completed"
            turns = client.get("/api/sessions/sess-old").json()["turns"]
            assert [turn["job_id"] for turn in turns] == [*OLD_CONVERSATION, asked]
            # Every old job logs and runs again (the long ones are not waited for).
            for job_id in [*OLD_ENDS, *OLD_RUNNING]:
                assert client.get(f"/api/jobs/{job_id}/log").status_code == 200
                rerun = client.post(f"/api/jobs/{job_id}/rerun")
                assert rerun.status_code == 202, rerun.text
                assert rerun.json()["rerun_of"] == job_id
                assert client.delete(f"/api/jobs/{rerun.json()['id']}").status_code in (200, 409)
            again = client.post(f"/api/jobs/{OLD_QUEUED_SLEEPS[0]}/rerun").json()["id"]
            assert wait_job(client, again)["state"] == "completed"
    # The trained models are kept, each under its version.
    for version in (1, 2):
        saved = data_dir / "models" / f"forecast-v{version}.json"
        assert saved.read_bytes() == (OLD_FOLDER / "models" / saved.name).read_bytes()


def test_the_folder_reached_another_way_adopts_its_runners(
        data_dir: Path, tmp_path: Path, servers: list[Server]) -> None:
    """A launch record names its job file by the path the supervisor used; a server on
    the same folder through a bind mount runs it, and adopts its runners."""
    first = _serve(servers, data_dir, tmp_path / "first.log")
    other_way = tmp_path / "mounted"
    other_way.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(data_dir), str(other_way)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {mounted.stderr.strip()[:200]}")
    try:
        with first.client() as client:
            job_id = client.post("/api/jobs", json={"kind": "sleep", "timeout_s": 300,
                                                    "input": {"seconds": 8}}).json()["id"]
            running = wait_job(client, job_id, "running", timeout=30)
        first.stop()  # its runner runs on
        second = _serve(servers, other_way, tmp_path / "second.log")
        with second.client() as client:
            final = wait_job(client, job_id, timeout=60)
        second.stop()
    finally:
        subprocess.run(["umount", "-l", str(other_way)], check=False)
    assert final["state"] == "completed" and final["pid"] == running["pid"], final


@pytest.mark.parametrize("named", ["", str(ROOT), str(ROOT.parent)],
                         ids=["empty", "the project", "above the project"])
def test_a_data_folder_empty_or_holding_the_project_is_refused(named: str,
                                                                tmp_path: Path) -> None:
    """`OFFLOAD_DATA_DIR=` (a .env line left blank) was the working folder: launch.py's is
    the project's, whose jobs/ package then held the jobs, and all of it was made private."""
    done = subprocess.run([sys.executable, str(ROOT / "api_entry.py"), "--port",
                           str(free_port())], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "OFFLOAD_DATA_DIR": named}, timeout=90)
    said = done.stdout + done.stderr
    assert done.returncode == 3, said[-3000:]
    expected = "is empty" if not named else f"{named} holds Offload's own files"
    assert f"OFFLOAD_DATA_DIR: {expected}" in said, said[-3000:]
    assert not list(tmp_path.iterdir())
