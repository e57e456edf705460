"""Which job starts when: priorities, per-kind caps, run_at / delay_s, dependencies, and
retries of transient failures, observed through the HTTP API on real runners."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from jobs import protocol as p
from jobs.settings import Settings
from tests.conftest import wait_for, wait_job
from tests.fake_llm import FakeLLM
from tests.server import Server

MakeServer = Callable[..., Server]
QUESTION = {"messages": [{"role": "user", "content": "How is the CPU?"}]}


def submit(client: httpx.Client, kind: str = "sleep", **body: Any) -> dict[str, Any]:
    answer = client.post("/api/jobs", json={"kind": kind, **body})
    assert answer.status_code == 202, answer.text
    job: dict[str, Any] = answer.json()
    return job



def started(job: dict[str, Any], field: str = "started_at") -> datetime:
    return datetime.fromisoformat(job[field].replace("Z", "+00:00"))


def test_higher_priority_starts_first_and_fifo_within_one(make_server: MakeServer) -> None:
    server = make_server(env={"OFFLOAD_MAX_CONCURRENT": "1"})
    with server.client() as client:
        blocker = submit(client, input={"seconds": 3})
        wait_job(client, blocker["id"], "running")
        names = ["low", "high-1", "high-2", "lowest", "default"]
        priorities = [0, 5, 5, -1, None]
        ids = {}
        for name, priority in zip(names, priorities, strict=True):
            extra: dict[str, Any] = {} if priority is None else {"priority": priority}
            ids[name] = submit(client, "sleep", input={"seconds": 0}, **extra)["id"]
        expected = {"high-1": 0, "high-2": 1, "low": 2, "default": 3, "lowest": 4}

        def positions() -> dict[str, int] | None:
            # A read may count the queue as it was a moment ago: it settles at once.
            found = {name: client.get(f"/api/jobs/{job_id}").json()["queue_position"]
                     for name, job_id in ids.items()}
            return found if found == expected else None

        wait_for(positions, 10, 0.05, "the queue positions to follow the launch order")
        jobs = {name: wait_job(client, job_id) for name, job_id in ids.items()}
    assert all(job["state"] == "completed" for job in jobs.values()), jobs
    assert jobs["default"]["priority"] == 0 and jobs["high-1"]["priority"] == 5
    order = sorted(jobs, key=lambda name: started(jobs[name]))
    assert order == ["high-1", "high-2", "low", "default", "lowest"], order


def test_a_chat_gets_priority_over_earlier_jobs_by_default(make_server: MakeServer) -> None:
    with FakeLLM() as llm:
        server = make_server(env={"OFFLOAD_MAX_CONCURRENT": "1",
                                  "OPENAI_BASE_URL": llm.base_url})
        with server.client() as client:
            blocker = submit(client, input={"seconds": 3})
            wait_job(client, blocker["id"], "running")
            sleeper = submit(client, input={"seconds": 0})
            chat = submit(client, "chat", input=QUESTION)
            jobs = [wait_job(client, job["id"]) for job in (sleeper, chat)]
    assert jobs[1]["priority"] == 10
    assert started(jobs[1]) < started(jobs[0]), jobs


def test_a_capped_kind_never_blocks_another(make_server: MakeServer) -> None:
    server = make_server(env={"OFFLOAD_MAX_CONCURRENT": "2", "OFFLOAD_KIND_CAPS": "sleep=1"})
    with server.client() as client:
        first = submit(client, input={"seconds": 4})
        wait_job(client, first["id"], "running")
        capped = submit(client, input={"seconds": 0}, priority=100)
        other = submit(client, "probe", input={"seconds": 0})
        done = {name: wait_job(client, job["id"])
                for name, job in (("first", first), ("capped", capped), ("other", other))}
    first_ended = datetime.fromisoformat(done["first"]["finished_at"].replace("Z", "+00:00"))
    assert started(done["other"]) < first_ended, done  # went past the capped one
    assert started(done["capped"]) >= first_ended, done  # waited for its kind's runner


def test_run_at_and_delay_s_start_no_earlier(make_server: MakeServer) -> None:
    server = make_server()
    with server.client() as client:
        delayed = submit(client, input={"seconds": 0}, delay_s=2)
        at = datetime.now(timezone.utc) + timedelta(seconds=2)
        timed = submit(client, input={"seconds": 0}, run_at=at.isoformat())
        # A time without a zone is UTC.
        naive = submit(client, input={"seconds": 0},
                       run_at=at.replace(tzinfo=None).isoformat())
        assert client.get(f"/api/jobs/{delayed['id']}").json()["state"] == "queued"
        assert delayed["run_at"] is not None
        jobs = [wait_job(client, job["id"]) for job in (delayed, timed, naive)]
    created = datetime.fromisoformat(jobs[0]["created_at"].replace("Z", "+00:00"))
    # The delay counts from the job's creation, not from a moment before it.
    assert jobs[0]["run_at"] == (created + timedelta(seconds=2)).isoformat(
        timespec="milliseconds").replace("+00:00", "Z"), jobs[0]
    assert started(jobs[0]) >= created + timedelta(seconds=2), jobs[0]
    for job in jobs[1:]:
        assert job["state"] == "completed"
        assert started(job) >= at - timedelta(milliseconds=1), (job, at)


@pytest.mark.parametrize("body, needle", [
    ({"priority": 5000}, "priority"),
    ({"priority": "high"}, "priority"),
    ({"run_at": "tomorrow"}, "run_at"),
    ({"run_at": "2020-01-01T00:00:00Z"}, "in the past"),
    ({"delay_s": -1}, "delay_s"),
    ({"delay_s": 10**9}, "delay_s"),
    ({"delay_s": 5, "run_at": "soon"}, "not both"),
    ({"run_at": "2099-01-01T00:00:00Z"}, "days ahead"),
    ({"max_attempts": 0}, "max_attempts"),
])
def test_bad_priority_or_start_time_is_a_422_that_says_why(
        make_server: MakeServer, body: dict[str, Any], needle: str) -> None:
    if body.get("run_at") == "soon":
        body["run_at"] = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    server = make_server()
    with server.client() as client:
        answer = client.post("/api/jobs", json={"kind": "sleep", **body})
    assert answer.status_code == 422, answer.text
    assert needle in answer.json()["detail"], answer.json()


def test_a_job_that_depends_on_another_starts_once_it_completed(
        make_server: MakeServer) -> None:
    # As RQ's depends_on, Pueue's --after or a Celery chain: a job after another's success.
    server = make_server(env={"OFFLOAD_MAX_CONCURRENT": "4", "OFFLOAD_RETRY_BASE_S": "0.5",
                              "OFFLOAD_RETRY_MAX_S": "0.5"})
    with server.client() as client:
        first = submit(client, input={"seconds": 1.5})
        then = submit(client, input={"seconds": 0}, depends_on=first["id"])
        assert then["depends_on"] == [first["id"]]
        time.sleep(0.8)  # the cap has room: it waits for the first job, not for a slot
        assert client.get(f"/api/jobs/{then['id']}").json()["state"] == "queued"
        done_first, done_then = wait_job(client, first["id"]), wait_job(client, then["id"])
        assert done_then["state"] == "completed", done_then
        assert started(done_then) >= started(done_first, "finished_at")
        again = wait_job(client, submit(client, input={"seconds": 0},
                                        depends_on=first["id"])["id"])
        assert again["state"] == "completed", "a dependency that completed already"

        # Ending otherwise: the job fails unstarted and says why, and so do those after it.
        broken = submit(client, "probe", input={"fail": "bad input"})
        after_broken = submit(client, input={"seconds": 0}, depends_on=broken["id"])
        chained = submit(client, input={"seconds": 0}, depends_on=after_broken["id"])
        for job_id, before in ((after_broken["id"], broken["id"]),
                               (chained["id"], after_broken["id"])):
            job = wait_job(client, job_id)
            assert job["state"] == "failed" and job["started_at"] is None, job
            assert job["error"]["type"] == "dependency", job
            assert job["error"]["message"].endswith(f"{before}, ended failed"), job
        # A dependency retried after a transient failure is waited for through its attempts.
        lost = submit(client, "probe", input={"exit_code": 9}, max_attempts=2)
        after_lost = submit(client, input={"seconds": 0}, depends_on=lost["id"])
        done_lost, done_after = wait_job(client, lost["id"]), wait_job(client, after_lost["id"])
        assert done_lost["attempt"] == 2 and done_after["error"]["type"] == "dependency"
        assert started(done_after, "finished_at") >= started(done_lost, "finished_at")
        # A cancelled one: those that depend on it fail as it is cancelled.
        long = submit(client, input={"seconds": 60})
        waiting = submit(client, input={"seconds": 0}, depends_on=long["id"])
        assert client.delete(f"/api/jobs/{long['id']}").status_code == 200
        assert wait_job(client, waiting["id"])["error"]["message"].endswith("ended cancelled")

        bad: Any
        for bad in ("0" * 32, "nope", 5, {}, [None]):
            answer = client.post("/api/jobs", json={"kind": "sleep", "depends_on": bad})
            assert answer.status_code == 422, (bad, answer.text)
            assert "depends_on" in answer.json()["detail"], answer.text
        upper = submit(client, input={"seconds": 0}, depends_on=f" {first['id'].upper()} ")
        assert upper["depends_on"] == [first["id"]], "an id in any case, as the CLI takes it"


def test_a_job_that_depends_on_several_waits_for_all_and_fails_at_the_first_failure(
        make_server: MakeServer) -> None:
    # As RQ's `depends_on=[...]` or `pueue add --after 1 2`.
    server = make_server(env={"OFFLOAD_MAX_CONCURRENT": "4"})
    with server.client() as client:
        short = submit(client, input={"seconds": 0.2})
        long = submit(client, input={"seconds": 2.5})
        both = submit(client, input={"seconds": 0},
                      depends_on=[short["id"], long["id"], short["id"]])
        assert both["depends_on"] == [short["id"], long["id"]], "each once, in order"
        wait_job(client, short["id"])
        time.sleep(0.5)
        assert client.get(f"/api/jobs/{both['id']}").json()["state"] == "queued"
        done, done_long = wait_job(client, both["id"]), wait_job(client, long["id"])
        assert done["state"] == "completed", done
        assert started(done) >= started(done_long, "finished_at")

        # One fails while another still runs: it fails then, without waiting for the other.
        slow = submit(client, input={"seconds": 60})
        broken = submit(client, "probe", input={"fail": "bad input"})
        waiting = submit(client, input={"seconds": 0}, depends_on=[slow["id"], broken["id"]])
        failed = wait_job(client, waiting["id"], timeout=30)
        assert failed["error"]["type"] == "dependency" and failed["started_at"] is None
        assert failed["error"]["message"].endswith(f"{broken['id']}, ended failed"), failed
        # Another of them deleted or damaged by hand while the first still runs: the same.
        later = [submit(client, input={"seconds": 0}, delay_s=delay) for delay in (600, 3)]
        dependents = [submit(client, input={"seconds": 0}, depends_on=[slow["id"], each["id"]])
                      for each in later]
        shutil.rmtree(server.data_dir / "jobs" / later[0]["id"])
        damaged = server.data_dir / "jobs" / later[1]["id"] / "job.json"
        p.write_json(damaged, {**json.loads(damaged.read_text()), "timeout_s": "abc"})
        gone, broken_too = (wait_job(client, each["id"], timeout=30) for each in dependents)
        assert gone["error"]["message"].endswith("is gone (deleted)"), gone
        assert broken_too["error"]["type"] == "dependency", broken_too
        assert client.get(f"/api/jobs/{slow['id']}").json()["state"] == "running"
        assert client.delete(f"/api/jobs/{slow['id']}").status_code == 200
        # A list edited by hand past the API's 100: no job (failed, corrupt), never run.
        edited = submit(client, input={"seconds": 0}, delay_s=2)
        path = server.data_dir / "jobs" / edited["id"] / "job.json"
        p.write_json(path, {**json.loads(path.read_text()),
                            "depends_on": [f"{n:032x}" for n in range(300)]})
        assert client.get(f"/api/jobs/{edited['id']}").json()["error"]["type"] == "corrupt"
        time.sleep(3)
        assert json.loads(path.read_text())["state"] == "queued", "never started"

        for bad, needle in (([], "list of 1 to 100"), ([short["id"], "nope"], "'nope' is no job"),
                            ([f"{n:032x}" for n in range(101)], "at most 100 jobs, not 101"),
                            (["0" * 32, short["id"]], f"no job {'0' * 32}"),
                            ([short["id"]] * 101 + ["0" * 32], f"no job {'0' * 32}")):
            answer = client.post("/api/jobs", json={"kind": "sleep", "depends_on": bad})
            assert answer.status_code == 422, (bad, answer.text)
            assert needle in answer.json()["detail"], answer.text


def test_a_completed_dependency_deleted_as_its_dependent_waits_fails_it(
        make_server: MakeServer) -> None:
    """A completed job deleted (by hand, or with its conversation forgotten) once the
    supervisor had seen a job that depends on it: that job ran, and completed, as though
    the job it depends on were there; a moment earlier, it failed."""
    with FakeLLM(pieces=["Noted."]) as llm:
        server = make_server(env={"OPENAI_BASE_URL": llm.base_url})
        with server.client() as client:
            done = wait_job(client, submit(client, input={"seconds": 0})["id"])
            turn = wait_job(client, submit(client, "chat", input={
                "messages": [{"role": "user", "content": "hi"}], "session_id": "mine"})["id"])
            assert (done["state"], turn["state"]) == ("completed", "completed")
            client.post("/api/queue/pause").raise_for_status()
            dependents = [submit(client, input={"seconds": 0}, depends_on=each["id"])
                          for each in (done, turn)]
            time.sleep(1.5)  # seen by the supervisor, its dependency read as completed
            shutil.rmtree(server.data_dir / "jobs" / done["id"])
            assert client.delete("/api/sessions/mine").json()["erased"] == 1
            client.post("/api/queue/resume").raise_for_status()
            for dependent, gone in zip(dependents, (done, turn), strict=True):
                failed = wait_job(client, dependent["id"], timeout=30)
                assert failed["state"] == "failed" and failed["started_at"] is None, failed
                assert failed["error"]["type"] == "dependency", failed
                assert failed["error"]["message"].endswith(
                    f"{gone['id']}, is gone (deleted)"), failed


def test_dependents_fail_at_once_have_no_queue_position_and_keep_their_dependency(
        make_server: MakeServer) -> None:
    server = make_server(env={"OFFLOAD_MAX_CONCURRENT": "1", "OFFLOAD_MAX_JOBS": "4",
                              "OFFLOAD_MIN_RETENTION_S": "0"})
    with server.client() as client:
        # Its dependency completed long before its start: pruning (here, beyond
        # OFFLOAD_MAX_JOBS) keeps that job, which failed the dependent as "gone".
        done = wait_job(client, submit(client, input={"seconds": 0})["id"])
        later = submit(client, input={"seconds": 0}, depends_on=done["id"], delay_s=8)
        for _ in range(5):
            wait_job(client, submit(client, input={"seconds": 0})["id"])
        assert wait_job(client, later["id"], timeout=60)["state"] == "completed"

        # The one slot taken and the dependency an hour away: the dependent has no place
        # in the queue (it showed 0, "next"), the job that can start has.
        busy = submit(client, input={"seconds": 60})
        wait_for(lambda: client.get(f"/api/jobs/{busy['id']}").json()["state"] == "running",
                 30, 0.05, "the slot taken")
        away = submit(client, input={"seconds": 0}, delay_s=3600)
        waiting = submit(client, input={"seconds": 0}, depends_on=away["id"], priority=9)
        ready = submit(client, input={"seconds": 0})

        def position(job: dict[str, Any]) -> Any:
            return client.get(f"/api/jobs/{job['id']}").json()["queue_position"]

        wait_for(lambda: position(ready) == 0, 30, 0.1, "the ready job next")
        assert position(waiting) is None
        # Its dependency cancelled, it fails now, not once the slot frees.
        assert client.delete(f"/api/jobs/{away['id']}").status_code == 200
        failed = wait_job(client, waiting["id"], timeout=20)
        assert failed["error"]["type"] == "dependency", failed
        assert client.get(f"/api/jobs/{busy['id']}").json()["state"] == "running"
        client.delete(f"/api/jobs/{busy['id']}")

        # Two jobs edited by hand to depend on each other: never stuck, each says why.
        assert client.post("/api/queue/pause").status_code == 200
        first = submit(client, input={"seconds": 0})
        second = submit(client, input={"seconds": 0}, depends_on=first["id"])
        path = server.data_dir / "jobs" / first["id"] / "job.json"
        p.write_json(path, {**json.loads(path.read_text()), "depends_on": second["id"]})
        assert client.post("/api/queue/resume").status_code == 200
        ends = [wait_job(client, job["id"]) for job in (first, second)]
        assert {job["error"]["type"] for job in ends} == {"dependency"}, ends
        assert any("circle" in job["error"]["message"] for job in ends), ends


def test_dependents_of_jobs_that_failed_before_a_start_fail_at_once(
        make_server: MakeServer, data_dir: Path) -> None:
    # Found at a start after the job they depend on (in whatever order the folder lists
    # them), they waited for a slot, here for ever: the queue is paused.
    from jobs.store.job_store import JobStore

    server = make_server()
    with server.client() as client:
        failed = [wait_job(client, submit(client, "probe", input={"fail": "no"})["id"])
                  for _ in range(6)]
        assert client.post("/api/queue/pause").status_code == 200
    server.stop()
    store = JobStore(data_dir / "jobs")
    waiting = [store.create("sleep", {"seconds": 0}, 30,
                            fields={p.F_DEPENDS_ON: job["id"]})["id"] for job in failed]
    server = make_server()
    with server.client() as client:
        for job_id in waiting:
            job = wait_job(client, job_id, timeout=30)
            assert job["error"]["type"] == "dependency", job


def test_a_malformed_kind_cap_setting_is_named() -> None:
    with pytest.raises(ValidationError, match="OFFLOAD_KIND_CAPS.*kind=number"):
        Settings(OFFLOAD_KIND_CAPS="train")
    with pytest.raises(ValidationError, match="OFFLOAD_MAX_ATTEMPTS"):
        Settings(OFFLOAD_MAX_ATTEMPTS="chat=zero")
    assert Settings(OFFLOAD_KIND_CAPS="train=1, sleep=4").kind_cap_map == {"train": 1, "sleep": 4}
    defaults = Settings(OFFLOAD_KIND_CAPS="train=1", OFFLOAD_MAX_ATTEMPTS="chat=2")
    assert Settings.model_fields["kind_caps"].default == "train=1"
    assert Settings.model_fields["max_attempts"].default == "chat=2"
    assert [defaults.attempts_for(kind) for kind in ("chat", "train", "sleep")] == [2, 1, 1]


def poll_seed_status(client: httpx.Client, job_id: str, seen: list[str],
                     stop: threading.Event) -> None:
    """Poll the seed's endpoint as its frontend does (faster), until it is final."""
    while not stop.is_set():
        status = client.get(f"/api/ai_chat_result/{job_id}").json()["status"]
        seen.append(status)
        if status != "processing":
            return
        time.sleep(0.05)


def test_a_killed_chat_runner_is_retried_and_the_seed_sees_it_processing(
        make_server: MakeServer) -> None:
    with FakeLLM(pieces=["The ", "CPU ", "is ", "fine."], gated="CPU") as llm:
        server = make_server(env={"OPENAI_BASE_URL": llm.base_url,
                                  "OFFLOAD_RETRY_BASE_S": "1"})
        with server.client() as client, server.client() as poller:
            job_id = client.post("/api/ai_chat_async", json=QUESTION).json()["job_id"]
            seen: list[str] = []
            stop = threading.Event()
            watcher = threading.Thread(target=poll_seed_status,
                                       args=(poller, job_id, seen, stop))
            watcher.start()
            try:
                running = wait_for(lambda: (job := client.get(f"/api/jobs/{job_id}").json())
                                   ["output"] and job, 30, 0.05, "the first piece")
                # Paused, the retry stays queued to be seen: its backoff (full jitter) can
                # be shorter than a poll.
                assert client.post("/api/queue/pause").status_code == 200
                os.kill(running["pid"], signal.SIGKILL)
                retrying = wait_job(client, job_id, "queued")
                assert client.post("/api/queue/resume").status_code == 200
                llm.gate.set()
                job = wait_job(client, job_id)
                # Until the watcher has seen the final status itself (its next poll).
                watcher.join(30)
            finally:
                stop.set()
                watcher.join(30)
    assert retrying["attempt"] == 2 and retrying["output"] == ""
    assert retrying["progress"]["message"].startswith("retrying in ")
    assert job["state"] == "completed" and job["attempt"] == 2, job
    assert job["output"] == "The CPU is fine."
    assert [e["type"] for e in job["earlier_errors"]] == ["lost"], job["earlier_errors"]
    assert job["earlier_errors"][0]["attempt"] == 1
    assert seen[-1] == "completed" and set(seen[:-1]) == {"processing"}, seen


def test_a_provider_failure_is_retried(
        make_server: MakeServer) -> None:
    # Three 503s use up the first attempt's own retries; the second attempt is answered.
    with FakeLLM(status=503, fail_times=3, retry_after="0",
                 error_body='{"error": {"message": "overloaded"}}') as llm:
        server = make_server(env={"OPENAI_BASE_URL": llm.base_url,
                                  "OFFLOAD_RETRY_BASE_S": "0.5"})
        with server.client() as client:
            job = wait_job(client, submit(client, "chat", input=QUESTION)["id"])
    assert job["state"] == "completed" and job["attempt"] == 2, job
    assert job["earlier_errors"][0]["type"] == "provider"
    assert "503" in job["earlier_errors"][0]["message"]


def test_a_rejected_key_is_not_retried(make_server: MakeServer) -> None:
    with FakeLLM(status=401, error_body='{"error": {"message": "bad key"}}') as llm:
        server = make_server(env={"OPENAI_BASE_URL": llm.base_url})
        with server.client() as client:
            job = wait_job(client, submit(client, "chat", input=QUESTION,
                                          max_attempts=3)["id"])
    assert job["state"] == "failed" and job["attempt"] == 1, job
    assert not job["earlier_errors"] and len(llm.requests) == 1


def test_a_lost_job_is_failed_once_its_attempts_are_used(make_server: MakeServer) -> None:
    server = make_server(env={"OFFLOAD_RETRY_BASE_S": "0.2"})
    with server.client() as client:
        lost = wait_job(client, submit(client, "probe", input={"exit_code": 9},
                                       max_attempts=2)["id"])
        failed = wait_job(client, submit(client, "probe", input={"fail": "bad input"},
                                         max_attempts=2)["id"])
    assert lost["state"] == "failed" and lost["error"]["type"] == "lost", lost
    assert lost["attempt"] == 2 and len(lost["earlier_errors"]) == 1
    assert failed["state"] == "failed" and failed["attempt"] == 1, failed  # never retried


def test_a_cancel_during_the_backoff_cancels_the_job(make_server: MakeServer) -> None:
    server = make_server(env={"OFFLOAD_RETRY_BASE_S": "600", "OFFLOAD_RETRY_MAX_S": "600"})
    with server.client() as client:
        job = submit(client, "probe", input={"exit_code": 9}, max_attempts=3)
        # Its backoff is random from 0 to 600 s: attempt 2 waits, queued, meanwhile.
        waiting = wait_for(lambda: (j := client.get(f"/api/jobs/{job['id']}").json())
                           ["attempt"] == 2 and j, 30, 0.05, "attempt 2 queued")
        answer = client.delete(f"/api/jobs/{job['id']}")
    assert waiting["state"] == "queued" and waiting["run_at"] is not None, waiting
    assert answer.status_code == 200, answer.text
    cancelled = answer.json()
    assert cancelled["state"] == "cancelled" and cancelled["attempt"] == 2, cancelled


def test_a_runner_lost_while_no_supervisor_watched_is_retried_by_the_next(
        make_server: MakeServer) -> None:
    first = make_server()
    with first.client() as client:
        job = submit(client, input={"seconds": 30}, max_attempts=2)
        delayed = submit(client, input={"seconds": 0}, delay_s=4)
        running = wait_job(client, job["id"], "running")
    first.stop()
    os.kill(running["pid"], signal.SIGKILL)
    second = make_server(env={"OFFLOAD_RETRY_BASE_S": "0.2"})
    with second.client() as client:
        retried = wait_for(lambda: (j := client.get(f"/api/jobs/{job['id']}").json())
                           ["attempt"] == 2 and j["state"] == "running" and j, 60, 0.05,
                           "attempt 2 running")
        later = wait_job(client, delayed["id"])
        cancelled = client.delete(f"/api/jobs/{job['id']}").json()
    assert retried["attempt"] == 2 and retried["pid"] != running["pid"], retried
    assert [e["type"] for e in retried["earlier_errors"]] == ["lost"]
    assert cancelled["state"] == "cancelled" and cancelled["attempt"] == 2
    created = datetime.fromisoformat(later["created_at"].replace("Z", "+00:00"))
    assert later["state"] == "completed"
    assert started(later) >= created + timedelta(seconds=4), later  # its run_at, remembered


def test_a_job_set_aside_for_its_kinds_cap_starts_when_the_one_sent_back_never_does(
        make_server: MakeServer) -> None:
    """Under `sleep=1`, the job given the freed place is cancelled before it starts:
    the next one set aside still starts."""
    server = make_server(env={"OFFLOAD_KIND_CAPS": "sleep=1"})
    with server.client() as client:
        first = submit(client, input={"seconds": 2})
        wait_job(client, first["id"], "running")
        given, after = (submit(client, input={"seconds": 0})["id"] for _ in range(2))
        assert client.post("/api/queue/pause").json()["paused"] is True
        wait_job(client, first["id"], "completed")
        assert client.delete(f"/api/jobs/{given}").json()["state"] == "cancelled"
        client.post("/api/queue/resume")
        assert wait_job(client, after, timeout=30)["state"] == "completed"


def test_a_job_its_kinds_cap_holds_back_is_not_shown_next(make_server: MakeServer) -> None:
    # It showed 0, "next", while a job of another kind queued behind it started first.
    server = make_server(env={"OFFLOAD_MAX_CONCURRENT": "1", "OFFLOAD_KIND_CAPS": "sleep=1",
                              "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})
    with server.client() as client:
        busy = submit(client, input={"seconds": 60})
        wait_for(lambda: client.get(f"/api/jobs/{busy['id']}").json()["state"] == "running",
                 30, 0.05, "the sleep cap taken")
        held = submit(client, input={"seconds": 0}, priority=20)  # ahead of the chat (10)
        chat = submit(client, "chat", input=QUESTION)

        def position(job: dict[str, Any]) -> Any:
            return client.get(f"/api/jobs/{job['id']}").json()["queue_position"]

        # The API's index sees the busy job run within a refresh or two (0.25 s each).
        wait_for(lambda: position(held) is None and position(chat) == 0, 30, 0.1,
                 "the chat next, the sleep job held by its kind's cap")
        # A cap raised while running gives it its place again.
        assert client.put("/api/queue/cap", json={"kind": "sleep",
                                                  "max_concurrent": 2}).status_code == 200
        wait_for(lambda: position(held) == 0, 30, 0.1, "the sleep job's place")
        assert position(chat) == 1
        typo = client.put("/api/queue/cap", json={"kind": "slep", "max_concurrent": 2})
        assert typo.status_code == 422
        assert typo.json()["detail"].startswith("unknown job kind 'slep'; known kinds: chat, ")
        for job in (busy, held, chat):
            client.delete(f"/api/jobs/{job['id']}")
