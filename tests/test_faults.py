"""Faults tried on purpose: what users of job systems complain about elsewhere (jobs
lost on restart, stuck "running" forever, logs that fill the disk, a listing that
crawls with many jobs) must not happen here.

Runner SIGKILL, SIGTERM ignored and the whole tree at a deadline are in
test_supervisor.py; a corrupt job file in test_files.py (all marked `faults` too).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from bench.scale import write_finished_jobs
from jobs import protocol as p
from jobs.protocol.wake import OUTPUT_FILE
from jobs.store.job_store import JobStore
from jobs.supervisor.daemon import LAUNCH_PROBLEM_S
from tests.conftest import ROOT, RunningSupervisor, start_process, stop_process, wait_for
from tests.fake_llm import FakeLLM
from tests.server import Server

pytestmark = pytest.mark.faults
MakeServer = Callable[..., Server]


def _final(client: httpx.Client, job_id: str, timeout: float = 60) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        job = client.get(f"/api/jobs/{job_id}").json()
        return job if job["state"] in p.FINAL_STATES else None

    return wait_for(check, timeout, 0.1, f"job {job_id} to finish")


@pytest.mark.slow
def test_api_killed_with_50_chats_in_flight_all_complete_once(make_server: MakeServer) -> None:
    with FakeLLM(pieces=["word "] * 15, delay_s=0.1) as llm:  # each chat streams ~1.5 s
        env = {"OPENAI_BASE_URL": llm.base_url, "OFFLOAD_MAX_CONCURRENT": "12"}
        first = make_server(env=env)
        with first.client() as client:
            ids = [client.post("/api/ai_chat_async", json={"messages": [
                {"role": "user", "content": f"question {i}"}]}).json()["job_id"]
                for i in range(50)]
            wait_for(lambda: len(llm.requests) >= 10, 30, what="chats to be streaming")
        first.stop(signal.SIGKILL)  # no shutdown at all: the API process just vanishes
        with first.client() as client, contextlib.suppress(httpx.TransportError):
            client.get("/api/health")
            raise AssertionError("the API still answers after SIGKILL")
        second = make_server(env=env)
        with second.client() as client:
            finals = [_final(client, job_id, 120) for job_id in ids]
            replies = [client.get(f"/api/ai_chat_result/{job_id}").json() for job_id in ids]
    assert [f["state"] for f in finals] == ["completed"] * 50, [
        (f["state"], f["error"]) for f in finals if f["state"] != "completed"]
    assert all((r["status"], r["reply"]) == ("completed", "word " * 15) for r in replies), replies
    asked = sorted(body["messages"][-1]["content"] for body in
                   (r["body"] for r in llm.requests))
    assert asked == sorted(f"question {i}" for i in range(50))  # each exactly once


def _immutable(folder: Path, on: bool) -> None:
    """Make every folder and file under `folder` unwritable, even for root (a socket,
    the supervisor's doorbell, has no such attribute). Again while it fails: a runner's
    temporary file can go between `find` seeing it and `chattr` changing it. Made
    writable again from the bottom up: a job's folder still unwritable in a writable jobs
    folder is one job's own fault, which that job waits out (CLAIM_RETRY_S)."""
    order = [] if on else ["-depth"]
    for _ in range(20):
        done = subprocess.run(["find", str(folder), *order, "!", "-type", "s", "-exec",
                               "chattr", "+i" if on else "-i", "{}", "+"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"chattr under {folder} kept failing: {done.stderr[-500:]}")


@pytest.fixture
def can_freeze(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    probe.write_text("x")
    if shutil.which("chattr") is None:
        pytest.skip("needs chattr (Linux) to make a folder unwritable for root")
    try:
        _immutable(probe, True)
    except subprocess.CalledProcessError:
        pytest.skip("this file system has no immutable attribute")
    _immutable(probe, False)


@pytest.mark.slow
@pytest.mark.usefixtures("can_freeze")
def test_data_folder_read_only_mid_run_then_recovers(make_server: MakeServer) -> None:
    server = make_server()
    data = server.data_dir
    with server.client() as client:
        done = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0}}).json()
        _final(client, done["id"])
        running = client.post("/api/jobs", json={"kind": "sleep",
                                                 "input": {"seconds": 2, "steps": 20}}).json()
        wait_for(lambda: client.get(f"/api/jobs/{running['id']}").json()["state"] == "running",
                 what="the job to run")
        stored = {f: f.read_bytes() for f in (data / "jobs" / done["id"]).iterdir()}
        _immutable(data, True)
        try:
            refused = client.post("/api/jobs", json={"kind": "sleep"})
            assert refused.status_code == 503
            assert "cannot store the job" in refused.json()["detail"]
            time.sleep(3)  # the runner finishes its work; its final state cannot be written
            job = client.get(f"/api/jobs/{running['id']}").json()
            assert job["state"] == "running" and (job["progress"] or {}).get("fraction", 0) < 1
            assert client.get("/api/jobs").status_code == 200
            assert client.get("/api/history").status_code == 200
            cancel = client.delete(f"/api/jobs/{running['id']}")
            assert cancel.status_code == 503
            # Its own outcome: it said "the job was not stored" of a job that is there.
            assert "The job was not cancelled" in cancel.json()["detail"], cancel.text
            assert "not stored" in refused.json()["detail"]
        finally:
            _immutable(data, False)
        final = _final(client, running["id"])
        assert final["state"] == "completed", final
        assert final["result"]["slept_s"] == 2
        assert {f: f.read_bytes() for f in (data / "jobs" / done["id"]).iterdir()} == stored
        again = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0}})
        assert again.status_code == 202
        assert _final(client, again.json()["id"])["state"] == "completed"


@pytest.mark.usefixtures("can_freeze")
@pytest.mark.slow
def test_a_job_whose_own_folder_refuses_its_claim_holds_up_no_other(
        make_server: MakeServer) -> None:
    """One job's folder made immutable: its launch claim is refused (EPERM) while the
    jobs folder takes writes. Every launch waited behind it, for as long as it lasted."""
    server = make_server()
    with server.client() as client:
        first = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0},
                                               "delay_s": 1, "priority": 5}).json()
        folder = server.data_dir / "jobs" / first["id"]
        subprocess.run(["chattr", "+i", str(folder)], check=True)
        try:
            others = [client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0},
                                                     "delay_s": 1.5}).json()["id"]
                      for _ in range(3)]
            for job_id in others:
                assert _final(client, job_id)["state"] == "completed"
            assert client.get(f"/api/jobs/{first['id']}").json()["state"] == "queued"
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        assert _final(client, first["id"], timeout=90)["state"] == "completed"  # tried again
    assert "its folder refuses its launch claim" in (server.data_dir / "supervisor.log").read_text()


@pytest.mark.usefixtures("can_freeze")
def test_jobs_wait_while_the_folder_is_unwritable(
        make_supervisor: Callable[..., RunningSupervisor], data_dir: Path) -> None:
    supervisor = make_supervisor(max_concurrent=2)
    store = supervisor.store
    waiting = [store.create("sleep", {"seconds": 0}, 30)["id"] for _ in range(3)]
    _immutable(data_dir, True)
    try:
        supervisor.supervisor.wake()
        time.sleep(1.5)
        assert [store.read(j)["state"] for j in waiting] == ["queued"] * 3
    finally:
        _immutable(data_dir, False)
    supervisor.supervisor.wake()
    assert [supervisor.wait_final(j)["state"] for j in waiting] == ["completed"] * 3


@pytest.mark.usefixtures("can_freeze")
def test_final_state_of_a_killed_runner_lands_once_writable(
        make_supervisor: Callable[..., RunningSupervisor], data_dir: Path) -> None:
    supervisor = make_supervisor()
    job_id = supervisor.submit(seconds=30)
    pid = supervisor.wait_state(job_id, "running")["pid"]
    _immutable(data_dir, True)
    try:
        os.kill(pid, signal.SIGKILL)
        time.sleep(1)
        assert supervisor.job(job_id)["state"] == "running"  # nothing could be written
    finally:
        _immutable(data_dir, False)
    final = supervisor.wait_final(job_id)
    assert final["state"] == "failed" and final["error"]["type"] == "lost"
    assert final["exit_code"] == -signal.SIGKILL


@pytest.mark.usefixtures("can_freeze")
def test_a_result_held_past_its_deadline_by_an_unwritable_folder_lands(
        make_supervisor: Callable[..., RunningSupervisor], data_dir: Path) -> None:
    """A runner whose work ended in time waits to write its final state while the data
    folder is unwritable (up to 10 minutes). Stopped at its deadline meanwhile, its
    result was lost and the job said `timeout`, "stopped after its deadline", of a job
    that had completed well before it. A short grace (0.1 s): the stop request written
    once the folder is writable again, the runner was killed before its next try to
    write its final state (every 0.5 s), and the result lost all the same."""
    supervisor = make_supervisor(grace_s=0.1)
    job_id = supervisor.submit(seconds=1, steps=1, timeout_s=2.5)
    supervisor.wait_state(job_id, "running")
    _immutable(data_dir, True)
    try:
        time.sleep(5)  # its work ends at 1 s; its deadline at 2.5 s, and the grace after it
        assert supervisor.job(job_id)["state"] == "running"  # nothing could be written
    finally:
        _immutable(data_dir, False)
    final = supervisor.wait_final(job_id)
    assert final["state"] == "completed", (final["error"], final.get("exit_code"))
    assert final["result"]["slept_s"] == 1


def test_a_runner_stopped_by_a_signal_offload_did_not_send_is_lost_not_cancelled(
        make_server: MakeServer) -> None:
    # A `kill PID` of a runner (or a shutdown's SIGTERM to every process) read as
    # "cancelled on request", which no one had asked: its attempts left were thrown away.
    server = make_server()

    def started(client: httpx.Client, job_id: str, attempt: int) -> int:
        def running() -> int | None:
            job = client.get(f"/api/jobs/{job_id}").json()
            return job["pid"] if job["state"] == "running" and job["attempt"] == attempt \
                and job["pid"] else None

        return int(wait_for(running, 60, 0.05, f"attempt {attempt} of {job_id} to run"))

    def submitted(client: httpx.Client, attempts: int) -> str:
        return str(client.post("/api/jobs", json={
            "kind": "sleep", "input": {"seconds": 60}, "max_attempts": attempts}).json()["id"])

    said = "stopped by SIGTERM, which no cancel or deadline of Offload's asked for"
    with server.client() as client:
        again = submitted(client, 2)
        os.kill(started(client, again, 1), signal.SIGTERM)
        started(client, again, 2)  # tried again
        earlier = client.get(f"/api/jobs/{again}").json()["earlier_errors"]
        assert [error["type"] for error in earlier] == ["lost"], earlier
        assert said in earlier[0]["message"], earlier
        assert client.delete(f"/api/jobs/{again}").status_code == 200  # a cancel is one
        cancelled = _final(client, again)
        assert (cancelled["state"], cancelled["error"]["message"]) == (
            "cancelled", "cancelled on request"), cancelled
        last = submitted(client, 1)
        os.kill(started(client, last, 1), signal.SIGTERM)
        failed = _final(client, last)
    assert (failed["state"], failed["error"]["type"], failed["exit_code"]) == (
        "failed", "lost", 75), failed  # as the runner left it: not final
    assert said in failed["error"]["message"], failed


def _degraded(client: httpx.Client, what: str) -> dict[str, Any]:
    def degraded() -> dict[str, Any] | None:
        health = client.get("/api/health").json()
        return health if health["status"] == "degraded" else None

    return wait_for(degraded, 15, 0.2, what)


@pytest.mark.usefixtures("can_freeze")
def test_a_data_folder_unwritable_at_start_is_said_by_the_health(
        make_server: MakeServer) -> None:
    """A data folder read-only when the API starts (a disk remounted read-only): no
    supervisor process can start, so no job runs. The health said `ok` (the supervisor
    `starting`) for as long as that lasted, and `offload status` exited 0."""
    server = make_server()
    data = server.data_dir
    server.stop()
    _immutable(data, True)
    try:
        server.start()
        with server.client() as client:
            health = _degraded(client, "the health to say no supervisor starts")
            assert health["supervisor"] == "starting", health
            assert any("no supervisor can start" in each for each in health["problems"]), health
        # The server's output (launch.py's terminal) said the error alone, not what to do.
        said = server.log.read_text(errors="replace")
        assert "no job runs: Operation not permitted" in said, said[-2000:]
        assert "make the data folder writable" in said, said[-2000:]
    finally:
        _immutable(data, False)
    with server.client() as client:
        wait_for(lambda: client.get("/api/health").json()["status"] == "ok", 20, 0.2,
                 "the health to be ok again")
        job = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0}}).json()
        assert _final(client, job["id"])["state"] == "completed"


def test_folders_in_place_of_the_supervisors_records_are_said_by_the_health(
        make_server: MakeServer) -> None:
    """A folder in place of the leader's settings or its launcher's problem, there at the
    start: the supervisor logged a traceback every 5 s and the health said `ok`, so the
    API never checked its settings against the leader's. The caps set while the server
    ran, damaged, were taken as unset, also with the health `ok`."""
    server = make_server()
    data = server.data_dir
    server.stop()
    records = {"supervisor.json": "remove it", "launcher.problem": "remove it",
               "queue.cap": "set them again"}  # and what the health says to do
    for name in records:
        (data / name).mkdir()
    server.start()
    with server.client() as client:
        job = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0}}).json()
        assert _final(client, job["id"])["state"] == "completed", "jobs run meanwhile"
        health = _degraded(client, "the health to say the records are damaged")
        for name, advice in records.items():
            damaged = [each for each in health["problems"] if f"{data / name} is damaged" in each]
            assert len(damaged) == 1, health
            assert advice in damaged[0], damaged
        time.sleep(2 * LAUNCH_PROBLEM_S)  # the supervisor tries to write them again
        for name in records:
            (data / name).rmdir()
        wait_for(lambda: (data / "supervisor.json").is_file(), 10, what="the settings written")
        assert client.get("/api/health").json()["status"] == "ok"
    said = (data / "supervisor.log").read_text(errors="replace")
    assert "Traceback" not in said, said[-3000:]
    assert said.count("cannot tell the API what this supervisor runs with") == 1, said
    assert "the API is told what this supervisor runs with again" in said, said


def test_a_file_in_place_of_the_marks_of_forgotten_conversations_refuses_their_chats(
        make_server: MakeServer) -> None:
    """With a file in place of `forgotten-sessions/`, a forgotten conversation took new
    turns again, its session_id no longer refused, and the health said `ok`."""
    with FakeLLM() as llm:
        server = make_server(env={"OPENAI_BASE_URL": llm.base_url})
        marks = server.data_dir / "forgotten-sessions"

        def ask(session: str | None) -> httpx.Response:
            turn = {"messages": [{"role": "user", "content": "hi"}]}
            return client.post("/api/ai_chat_async",
                               json={**turn, **({"session_id": session} if session else {})})

        with server.client() as client:
            assert _final(client, ask("mine").json()["job_id"])["state"] == "completed"
            assert client.delete("/api/sessions/mine").status_code == 200
            assert ask("mine").status_code == 410
            marks.rename(marks.with_name("marks.moved"))
            marks.write_text("")
            stored = len(client.get("/api/jobs").json()["jobs"])
            for session in ("mine", "another"):
                refused = ask(session)
                assert refused.status_code == 503, refused.text
                assert f"{marks} is no folder" in refused.text
                assert "move it away" in refused.text and "Nothing was stored" in refused.text
            assert len(client.get("/api/jobs").json()["jobs"]) == stored
            health = _degraded(client, "the health to say the marks cannot be read")
            said = [each for each in health["problems"] if str(marks) in each]
            assert len(said) == 1 and said[0].startswith(f"{marks} is no folder"), health
            assert _final(client, ask(None).json()["job_id"])["state"] == "completed"
            marks.unlink()
            marks.with_name("marks.moved").rename(marks)
            assert ask("mine").status_code == 410
            assert client.get("/api/health").json()["status"] == "ok"


def test_a_file_in_place_of_the_schedules_folder_creates_nothing_and_is_said(
        make_server: MakeServer, tmp_path: Path) -> None:
    """With a file in place of `schedules/`, a paused schedule created jobs again and the
    health said `ok`; pausing it, or the queue with a folder in `queue.paused`'s place, was
    a 503 that named no file."""
    path = tmp_path / "schedules.toml"
    path.write_text('[tick]\nkind = "sleep"\nevery = 1\ninput = {seconds = 0}\n')
    server = make_server(env={"OFFLOAD_SCHEDULES_FILE": str(path)})
    folder = server.data_dir / "schedules"

    def ticks() -> int:
        return sum(job.get("schedule") == "tick"
                   for job in client.get("/api/jobs").json()["jobs"])

    with server.client() as client:
        wait_for(ticks, 30, 0.1, "a first job")
        assert client.post("/api/schedules/tick/pause").status_code == 200
        time.sleep(1.5)  # a job of the slot the pause came in may still be created
        folder.rename(folder.with_name("schedules.moved"))
        folder.write_text("")
        created = ticks()
        health = _degraded(client, "the health to say the schedules folder is no folder")
        assert any(f"{folder} is no folder" in each for each in health["problems"]), health
        for answer in (client.get("/api/schedules"), client.post("/api/schedules/tick/resume")):
            assert answer.status_code == 503, answer.text
            assert str(folder) in answer.text and "move it away" in answer.text, answer.text
        time.sleep(3)  # three slots
        assert ticks() == created, "a paused schedule created jobs"
        folder.unlink()
        folder.with_name("schedules.moved").rename(folder)
        time.sleep(2)
        assert ticks() == created, "still paused"
        assert client.post("/api/schedules/tick/resume").status_code == 200
        wait_for(lambda: ticks() > created, 30, 0.1, "a job once resumed")
        (server.data_dir / "queue.paused").mkdir()
        refused = client.post("/api/queue/resume")
        assert refused.status_code == 503, refused.text
        assert str(server.data_dir / "queue.paused") in refused.text
        assert "move it away" in refused.text
    said = (server.data_dir / "supervisor.log").read_text(errors="replace")
    assert "Traceback" not in said, said[-3000:]
    cannot_tell = "schedule tick creates no jobs while it cannot be told whether it is paused"
    assert said.count(cannot_tell) == 1 and str(folder) in said, said[-3000:]


def test_a_supervisor_lock_no_process_can_take_is_said_by_the_health(
        make_server: MakeServer) -> None:
    """A folder in place of the supervisor's lock file: every supervisor started waits its
    turn to lead for good, so no job runs, and the health said `ok` (the supervisor
    `starting`) all along."""
    server = make_server()
    lock = server.data_dir / "supervisor.lock"
    server.stop()
    lock.unlink(missing_ok=True)
    lock.mkdir()
    server.start()
    with server.client() as client:
        health = _degraded(client, "the health to say no supervisor leads")
        assert health["supervisor"] == "starting", health
        said = " ".join(health["problems"])
        assert "no supervisor can take its lock" in said and "Is a directory" in said, health
        lock.rmdir()
        wait_for(lambda: client.get("/api/health").json()["status"] == "ok", 20, 0.2,
                 "the health to be ok again")
        job = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0}}).json()
        assert _final(client, job["id"])["state"] == "completed"


def test_a_folder_in_place_of_the_machine_history_is_said_by_the_health(
        make_server: MakeServer) -> None:
    """The health, the history, the forecast and a chat for the expert all read the
    machine's history: with a folder in its place each answered a 500, and the
    supervisor said it could not record it once a second, for as long as it lasted."""
    server = make_server()
    history = Path(p.metrics_file(server.data_dir))
    with server.client() as client:
        wait_for(lambda: client.get("/api/history").json()["metrics"]["samples"], 20, 0.2,
                 "the supervisor's first sample")
        history.unlink()
        history.mkdir()
        in_place = time.monotonic()
        health = _degraded(client, "the health to say the history cannot be read")
        assert health["supervisor"] == "running", health
        said = " ".join(health["problems"])
        assert "history" in said and "cannot be read (Is a directory)" in said, health
        assert "remove it: the supervisor starts a new one" in said, health
        answer = client.get("/api/history")
        assert answer.status_code == 200 and answer.json()["metrics"]["samples"] == [], answer.text
        assert client.get("/api/predict").status_code == 409
        chat = client.post("/api/jobs", json={"kind": "chat", "input": {
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}})
        assert chat.status_code == 202, chat.text
        assert "No machine metrics recorded yet." in chat.json()["input"]["context"]
        time.sleep(max(0.0, in_place + 3.5 - time.monotonic()))  # three samples' tries
        history.rmdir()
        wait_for(lambda: client.get("/api/history").json()["metrics"]["samples"], 20, 0.2,
                 "the supervisor's new history")
        assert client.get("/api/health").json()["status"] == "ok"
    said = (server.data_dir / "supervisor.log").read_text()
    assert said.count("cannot record metrics") == 1, said[-3000:]
    assert "metrics are recorded again" in said, said[-3000:]


def test_a_file_in_place_of_the_jobs_folder_is_said_not_a_500(make_server: MakeServer) -> None:
    """Every request that lists the jobs (the health, the history, the list, /metrics, a
    submission) answered a 500, the API logged a traceback ten times a second and the
    supervisor four times a second."""
    server = make_server()
    jobs = server.data_dir / "jobs"
    with server.client() as client:
        done = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0}}).json()
        assert _final(client, done["id"])["state"] == "completed"
        jobs.rename(jobs.with_name("jobs.moved"))
        jobs.write_text("")
        health = _degraded(client, "the health to say the jobs cannot be listed")
        said = " ".join(health["problems"])
        assert "cannot list the jobs in" in said and "move away the file in its place" in said
        for answer in (client.get("/api/jobs"), client.get("/api/history"),
                       client.get("/metrics"),
                       client.post("/api/jobs", json={"kind": "sleep"})):
            assert answer.status_code == 503, answer.text
            assert "move away the file in its place. Nothing was read or stored" in answer.text
        time.sleep(1.5)  # some passes of the supervisor and refreshes of the index
        jobs.unlink()
        jobs.with_name("jobs.moved").rename(jobs)
        assert [job["id"] for job in client.get("/api/jobs").json()["jobs"]] == [done["id"]]
        job = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0}}).json()
        assert _final(client, job["id"])["state"] == "completed"
        # ok again once a job is stored (the failed requests are said until then)
        assert client.get("/api/health").json()["status"] == "ok"
    said = server.log.read_text(errors="replace")
    assert "Traceback" not in said, said[-3000:]
    # Once, not at every refresh (the moment between the file's removal and the folder's
    # return may be said too: nothing is there then).
    assert said.count("the job index cannot be refreshed: cannot list the jobs in "
                      f"{jobs} (Not a directory)") == 1, said
    supervisor = (server.data_dir / "supervisor.log").read_text(errors="replace")
    assert supervisor.count("supervisor pass failed: cannot list the jobs in "
                            f"{jobs} (Not a directory)") == 1, supervisor


def test_a_file_in_place_of_the_jobs_folder_at_start_is_named_with_what_to_do(
        make_server: MakeServer, data_dir: Path) -> None:
    """Each supervisor started logged "cannot make the jobs folder ...: File exists", which
    sent one looking for a folder, not for the file in its way."""
    jobs = data_dir / "jobs"
    data_dir.mkdir(parents=True, exist_ok=True)
    jobs.write_text("")
    server = make_server()
    with server.client() as client:
        health = _degraded(client, "the health to say the jobs cannot be listed")
        assert any("move away the file in its place" in each for each in health["problems"])
        supervisor = data_dir / "supervisor.log"
        wait_for(lambda: supervisor.exists() and f"(a file is in place of the folder {jobs}: "
                 "move it away)" in supervisor.read_text(errors="replace"), 20, 0.2,
                 "the supervisor to name the file in the way")
        jobs.unlink()
        job = wait_for(lambda: client.post("/api/jobs", json={"kind": "sleep"}).json()
                       .get("id"), 20, 0.2, "a job stored once the file is gone")
        assert _final(client, job)["state"] == "completed"


def test_a_job_file_damaged_then_mended_is_listed_and_run_as_it_is_again(
        make_server: MakeServer) -> None:
    """A damaged job file quiet for 5 s was listed and counted failed (corrupt) until the
    API restarted, mended or not, and a queued job mended never ran: each side took it
    for a final state and never read it again."""
    server = make_server()
    with server.client() as client:
        done = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0}}).json()
        assert _final(client, done["id"])["state"] == "completed"
        assert client.post("/api/queue/pause").status_code == 200
        waiting = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0}}).json()
        files = {job["id"]: Path(p.job_path(server.data_dir / "jobs", job["id"]))
                 for job in (done, waiting)}
        kept = {job_id: file.read_bytes() for job_id, file in files.items()}
        quiet = time.time() - 60  # each file as if long unchanged: settled at once

        def write(file: Path, data: bytes) -> None:
            file.with_suffix(".new").write_bytes(data)
            os.utime(file.with_suffix(".new"), (quiet, quiet))
            os.replace(file.with_suffix(".new"), file)

        def listed() -> dict[str, str]:
            return {job["id"]: job["state"] for job in client.get("/api/jobs").json()["jobs"]}

        for file in files.values():
            write(file, b'{"id": "damaged')
        wait_for(lambda: set(listed().values()) == {"failed"}, 10, what="both listed failed")
        assert client.post("/api/queue/resume").status_code == 200
        time.sleep(1.5)  # the supervisor's passes find the queued one damaged
        assert client.get("/api/history").json()["counts"]["failed"] == 2
        for job_id, file in files.items():
            write(file, kept[job_id])
        wait_for(lambda: listed()[done["id"]] == "completed", 10, what="the mended one listed")
        assert _final(client, waiting["id"])["state"] == "completed", "the queued one ran"
        assert listed() == {done["id"]: "completed", waiting["id"]: "completed"}

        def counted() -> tuple[int, int]:  # /api/history may be OVERVIEW_MAX_AGE_S stale
            counts = client.get("/api/history").json()["counts"]
            return counts["completed"], counts["failed"]
        wait_for(lambda: counted() == (2, 0), 5, what="both counted completed")


@pytest.mark.skipif(sys.platform == "win32", reason="SIGSTOP")
@pytest.mark.timeout(120)  # the health calls a supervisor stalled after 15 s of silence
def test_a_leader_hung_before_this_api_read_a_sample_of_it_is_said_stalled(
        make_server: MakeServer, data_dir: Path, tmp_path: Path) -> None:
    """A leading supervisor that this API never saw sample the machine (hung before its
    first sample, or its history removed) was said `running` for good: the health timed
    its silence from its latest sample alone."""
    env = {"OFFLOAD_DATA_DIR": str(data_dir)}
    by_hand = start_process(["-m", "jobs.supervisor"], env, tmp_path / "supervisor.out")
    try:
        samples = Path(p.metrics_file(data_dir))
        wait_for(samples.exists, 60, 0.1, "the supervisor's first sample")
        psutil.Process(by_hand.pid).suspend()
        samples.unlink()
        server = make_server()  # it leaves the lead to the one that holds it
        with server.client() as client:
            assert client.get("/api/health").json()["supervisor"] == "running"
            wait_for(lambda: client.get("/api/health").json()["supervisor"] == "stalled",
                     60, 0.5, "the health to say the supervisor is stalled")
            psutil.Process(by_hand.pid).resume()
            wait_for(lambda: client.get("/api/health").json()["supervisor"] == "running",
                     30, 0.2, "the health to say the supervisor runs again")
    finally:
        with contextlib.suppress(psutil.Error):
            psutil.Process(by_hand.pid).resume()
        stop_process(by_hand)


@pytest.fixture
def no_room_for_processes(tmp_path: Path) -> Iterator[Callable[[list[int], bool], None]]:
    """Put processes in a pids cgroup of their own and close it (no new process or thread
    there: fork fails with EAGAIN, as at a machine's or container's process limit), or
    open it again. Root on a Linux with the pids controller."""
    mounts = [Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")]
    group = None
    for mount in mounts:  # cgroup v1's pids hierarchy, else v2's
        candidate = mount / f"offload-test-{os.getpid()}-{tmp_path.name}"
        try:
            candidate.mkdir()
        except OSError:
            continue
        if (candidate / "pids.max").exists():
            group = candidate
            break
        candidate.rmdir()
    if group is None:
        pytest.skip("needs a pids cgroup of its own (root on Linux)")
    parent = group.parent

    def close(pids: list[int], closed: bool) -> None:
        for pid in pids:
            with contextlib.suppress(OSError):  # ended meanwhile
                (group / "cgroup.procs").write_text(str(pid))
        (group / "pids.max").write_text("1" if closed else "max")

    yield close
    with contextlib.suppress(OSError):
        (group / "pids.max").write_text("max")
    for pid in (group / "cgroup.procs").read_text().split():
        with contextlib.suppress(OSError):
            (parent / "cgroup.procs").write_text(pid)
    with contextlib.suppress(OSError):
        group.rmdir()


def test_jobs_wait_while_no_process_can_start(
        make_server: MakeServer, no_room_for_processes: Callable[[list[int], bool], None]) -> None:
    # At a process limit (or short of memory) a fork fails with EAGAIN: each job failed
    # for good, as "lost" with an exit code "unknown", though it never started.
    server = make_server(env={"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})
    assert server.proc is not None
    with server.client() as client:
        warm = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0}})
        assert _final(client, warm.json()["id"])["state"] == "completed"
        api = psutil.Process(server.proc.pid)
        supervisor = server.supervisor()
        no_room_for_processes([proc.pid for proc in api.children(recursive=True)], True)
        waiting = [client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0}})
                   .json()["id"] for _ in range(3)]
        time.sleep(3)
        jobs = [client.get(f"/api/jobs/{job_id}").json() for job_id in waiting]
        # The same supervisor: one that died of a thread it could not start was started
        # again by the API, and with no limit of this test's, it ran the jobs.
        assert supervisor.is_running() and supervisor in api.children()
        assert [job["state"] for job in jobs] == ["queued"] * 3, jobs
        assert not any((server.data_dir / "jobs" / job_id / p.RUN_FILE).exists()
                       for job_id in waiting), "no claim is left where nothing started"
        no_room_for_processes([], False)
        finals = [_final(client, job_id) for job_id in waiting]
    assert [(job["state"], job["attempt"]) for job in finals] == [("completed", 1)] * 3, finals
    log = (server.data_dir / "supervisor.log").read_text(errors="replace")
    assert "jobs wait: " in log and "no room to start a runner now" in log, log[-2000:]


@pytest.fixture
def many_jobs(data_dir: Path) -> Iterator[list[str]]:
    yield write_finished_jobs(data_dir / "jobs", 20_000)


@pytest.mark.slow
def test_20000_job_files_list_count_and_prune(make_server: MakeServer,
                                              many_jobs: list[str]) -> None:
    server = make_server(env={"OFFLOAD_MAX_JOBS": "20000"})
    with server.client() as client:
        newest = client.get("/api/jobs", params={"limit": 5}).json()["jobs"]
        assert [j["id"] for j in newest] == many_jobs[:-6:-1]
        history = client.get("/api/history").json()
        assert history["counts"]["completed"] == 20_000
        assert [j["id"] for j in history["jobs"][:3]] == many_jobs[:-4:-1]
        assert client.get("/api/jobs", params={"state": "queued"}).json()["jobs"] == []
        job = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0}}).json()
        assert _final(client, job["id"])["state"] == "completed"
        assert client.get("/api/jobs", params={"limit": 1}).json()["jobs"][0]["id"] == job["id"]
    server.stop()
    # Over the cap: the oldest finished jobs go, the newest stay.
    pruned = make_server(env={"OFFLOAD_MAX_JOBS": "5000"})
    jobs_dir = pruned.data_dir / "jobs"
    wait_for(lambda: len(os.listdir(jobs_dir)) <= 5000, 60, 0.5, "pruning")
    kept = set(os.listdir(jobs_dir))
    assert job["id"] in kept and set(many_jobs[-4999:]) <= kept
    with pruned.client() as client:  # the API's index catches up within a refresh or two
        wait_for(lambda: client.get("/api/history").json()["counts"]["completed"] == 5000,
                 30, 0.2, "the API's counts after pruning")


@pytest.mark.skipif(not hasattr(psutil.Process, "io_counters"), reason="reads not counted")
def test_a_long_listing_asked_again_reads_no_job_file_again(make_server: MakeServer,
                                                            data_dir: Path) -> None:
    # Beyond 256 jobs, each listing read every one of them from disk again (under the
    # index's lock): the cache, filled newest first, had evicted what the next one needed.
    write_finished_jobs(data_dir / "jobs", 600)
    server = make_server()
    assert server.proc is not None
    api = psutil.Process(server.proc.pid)
    with server.client() as client:
        first = client.get("/api/jobs", params={"limit": 500}).json()["jobs"]
        before = api.io_counters().read_count
        again = client.get("/api/jobs", params={"limit": 500}).json()["jobs"]
        reads = api.io_counters().read_count - before
    assert len(first) == len(again) == 500 and first == again
    assert reads < 100, f"{reads} reads for a listing held in memory"


def test_a_job_created_right_after_a_listing_is_listed(data_dir: Path) -> None:
    store = JobStore(data_dir / "jobs")
    for _ in range(200):
        job_id = store.create("sleep", {}, 10)["id"]
        assert store.list_jobs(limit=1)[0]["id"] == job_id
    assert store.counts()["queued"] == 200
    store.remove(job_id)
    assert store.counts()["queued"] == 199
    assert job_id not in {j["id"] for j in store.list_jobs(limit=500)}


@pytest.mark.usefixtures("can_freeze")
def test_a_first_write_that_failed_is_tried_again_before_the_job_ends(data_dir: Path) -> None:
    """A runner whose `running` write fails, and that reports no progress for a while,
    writes it once the folder is writable again: its job does not look queued meanwhile."""
    store = JobStore(data_dir / "jobs")
    job_id = store.create("sleep", {"seconds": 60, "steps": 1}, 120)["id"]
    job_dir = store.path(job_id).parent
    _immutable(job_dir, True)
    try:
        runner = subprocess.Popen(
            [sys.executable, "-m", "runners.sleep", "--job-file", str(store.path(job_id))],
            cwd=ROOT, env={**os.environ, p.LAUNCHED_ENV: "1"},  # as its supervisor does
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert runner.stderr is not None
        assert "cannot write the job file" in runner.stderr.readline()
        assert store.read(job_id)["state"] == "queued"
    finally:
        _immutable(job_dir, False)
    try:
        wait_for(lambda: store.read(job_id)["state"] == "running", 20, 0.1,
                 "the running state to be written")
        assert runner.poll() is None  # the retry, not the final write of a job that ended
    finally:
        runner.kill()
        runner.communicate()


@pytest.mark.slow
def test_a_stopped_supervisor_is_shown_stalled(make_server: MakeServer) -> None:
    """A supervisor stopped (SIGSTOP) or hung kept its lead: /api/health said "running"
    while nothing launched."""
    server = make_server()
    with server.client() as client:
        wait_for(lambda: client.get("/api/health").json()["supervisor"] == "running"
                 and client.get("/api/history").json()["metrics"]["samples"], 30, 0.2,
                 "the supervisor to lead and sample the machine")
        supervisor = server.supervisor()
        supervisor.suspend()
        try:
            wait_for(lambda: client.get("/api/health").json()["supervisor"] == "stalled", 60,
                     0.5, "health to say the supervisor is stalled")
            status = subprocess.run([sys.executable, "-m", "jobs", "--url", server.url, "status"],
                                    capture_output=True, text=True, timeout=60)
            assert status.returncode == 7 and "stalled" in status.stderr, status  # for scripts
        finally:
            supervisor.resume()
        wait_for(lambda: client.get("/api/health").json()["supervisor"] == "running", 30,
                 0.2, "the supervisor to be running again")


def test_a_job_deleted_while_it_runs_has_its_runner_stopped(make_server: MakeServer) -> None:
    """Its folder removed by hand: the job read 404 and could not be cancelled, while
    its runner went on until its deadline, holding a slot."""
    server = make_server(env={"OFFLOAD_MAX_CONCURRENT": "1"})
    with server.client() as client:
        doomed = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 60}})
        job = wait_for(lambda: (j := client.get(f"/api/jobs/{doomed.json()['id']}").json())
                       ["pid"] and j, 30, 0.1, "the job to run")
        shutil.rmtree(server.data_dir / "jobs" / job["id"])
        wait_for(lambda: not psutil.pid_exists(job["pid"]), 30, 0.2, "its runner to stop")
        after = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0}}).json()
        assert _final(client, after["id"])["state"] == "completed"  # its slot is free
    log = (server.data_dir / "supervisor.log").read_text()
    assert "was deleted while it ran" in log and "Traceback" not in log, log[-2000:]
    assert not (server.data_dir / "jobs" / job["id"]).exists(), "its final state made it anew"


def test_a_removed_supervisor_lock_leaves_one_supervisor_leading(make_server: MakeServer,
                                                                  tmp_path: Path) -> None:
    # Removed as a "stale" lock (by hand, or by a cleaner of old files), it let a second
    # supervisor lead beside the first: the cap was passed and a job could run twice.
    server = make_server(env={"OFFLOAD_MAX_CONCURRENT": "1",
                              "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})
    assert server.proc is not None
    with server.client() as client:
        running = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 4}}
                              ).json()["id"]
        job = wait_for(lambda: (j := client.get(f"/api/jobs/{running}").json())["state"]
                       == "running" and j, 30, what="the job running")
        api = psutil.Process(server.proc.pid)
        first = server.supervisor()
        (server.data_dir / "supervisor.lock").unlink()
        # Another takes the lock at its path, as another API worker's would.
        by_hand = {**os.environ, "OFFLOAD_DATA_DIR": str(server.data_dir),
                   "OFFLOAD_MAX_CONCURRENT": "1", "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}
        second = subprocess.Popen([sys.executable, "-m", "jobs.supervisor"], cwd=ROOT,
                                  env=by_hand,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  start_new_session=True)
        third = None
        try:
            queued = [client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0}}
                                  ).json()["id"] for _ in range(3)]
            first.wait(30)  # it left, seeing its lock gone
            finals = [_final(client, job_id) for job_id in [running, *queued]]
            assert second.poll() is None, "the one leading now runs on"
            # The API started no other: one leads (the first may be a zombie a moment).
            assert not [proc for proc in api.children() if proc.status() != psutil.STATUS_ZOMBIE
                        and "jobs.supervisor" in proc.cmdline()]
            # A third by hand waits its turn, and says so (it was silent, as if hung). One
            # the API started while none led may have said so before it left: counted.
            log_file = server.data_dir / "supervisor.log"

            def waiting() -> int:
                return log_file.read_text(errors="replace").count("this one waits to take over")

            waited = waiting()
            third = subprocess.Popen(second.args, cwd=ROOT, env=by_hand,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
            wait_for(lambda: waiting() > waited, 30, what="the third supervisor waiting")
            # One started by hand (or by a service manager) that loses its lock says so
            # and exits 1; another leads: the one waiting, or one the API starts first.
            def leading() -> int:
                return log_file.read_text(errors="replace").count(": supervisor leads ")

            led = leading()
            (server.data_dir / "supervisor.lock").unlink()
            assert second.wait(30) == 1
            said = second.communicate()[1].decode(errors="replace")
            assert f"the supervisor runs on {server.data_dir}" in said, said
            assert "the supervisor left: its lock in" in said, said
            wait_for(lambda: leading() == led + 1, 30, what="another leading")
        finally:
            for proc in (second, third):
                if proc is not None:
                    proc.terminate()
                    proc.communicate(timeout=30)
    # The running job was adopted, not run again; each job ran once, one at a time.
    assert [(job["state"], job["attempt"]) for job in finals] == [("completed", 1)] * 4, finals
    assert finals[0]["pid"] == job["pid"]
    spans = sorted((job["started_at"], job["finished_at"]) for job in finals)
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans)), spans
    log = (server.data_dir / "supervisor.log").read_text(errors="replace")
    assert "was removed or replaced while this supervisor led: it leaves" in log, log[-2000:]
    # Said where its output goes too.
    output = (server.data_dir / OUTPUT_FILE).read_text(errors="replace")
    assert "the supervisor left: its lock in" in output, output[-2000:]
