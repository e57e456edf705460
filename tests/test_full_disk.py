"""A full disk under the data folder: a real server on a small tmpfs, filled by a file that
is removed again. Nothing is lost and nothing is left half-written: a submission is
refused with what to do, a job ends readable with its own error, and everything goes on
once there is room."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import small_disk, wait_for, wait_job
from tests.fake_llm import FakeLLM
from tests.server import Server
from tests.test_cli import cli
from tests.test_train import record_history

pytestmark = pytest.mark.faults
MakeServer = Callable[..., Server]


@contextlib.contextmanager
def disk_filled(disk: Path, pages: int = 0) -> Iterator[Path]:
    """`disk` with no room left but `pages` of 4 KiB, until the block ends (its filler
    removed)."""
    filler = disk / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4096"], capture_output=True)
    size = filler.stat().st_size
    os.truncate(filler, max(0, size - size % 4096 - pages * 4096))
    try:
        yield filler
    finally:
        filler.unlink()


def test_a_chat_failing_on_a_full_disk_keeps_its_own_error(make_server: MakeServer,
                                                           tmp_path: Path) -> None:
    """Its log full, a runner printing why its job failed raised, and left without its
    final state: the job was `lost` ("exited without a final state"), the model's error
    nowhere. Its error now waits for room, as its final state does."""
    with small_disk(tmp_path, "512k") as disk, FakeLLM(
            pieces=["The ", "CPU ", "is ", "fine."], gated="gated", cut_after=1) as llm:
        server = make_server(env={"OFFLOAD_DATA_DIR": str(disk / "var"),
                                  "OPENAI_BASE_URL": llm.base_url})
        with server.client() as client:
            job = client.post("/api/jobs", json={"kind": "chat", "input": {
                "messages": [{"role": "user", "content": "gated"}]}}).json()
            running = wait_for(lambda: (j := client.get(f"/api/jobs/{job['id']}").json())
                               ["output"] and j, 60, 0.05, "the reply's first piece")
            with disk_filled(disk):
                llm.gate.set()  # the stream is cut: the attempt fails, its log has no room
                runner = psutil.Process(running["pid"])
                with contextlib.suppress(psutil.TimeoutExpired):
                    runner.wait(5)  # it ended at once; it now waits for room
            ended = wait_job(client, job["id"], timeout=90)
    assert ended["state"] == "failed", ended
    said = "the LLM server's stream ended before the reply was complete"
    assert ended["earlier_errors"][0]["type"] == "provider", ended["earlier_errors"]
    assert ended["earlier_errors"][0]["message"].startswith(said), ended["earlier_errors"]
    assert ended["error"]["message"].startswith(said), ended


def test_a_model_that_finds_no_room_is_no_model_and_the_next_one_saves(
        make_server: MakeServer, data_dir: Path, tmp_path: Path) -> None:
    """A training whose model found its disk full failed with `OSError: [Errno 28] ...` of a
    temp file, and left its version's file claimed and empty, as one killed between its
    claim and its write does: each stayed for good. Now it says what to do and leaves no
    model file; an empty claim a killed training left is removed once a whole model
    is newer."""
    history = data_dir / "history" / "metrics.jsonl"
    history.parent.mkdir(parents=True)
    now = time.time()
    history.write_text("".join(json.dumps({"t": now - 300 + i, "cpu": 20 + i % 7,
                                           "mem": 50 + i % 3, "mem_used_mb": 900}) + "\n"
                               for i in range(300)))
    train = {"kind": "train", "input": {"epochs": 5, "lags": 5}}
    with small_disk(tmp_path, "64k", at=data_dir / "models") as models:
        killed = models / "forecast-v1.json"  # claimed by a training killed at once
        killed.touch()
        os.utime(killed, (now - 3600, now - 3600))
        server = make_server()
        with server.client() as client:
            with disk_filled(models):
                refused = wait_job(client, client.post("/api/jobs", json=train).json()["id"])
                assert refused["state"] == "failed", refused
                assert refused["error"]["message"] == (
                    f"cannot save the model in {models} (No space left on device): free "
                    "some space on its disk, then train again; the model before, if any, "
                    "stays in use"), refused["error"]
                # Its own claim is gone; the killed one's stays, no whole model newer.
                assert sorted(each.name for each in models.iterdir()) == [
                    "filler", "forecast-v1.json"]
            saved = wait_job(client, client.post("/api/jobs", json=train).json()["id"])
            assert saved["state"] == "completed", saved
            assert saved["result"]["version"] == 2  # the killed one's claim is not taken
            assert sorted(each.name for each in models.iterdir()) == [
                "forecast-v1.json", "forecast-v2.json", "latest.json"]
            # Below a whole model now, the killed one's empty claim is removed.
            again = wait_job(client, client.post("/api/jobs", json=train).json()["id"])
            assert again["result"]["version"] == 3, again
            assert sorted(each.name for each in models.iterdir()) == [
                "forecast-v2.json", "forecast-v3.json", "latest.json"]
            forecast = client.get("/api/predict", params={"horizon": 3})
            assert forecast.status_code == 200 and forecast.json()["version"] == 3, forecast.text


def test_submissions_on_a_full_disk_are_507s_that_say_so_and_all_goes_on_with_room(
        make_server: MakeServer, tmp_path: Path) -> None:
    """A full disk was answered as any unwritable data folder: a 503 that said to check the
    folder exists, is writable and has free space. It is a 507 that says the disk is full
    and to free some space; nothing half-stored is left, and with room, without a restart,
    jobs are stored and the one queued meanwhile runs."""
    with small_disk(tmp_path, "512k") as disk:
        server = make_server(env={"OFFLOAD_DATA_DIR": str(disk / "var")})
        jobs_dir, keys_dir = disk / "var" / "jobs", disk / "var" / "idempotency"
        with server.client() as client:
            # Due once the disk is full (well after: a slow machine is slow to fill it).
            later = client.post("/api/jobs", json={"kind": "sleep", "delay_s": 8, "input": {
                "seconds": 0.1}}).json()
            due = time.time() + 8
            before = sorted(os.listdir(jobs_dir))
            with disk_filled(disk):
                refused = [
                    client.post("/api/jobs", json={"kind": "sleep"}),
                    client.post("/api/jobs", json={"kind": "sleep"},
                                headers={"Idempotency-Key": "once"}),
                    client.post("/api/jobs/batch", json={"jobs": [{"kind": "sleep"}] * 2}),
                    client.post("/api/ai_chat_async", json={"messages": [
                        {"role": "user", "content": "Hi"}]}),
                    client.post("/api/queue/pause")]  # a cancel goes ahead: below
                for answer in refused:
                    said = answer.json()["detail"]
                    assert answer.status_code == 507, answer.text
                    assert "No space left on device" in said, said
                    assert "the data folder's disk is full: free some space on it, then " \
                        "retry" in said, said
                assert sorted(os.listdir(jobs_dir)) == before  # no folder without its job
                assert not keys_dir.exists() or os.listdir(keys_dir) == []
                health = client.get("/api/health").json()
                assert health["status"] == "degraded"
                assert any("No space left on device" in each for each in health["problems"])
                # Due meanwhile, it waits: its launch cannot be recorded.
                wait_for(lambda: time.time() > due + 2, 30, 0.2)
                assert client.get(f"/api/jobs/{later['id']}").json()["state"] == "queued"
            assert wait_job(client, later["id"], timeout=60)["state"] == "completed"
            stored = client.post("/api/jobs", json={"kind": "sleep"},
                                 headers={"Idempotency-Key": "once"})
            assert stored.status_code == 202, stored.text
            assert wait_job(client, stored.json()["id"])["state"] == "completed"
            assert client.post("/api/queue/pause").status_code == 200
            assert not any("No space" in each
                           for each in client.get("/api/health").json()["problems"])


def test_a_job_is_cancelled_on_a_full_disk(make_server: MakeServer, tmp_path: Path) -> None:
    """A cancel is a stop request in the job's folder: on a full disk it was a 507 and
    nothing stopped, though a runaway job filling the disk is the one most worth stopping.
    It is left as an empty request, which needs no room and reads as a cancel: the job
    stops at once, shows as cancelled once there is room, and stays cancelled through a
    restart meanwhile (a cancel the supervisor held in memory alone ran the job again)."""
    with small_disk(tmp_path, "512k") as disk:
        server = make_server(env={"OFFLOAD_DATA_DIR": str(disk / "var")})
        with server.client() as client:
            running = client.post("/api/jobs", json={"kind": "sleep", "max_attempts": 3,
                                                     "input": {"seconds": 100}}).json()
            queued = client.post("/api/jobs", json={"kind": "sleep", "delay_s": 20,
                                                    "input": {"seconds": 1}}).json()
            runner = psutil.Process(wait_job(client, running["id"], "running")["pid"])
            with disk_filled(disk):
                answer = client.delete(f"/api/jobs/{running['id']}")
                said = answer.json()["detail"]
                assert answer.status_code == 507, answer.text
                assert "The cancel is recorded: the supervisor stops the job" in said, said
                assert "free some space on it." in said, said  # not "then retry": it goes ahead
                runner.wait(30)  # stopped, with no room to say so
                offload = cli(server.url, "cancel", queued["id"])
                assert offload.returncode == 7, offload
                assert "The cancel is recorded" in offload.stderr, offload.stderr
                for job, state in ((running, "running"), (queued, "queued")):
                    # Nothing could be written yet.
                    assert client.get(f"/api/jobs/{job['id']}").json()["state"] == state
                # Stopped before there is room: its supervisor with it, holding nothing.
                supervisor = server.supervisor()
                server.stop()
                supervisor.wait(30)
        server.start()
        with server.client() as client:
            for job, said in ((running, "cancelled on request"),
                              (queued, "cancelled while queued")):
                ended = wait_job(client, job["id"], timeout=60)
                assert ended["state"] == "cancelled", ended
                assert ended["error"] == {"type": "cancelled", "message": said}, ended
                assert ended.get("attempt", 1) == 1, ended  # not run again


def cancel_answered_at_once(client: httpx.Client, job_id: str) -> None:
    """A cancel on a full disk answers its 507 at once, not past the stop's grace and 10 s
    more, saying the cancel is recorded."""
    started = time.monotonic()
    answer = client.delete(f"/api/jobs/{job_id}")
    assert answer.status_code == 507, answer.text
    assert time.monotonic() - started < 10  # not the stop's grace and 10 s more
    said = answer.json()["detail"]
    assert "The cancel is recorded: the supervisor stops the job" in said, said


def test_a_cancel_on_a_full_disk_is_answered_at_once(make_server: MakeServer,
                                                    tmp_path: Path) -> None:
    """Its stop request left empty (no room for its words), a cancel waited the stop's
    grace and 10 s more for a final state that had no room either, then answered its 507
    (the dashboard's Cancel disabled meanwhile). It answers the same 507 at once."""
    with small_disk(tmp_path, "512k") as disk:
        server = make_server(env={"OFFLOAD_DATA_DIR": str(disk / "var"),
                                  "OFFLOAD_STOP_GRACE_S": "15"})
        with server.client() as client:
            running = client.post("/api/jobs", json={"kind": "sleep", "input": {
                "seconds": 100}}).json()
            queued = client.post("/api/jobs", json={"kind": "sleep", "delay_s": 60}).json()
            wait_job(client, running["id"], "running")
            with disk_filled(disk):
                cancel_answered_at_once(client, running["id"])
                started = time.monotonic()
                offload = cli(server.url, "cancel", queued["id"])
                assert offload.returncode == 7, offload
                assert time.monotonic() - started < 10
                assert "The cancel is recorded" in offload.stderr, offload.stderr
            for job in (running, queued):
                assert wait_job(client, job["id"], timeout=60)["state"] == "cancelled"


def test_a_model_whose_pointer_finds_no_room_is_not_left_behind(
        make_server: MakeServer, data_dir: Path, tmp_path: Path) -> None:
    """Room for the model's file but none for `latest.json`: the training failed, and left
    a whole model no reader finds (`/api/predict` said to train one first), in the room
    that was short, whose version the next training skipped (version 2 after none). It
    fails as one with no room at all: no model file is left, the next one is version 1."""
    record_history(data_dir)
    train = {"kind": "train", "input": {"epochs": 5, "lags": 5}}
    with small_disk(tmp_path, "64k", at=data_dir / "models") as models:
        server = make_server()
        with server.client() as client:
            with disk_filled(models, pages=1):  # the model's file, not its pointer
                refused = wait_job(client, client.post("/api/jobs", json=train).json()["id"])
                assert refused["state"] == "failed", refused
                assert refused["error"]["message"].startswith(
                    f"cannot save the model in {models} (No space left on device): free "
                    "some space on its disk, then train again"), refused["error"]
                assert sorted(each.name for each in models.iterdir()) == ["filler"]
                assert "no forecasting model yet" in client.get("/api/predict").text
            saved = wait_job(client, client.post("/api/jobs", json=train).json()["id"])
            assert saved["state"] == "completed" and saved["result"]["version"] == 1, saved
            forecast = client.get("/api/predict", params={"horizon": 3})
            assert forecast.status_code == 200 and forecast.json()["version"] == 1, forecast.text


def test_a_runner_that_finds_no_room_for_its_final_state_says_so(
        make_server: MakeServer, tmp_path: Path) -> None:
    """A runner gives up on its final state after OFFLOAD_FINAL_WRITE_PATIENCE_S without
    room: it exited 1, and its job was then `lost`, "exited without a final state", with
    no word of the disk. It exits 73, and the supervisor's final word says why."""
    with small_disk(tmp_path, "512k") as disk:
        server = make_server(env={"OFFLOAD_DATA_DIR": str(disk / "var"),
                                  "OFFLOAD_FINAL_WRITE_PATIENCE_S": "2"})
        with server.client() as client:
            job = client.post("/api/jobs", json={"kind": "sleep", "input": {
                "seconds": 4, "steps": 1}}).json()
            runner = psutil.Process(wait_job(client, job["id"], "running")["pid"])
            with disk_filled(disk):
                runner.wait(60)  # its sleep, then 2 s of trying to write its final state
                assert client.get(f"/api/jobs/{job['id']}").json()["state"] == "running"
            ended = wait_job(client, job["id"], timeout=60)
    assert ended["state"] == "failed" and ended["exit_code"] == 73, ended
    assert ended["error"]["type"] == "lost", ended["error"]
    assert ended["error"]["message"] == (
        "the runner waited for room on the data folder's disk to write its final state "
        "until it gave up: its outcome is lost; free some space on it, then run the job "
        "again"), ended["error"]


def test_a_runner_that_finds_no_room_for_a_job_with_attempts_left_says_it_runs_again(
        make_server: MakeServer, tmp_path: Path) -> None:
    """Its runner gave up for a full disk, and the supervisor, finding room again, queued
    the job again by itself: the attempt's error still said "then run the job again"."""
    with small_disk(tmp_path, "512k") as disk:
        server = make_server(env={"OFFLOAD_DATA_DIR": str(disk / "var"),
                                  "OFFLOAD_FINAL_WRITE_PATIENCE_S": "2"})
        with server.client() as client:
            job = client.post("/api/jobs", json={"kind": "sleep", "max_attempts": 2,
                                                 "input": {"seconds": 4, "steps": 1}}).json()
            runner = psutil.Process(wait_job(client, job["id"], "running")["pid"])
            supervisor = server.supervisor()
            supervisor.suspend()  # it sees the runner's exit 73 only once there is room
            try:
                with disk_filled(disk):
                    wait_for(lambda: not runner.is_running()
                             or runner.status() == psutil.STATUS_ZOMBIE, 60, 0.2,
                             "the runner giving up on its final state")
            finally:
                supervisor.resume()
            ended = wait_job(client, job["id"], timeout=60)
    assert ended["state"] == "completed" and ended["attempt"] == 2, ended
    assert ended["earlier_errors"][0]["type"] == "lost", ended["earlier_errors"]
    assert ended["earlier_errors"][0]["message"] == (
        "the runner waited for room on the data folder's disk to write its final state "
        "until it gave up: its outcome is lost; free some space on it: the job is queued "
        "again by itself (attempt 2 of 2)"), ended["earlier_errors"]


@contextlib.contextmanager
def retry_held(client: httpx.Client, disk: Path, supervisor_log: Path) -> Iterator[str]:
    """A job with an attempt left, its runner killed on `disk` full (the jobs' own): its
    id, while the supervisor holds its next attempt, until the block ends (with room)."""
    # A job file of a few pages: more than its claim, removed first, leaves free.
    job = client.post("/api/jobs", json={"kind": "probe", "max_attempts": 2, "input": {
        "seconds": 20, "steps": 1, "padding": "x" * 20_000}}).json()
    runner = psutil.Process(wait_job(client, job["id"], "running")["pid"])
    with disk_filled(disk):
        runner.kill()  # as the kernel's OOM killer would: no final state
        wait_for(lambda: f"job {job['id']}: cannot " in supervisor_log.read_text(),
                 60, 0.2, "the supervisor holding it")
        assert client.get(f"/api/jobs/{job['id']}").json()["state"] == "running"
        yield job["id"]


def test_a_job_with_attempts_left_that_fails_on_a_full_disk_is_queued_again_with_room(
        make_server: MakeServer, data_dir: Path, tmp_path: Path) -> None:
    """Its runner killed while the disk was full, the supervisor could not queue the job
    again for its next attempt, and wrote `failed` instead once there was room: the
    attempts left were lost. It holds the job and queues it again once there is room."""
    # The jobs alone on the small disk: the supervisor's log says when it holds the job.
    with small_disk(tmp_path, "512k", at=data_dir / "jobs") as disk:
        with make_server().client() as client:
            with retry_held(client, disk, data_dir / "supervisor.log") as job_id:
                pass
            ended = wait_job(client, job_id, timeout=90)
    assert ended["state"] == "completed" and ended["attempt"] == 2, ended
    assert ended["earlier_errors"][0]["type"] == "lost", ended["earlier_errors"]


def test_a_job_cancelled_while_its_next_attempt_waits_for_room_is_not_run_again(
        make_server: MakeServer, data_dir: Path, tmp_path: Path) -> None:
    """A cancel of a job whose next attempt waits for room (its runner's end held): it
    ends cancelled once there is room, as the cancel's 507 says, and is not run again."""
    with small_disk(tmp_path, "512k", at=data_dir / "jobs") as disk:
        with make_server().client() as client:
            with retry_held(client, disk, data_dir / "supervisor.log") as job_id:
                # Its stop request recorded (in the page its claim left, or empty): a 507,
                # or the job as it is once the wait is over.
                client.delete(f"/api/jobs/{job_id}")
            ended = wait_job(client, job_id, timeout=90)
    assert ended["state"] == "cancelled", ended
    assert ended["error"] == {"type": "cancelled", "message": "cancelled on request"}, ended
    assert ended.get("attempt", 1) == 1, ended  # not run again


def test_a_cancel_on_a_full_disk_of_a_job_whose_runner_has_ended_says_what_it_shows(
        make_server: MakeServer, data_dir: Path, tmp_path: Path) -> None:
    """Its runner ended (it gave up on its final state) and the supervisor holds the end
    it writes once there is room: a cancel then changes nothing, and its 507 said the job
    "shows as cancelled once there is room"; it shows as it ended."""
    # The jobs alone on the small disk: the supervisor's log says when it holds the end.
    with small_disk(tmp_path, "512k", at=data_dir / "jobs") as disk:
        server = make_server(env={"OFFLOAD_FINAL_WRITE_PATIENCE_S": "2",
                                  "OFFLOAD_STOP_GRACE_S": "1"})
        supervisor_log = data_dir / "supervisor.log"
        with server.client() as client:
            job = client.post("/api/jobs", json={"kind": "sleep", "input": {
                "seconds": 4, "steps": 1}}).json()
            runner = psutil.Process(wait_job(client, job["id"], "running")["pid"])
            with disk_filled(disk):
                runner.wait(60)  # its sleep, then 2 s of trying to write its final state
                wait_for(lambda: f"job {job['id']}: cannot write its final state"
                         in supervisor_log.read_text(), 60, 0.2, "the supervisor holding it")
                answer = client.delete(f"/api/jobs/{job['id']}")
                said = answer.json()["detail"]
                assert answer.status_code == 507, answer.text
                assert "The cancel is recorded" in said, said
                assert "or as it ended, if its runner had already ended" in said, said
            ended = wait_job(client, job["id"], timeout=60)
    assert ended["state"] == "failed" and ended["exit_code"] == 73, ended  # as said


def ask(client: httpx.Client, question: str) -> str:
    """A turn of the conversation 'full': its job's id."""
    return str(client.post("/api/ai_chat_async", json={
        "session_id": "full", "messages": [{"role": "user", "content": question}]}
    ).json()["job_id"])


def test_a_conversation_forgotten_on_a_full_disk_erases_its_ended_turns_and_says_so(
        make_server: MakeServer, tmp_path: Path) -> None:
    """Its answering turn's cancel left empty (no room for its words), the forget waited
    the stop's grace and 10 s for a final state that had no room either, then answered
    409 "erase the conversation again in a moment", nothing said of the disk. It answers
    at once a 507 that says what was erased and what
    waits for room; its runner is stopped all the same, and once there is room the
    conversation is forgotten in full."""
    with small_disk(tmp_path, "512k") as disk, FakeLLM(pieces=["Fine", "."],
                                                        gated="gated") as llm:
        server = make_server(env={"OFFLOAD_DATA_DIR": str(disk / "var"),
                                  "OPENAI_BASE_URL": llm.base_url,
                                  "OFFLOAD_STOP_GRACE_S": "10"})
        with server.client() as client:
            ended = ask(client, "How is the CPU?")
            assert wait_job(client, ended)["state"] == "completed"
            answering = ask(client, "And the gated memory?")
            running = wait_for(lambda: (j := client.get(f"/api/jobs/{answering}").json())
                               ["output"] and j, 60, 0.05, "the reply's first piece")
            runner = psutil.Process(running["pid"])
            with disk_filled(disk):
                started = time.monotonic()
                answer = client.delete("/api/sessions/full")
                assert answer.status_code == 507, answer.text
                assert time.monotonic() - started < 10  # not the stop's grace and 10 s more
                said = answer.json()["detail"]
                assert said == (
                    "no room on the data folder's disk for the final state of 1 turn still "
                    "answering. 1 turn erased; those answering are stopped all the same (a "
                    "queued one does not start, a running one's runner is stopped) and kept "
                    "until the conversation is forgotten again once there is room; the data "
                    "folder's disk is full: free some space on it, then retry."), said
                assert client.get(f"/api/jobs/{ended}").status_code == 404
                assert client.get(f"/api/jobs/{answering}").status_code == 200  # kept
                runner.wait(30)  # stopped: its end waits for room (or takes what the erase freed)
            assert wait_job(client, answering, timeout=60)["state"] == "cancelled"
            forgotten = client.delete("/api/sessions/full")
            assert forgotten.json() == {"session_id": "full", "erased": 1}, forgotten.text
            assert client.get("/api/sessions/full").json()["turns"] == []


def test_a_question_following_the_turn_a_forget_on_a_full_disk_kept_is_refused(
        make_server: MakeServer, tmp_path: Path) -> None:
    """The forget kept the turn still answering, the newest: the one another tab's next
    question names in `follows`. That question was taken once there was room, and stored
    the erased turns again, carried in its messages."""
    secret = "My secret is quokka-swordfish."
    with small_disk(tmp_path, "512k") as disk, FakeLLM(pieces=["Noted", "."],
                                                        gated="gated") as llm:
        server = make_server(env={"OFFLOAD_DATA_DIR": str(disk / "var"),
                                  "OPENAI_BASE_URL": llm.base_url,
                                  "OFFLOAD_STOP_GRACE_S": "10"})
        with server.client() as client:
            erased = ask(client, secret)
            assert wait_job(client, erased)["state"] == "completed"
            kept = ask(client, "And the gated memory?")
            wait_for(lambda: client.get(f"/api/jobs/{kept}").json()["output"], 60, 0.05,
                     "the reply's first piece")
            with disk_filled(disk):
                answer = client.delete("/api/sessions/full")
                assert answer.status_code == 507, answer.text
                assert client.get(f"/api/jobs/{erased}").status_code == 404
            assert wait_job(client, kept, timeout=60)["state"] == "cancelled"
            carried = [{"role": "user", "content": secret},
                       {"role": "assistant", "content": "Noted."},
                       {"role": "user", "content": "And the gated memory?"},
                       {"role": "user", "content": "What is my secret?"}]
            late = client.post("/api/ai_chat_async", json={
                "messages": carried, "session_id": "full", "follows": kept})
            assert late.status_code == 410, late.text
            assert late.json() == {"detail": (
                f"this conversation was forgotten (the turn this question follows, {kept}, "
                "waits to be erased): start a new one (another session_id) without its "
                "turns")}
            on_disk = "\n".join(f.read_text(errors="replace")
                                for f in (disk / "var").rglob("*") if f.is_file())
            assert "quokka" not in on_disk
            rerun = client.post(f"/api/jobs/{kept}/rerun")
            assert rerun.status_code == 409, rerun.text
            assert "is a turn of a forgotten conversation" in rerun.text
            assert [t["job_id"] for t in client.get("/api/sessions/full").json()["turns"]] \
                == [kept]
            forgotten = client.delete("/api/sessions/full")
            assert forgotten.json() == {"session_id": "full", "erased": 1}, forgotten.text
        asked = [m["content"] for r in llm.requests for m in r["body"]["messages"]]
    assert asked.count(secret) == 1, asked  # the erased turn's own request only


def test_a_turn_waits_for_the_one_before_while_its_next_attempt_waits_for_room(
        make_server: MakeServer, data_dir: Path, tmp_path: Path) -> None:
    """A chat's turn whose runner was killed on a full disk, its next attempt held until
    there is room: the conversation's next turn started meanwhile (in the page the held
    turn's claim left), and answered before the turn it follows, without its reply."""
    supervisor_log = data_dir / "supervisor.log"
    with small_disk(tmp_path, "512k", at=data_dir / "jobs") as disk, FakeLLM(
            pieces=["Fine", "."], gated="gated") as llm:
        server = make_server(env={"OPENAI_BASE_URL": llm.base_url,
                                  "OFFLOAD_MAX_CONCURRENT": "4"})
        with server.client() as client:
            # A job file of a few pages: more than its claim, removed first, leaves free.
            first = ask(client, "How is the gated CPU? " + "x" * 20_000)
            running = wait_for(lambda: (j := client.get(f"/api/jobs/{first}").json())
                               ["output"] and j, 60, 0.05, "the reply's first piece")
            second = ask(client, "And the memory?")
            with disk_filled(disk):
                psutil.Process(running["pid"]).kill()  # as the OOM killer would
                wait_for(lambda: f"job {first}: cannot " in supervisor_log.read_text(),
                         60, 0.2, "the supervisor holding it")
                llm.gate.set()  # its next attempt answers at once
                time.sleep(2)  # passes enough to launch the next turn, were it let go
            done = wait_job(client, first, timeout=90), wait_job(client, second, timeout=90)
    assert [job["state"] for job in done] == ["completed", "completed"], done
    assert done[0]["attempt"] == 2, done[0]
    assert done[1]["started_at"] >= done[0]["finished_at"], done
    asked = [r["body"]["messages"] for r in llm.requests]
    assert asked[-1][-2:] == [{"role": "assistant", "content": "Fine."},
                              {"role": "user", "content": "And the memory?"}], asked[-1]


def test_a_cancel_asked_again_on_a_full_disk_is_answered_at_once(
        make_server: MakeServer, tmp_path: Path) -> None:
    """A cancel whose job's stop was asked already, whole, before the disk filled (its
    runner in the stop's grace): it waited the grace and 10 s more for a final state that
    had no room, then answered 200 with the job still running. It answers the 507 at
    once, as the first cancel on a full disk does."""
    with small_disk(tmp_path, "512k") as disk:
        server = make_server(env={"OFFLOAD_DATA_DIR": str(disk / "var"),
                                  "OFFLOAD_STOP_GRACE_S": "15"})
        with server.client() as client:
            job = client.post("/api/jobs", json={"kind": "probe", "input": {
                "seconds": 100, "ignore_sigterm": True}}).json()
            wait_job(client, job["id"], "running")
            with contextlib.suppress(httpx.ReadTimeout):  # it waits out the grace
                client.delete(f"/api/jobs/{job['id']}", timeout=1)
            stop_file = disk / "var" / "jobs" / job["id"] / "stop.json"
            wait_for(lambda: stop_file.exists() and stop_file.stat().st_size, 30, 0.05,
                     "the stop request")
            with disk_filled(disk):
                cancel_answered_at_once(client, job["id"])
            assert wait_job(client, job["id"], timeout=60)["state"] == "cancelled"


def test_a_cancel_whose_request_fits_but_not_its_final_state_says_so(
        make_server: MakeServer, tmp_path: Path) -> None:
    """A cancel whose stop request found room (for it alone) while the job's final state
    found none: past the stop's grace and 10 s it answered 200 with the job still running,
    and `offload cancel` asked whether the supervisor was running. It answers the 507 that
    says the job shows as cancelled once there is room."""
    # A model server of its own (without OPENAI_BASE_URL) would write its log there too.
    with small_disk(tmp_path, "512k") as disk, FakeLLM() as llm:
        server = make_server(env={"OFFLOAD_DATA_DIR": str(disk / "var"),
                                  "OFFLOAD_STOP_GRACE_S": "1", "OPENAI_BASE_URL": llm.base_url})
        with server.client() as client:
            # A job file of two pages: its final state finds no room in the one the stop
            # request leaves, or in none (the metrics' appends take a page every ~30 s).
            job = client.post("/api/jobs", json={"kind": "probe", "input": {
                "seconds": 100, "steps": 1, "padding": "x" * 7000}}).json()
            wait_job(client, job["id"], "running")
            # The counters' save after the launch would otherwise take a page meanwhile.
            counters = disk / "var" / "job_counters.json"
            wait_for(lambda: counters.exists()
                     and job["id"] in json.loads(counters.read_text() or "{}").get("running", []),
                     30, 0.05, "the counters saved with the job running")
            with disk_filled(disk, pages=2):
                offload = cli(server.url, "cancel", job["id"])
                assert offload.returncode == 7, offload
                assert "The cancel is recorded" in offload.stderr, offload.stderr
                assert "is the supervisor running" not in offload.stderr, offload.stderr
                stop_file = disk / "var" / "jobs" / job["id"] / "stop.json"
                assert stop_file.stat().st_size, "the stop request was left empty"
            assert wait_job(client, job["id"], timeout=60)["state"] == "cancelled"
