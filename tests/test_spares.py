"""Runners taken from warm spare interpreters (`OFFLOAD_LAUNCH_MODE=spares`, the way where
there is no safe fork: macOS, Windows), through the real server and supervisor process:
to the supervisor and the user, a spare that took a job is a runner like any other."""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from jobs import protocol as p
from jobs.launch.local import ADOPT_START_TOLERANCE_S
from jobs.launch.spare_pool import RETRY_S, SPARES as POOL
from jobs.protocol.wake import poke
from jobs.store.job_store import JobStore
from tests.conftest import process_gone, wait_for
from tests.fake_llm import FakeLLM

MakeServer = Callable[..., Any]
NO_MODEL = {"OFFLOAD_LOCAL_MODEL": "/nonexistent/model.gguf"}  # no model server to start
SPARES = {"OFFLOAD_LAUNCH_MODE": "spares", **NO_MODEL}


def spares(data_dir: Path) -> list[psutil.Process]:
    """The idle spares of the supervisor serving `data_dir`."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if (proc.info["cmdline"] or [])[:3] != [sys.executable, "-m", "jobs.launch.spare"]:
            continue
        try:
            if (proc.environ().get("OFFLOAD_DATA_DIR") == str(data_dir)
                    and proc.status() != psutil.STATUS_ZOMBIE):
                found.append(proc)
        except psutil.Error:
            pass  # gone meanwhile
    return found


def waiting_for_a_job(proc: psutil.Process) -> bool:
    """Done importing: blocked reading its stdin."""
    try:
        if sys.platform == "linux":
            with open(f"/proc/{proc.pid}/wchan") as f:
                return "pipe" in f.read()
        if sys.platform == "win32":  # no process states there: its CPU time stands still
            before = proc.cpu_times()
            time.sleep(0.5)
            return proc.cpu_times() == before
        return proc.status() == psutil.STATUS_SLEEPING
    except (OSError, psutil.Error):
        return False


def warm(data_dir: Path) -> set[int]:
    """The pids of the pool's spares, once all are there and warm."""
    def full() -> set[int] | None:
        found = spares(data_dir)
        ready = len(found) == POOL and all(waiting_for_a_job(proc) for proc in found)
        return {proc.pid for proc in found} if ready else None

    return wait_for(full, 60, 0.05, "the warm spares")


def gone(pid: int) -> None:
    wait_for(lambda: process_gone(pid), 30, 0.05, f"process {pid} to end")


def no_spares_left(data_dir: Path) -> None:
    wait_for(lambda: not spares(data_dir), 30, 0.05, "no spare left")


def submit(client: httpx.Client, **job_input: Any) -> str:
    answer = client.post("/api/jobs", json={"kind": "sleep", "input": job_input})
    answer.raise_for_status()
    return str(answer.json()["id"])


def submit_probe(data_dir: Path, **job_input: Any) -> str:
    # The API refuses the test kind's knobs: written as the API writes a job.
    job_id = str(JobStore(data_dir / "jobs").create("probe", job_input, 60)["id"])
    poke(data_dir / "jobs")
    return job_id


def state(client: httpx.Client, job_id: str, *states: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        job: dict[str, Any] = client.get(f"/api/jobs/{job_id}").json()
        return job if job["state"] in states else None

    return wait_for(check, 60, 0.05, f"job {job_id} to be {states}")


def final(client: httpx.Client, job_id: str) -> dict[str, Any]:
    return state(client, job_id, *p.FINAL_STATES)


def test_each_job_takes_a_spare_of_its_own(make_server: MakeServer, data_dir: Path) -> None:
    server = make_server(env=SPARES)
    with server.client() as client:
        first = final(client, submit(client, seconds=0))  # the pool starts with it
        assert first["state"] == p.JobState.COMPLETED, first
        ran = {first["pid"]}
        for _ in range(3):
            ready = warm(data_dir)
            job = final(client, submit(client, seconds=0.2, steps=2))
            assert job["state"] == p.JobState.COMPLETED and job["exit_code"] == 0, job
            assert job["pid"] in ready, "a warm spare took it"
            assert job["pid"] not in ran, "a fresh process per job"
            ran.add(job["pid"])
            gone(job["pid"])
        # Its output goes to the job's log, which the spare opened itself.
        ready = warm(data_dir)
        failed = final(client, submit_probe(data_dir, fail="broken on purpose"))
        assert failed["state"] == p.JobState.FAILED and failed["pid"] in ready, failed
        log = (data_dir / "jobs" / failed["id"] / p.LOG_FILE).read_text()
        assert "error: broken on purpose" in log
        # Not the project's own kind: its runner imports it, not a spare ahead of its job
        # (its import could exit, block or leave threads in another job's process).
        gone(failed["pid"])
        assert all(asked_to_import(pid) == ["runners.sleep"] for pid in warm(data_dir))
    server.stop()
    no_spares_left(data_dir)


def asked_to_import(pid: int) -> list[str]:
    """The runner modules a spare was started to import (its arguments)."""
    return psutil.Process(pid).cmdline()[3:]


def loaded_tls(pid: int) -> bool:
    """Whether a process has mapped Python's TLS module (a chat's client imports it)."""
    return "_ssl" in Path(f"/proc/{pid}/maps").read_text()


def test_a_spare_replaced_imports_the_runner_of_the_job_that_took_one(
        make_server: MakeServer, data_dir: Path) -> None:
    """Jobs come in runs of one kind: after a sleep job, spares import no chat client (a
    chat's runner imports HTTP and TLS, which a spare would import for every sleep job);
    after a chat, the new spare has, so that the next chat finds its client loaded."""
    # Where TLS is a module file of its own, what a process loaded is seen in its maps.
    tls = importlib.util.find_spec("_ssl")
    tls_seen = sys.platform == "linux" and tls is not None and tls.has_location
    with FakeLLM(pieces=["a ", "reply"]) as llm:
        server = make_server(env={**SPARES, "OPENAI_BASE_URL": llm.base_url})
        with server.client() as client:
            final(client, submit(client, seconds=0))  # the pool starts with the first job
            ready = warm(data_dir)
            assert all(asked_to_import(pid) == ["runners.sleep"] for pid in ready), ready
            assert not (tls_seen and [pid for pid in ready if loaded_tls(pid)]), "after a sleep"
            answer = client.post("/api/jobs", json={"kind": "chat", "input": {"messages": [
                {"role": "user", "content": "hi"}]}})
            assert answer.status_code == 202, answer.text
            chat = final(client, answer.json()["id"])
            gone(chat["pid"])  # where its title stays a spare's (macOS, Windows)
            replaced = warm(data_dir) - ready
            assert len(replaced) == 1, "the spare the chat took was replaced"
            assert asked_to_import(*replaced) == ["runners.chat"], "the spare after a chat"
            assert not tls_seen or loaded_tls(*replaced), "the spare after a chat"
        server.stop()
    assert chat["state"] == p.JobState.COMPLETED and chat["pid"] in ready, chat
    assert chat["output"] == "a reply", chat


def test_a_spare_run_job_is_cancelled_with_its_process(make_server: MakeServer,
                                                       data_dir: Path) -> None:
    server = make_server(env=SPARES)
    with server.client() as client:
        final(client, submit(client, seconds=0))
        ready = warm(data_dir)
        job_id = submit(client, seconds=60, steps=60)
        running = state(client, job_id, p.JobState.RUNNING)
        pid = running["pid"]
        assert pid in ready
        proc = psutil.Process(pid)
        job_file = str(data_dir / "jobs" / job_id / p.JOB_FILE)
        if sys.platform == "linux":  # shown as the runner it became
            wait_for(lambda: "runners.sleep" in proc.cmdline(), what="the runner's title")
            assert proc.cmdline() == [sys.executable, "-m", "runners.sleep", "--job-file",
                                      job_file]
            assert os.sched_getscheduler(pid) == os.SCHED_IDLE
        if sys.platform != "win32":
            assert os.getpgid(pid) == pid  # its own group: killpg stops its tree
        assert client.delete(f"/api/jobs/{job_id}").status_code == 200
        job = final(client, job_id)
        assert job["state"] == p.JobState.CANCELLED, job
        gone(pid)


@pytest.mark.parametrize("launch_record", ["kept", "lost"])
def test_a_restarted_supervisor_adopts_a_spare_run_job(make_server: MakeServer,
                                                       data_dir: Path,
                                                       launch_record: str) -> None:
    """Also when the launch record (pid, create time) was never written: the spare
    started long before its job, and is known by the job file in its command line."""
    first = make_server(env=SPARES)
    with first.client() as client:
        final(client, submit(client, seconds=0))
        ready = warm(data_dir)
        if launch_record == "lost":  # a spare that waited: its start says nothing of the job
            oldest_start = max(psutil.Process(pid).create_time() for pid in ready)
            time.sleep(max(0.0, oldest_start + ADOPT_START_TOLERANCE_S + 1 - time.time()))
        job_id = submit(client, seconds=5, steps=5)
        running = state(client, job_id, p.JobState.RUNNING)
    assert running["pid"] in ready
    first.stop()
    no_spares_left(data_dir)  # the idle ones leave with their supervisor; the job runs on
    if launch_record == "lost":  # as when writing it failed: only the claim is there
        p.write_json(data_dir / "jobs" / job_id / p.RUN_FILE, {"pid": None, "claimed_by": 1})
    second = make_server(env=SPARES)
    with second.client() as client:
        job = final(client, job_id)
    assert job["state"] == p.JobState.COMPLETED, job
    assert job["pid"] == running["pid"], "adopted, never started twice"


def test_spares_that_end_before_they_are_warm_are_started_again_after_a_pause(
        make_server: MakeServer, data_dir: Path, tmp_path: Path) -> None:
    """A spare that cannot start (a broken environment, a project file mid-edit) was
    started again at once, over and over, each with a warning and its traceback: now the
    next waits RETRY_S, and jobs start as new interpreters meanwhile."""
    broken = tmp_path / "broken"
    broken.mkdir()
    # A scripted fault: sitecustomize runs in every interpreter of this environment; only
    # spares end at once, as one does that cannot import the project.
    started = tmp_path / "spares started"
    (broken / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if sys.orig_argv[1:3] == ['-m', 'jobs.launch.spare']:\n"
        f"    with open({str(started)!r}, 'a') as f: f.write('a spare\\n')\n"
        "    os._exit(7)\n")
    path = os.pathsep.join(filter(None, [str(broken), os.environ.get("PYTHONPATH")]))
    server = make_server(env={**SPARES, "PYTHONPATH": path})
    with server.client() as client:
        for _ in range(5):
            job = final(client, submit(client, seconds=0))
            assert job["state"] == p.JobState.COMPLETED, job
        time.sleep(2)  # at once, dozens would have been started meanwhile
    server.stop()
    # The first spares end; those are all, unless the jobs took longer than RETRY_S.
    assert POOL <= len(started.read_text().splitlines()) <= 2 * POOL
    log = (data_dir / "supervisor.log").read_text()
    assert "exit code 7 before it was warm" in log, log
    assert f"another spare in {RETRY_S:.0f} s" in log, log
    assert not spares(data_dir)


def test_spares_leave_when_their_supervisor_is_killed(make_server: MakeServer,
                                                      data_dir: Path) -> None:
    server = make_server(env=SPARES)
    with server.client() as client:
        final(client, submit(client, seconds=0))
        warm(data_dir)
    supervisor = spares(data_dir)[0].parent()
    assert supervisor is not None and "jobs.supervisor" in supervisor.cmdline()
    supervisor.kill()  # no close(): their stdin ends
    no_spares_left(data_dir)


def test_a_crashing_runner_fails_as_a_spawned_one_does(make_server: MakeServer,
                                                       data_dir: Path) -> None:
    seen = {}
    for mode in ("spares", "spawn"):
        server = make_server(env={"OFFLOAD_LAUNCH_MODE": mode, **NO_MODEL})
        with server.client() as client:
            final(client, submit(client, seconds=0))
            ready = warm(data_dir) if mode == "spares" else set()
            job = final(client, submit_probe(data_dir, exit_code=7))
        assert (job["pid"] in ready) == (mode == "spares")
        seen[mode] = {key: job[key] for key in ("state", "error", "exit_code")}
        server.stop()
    assert seen["spares"] == seen["spawn"]
    assert seen["spares"]["state"] == p.JobState.FAILED
    assert seen["spares"]["exit_code"] == 7
    assert "exit code 7" in seen["spares"]["error"]["message"]
