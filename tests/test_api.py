"""The HTTP API end to end, against a real uvicorn server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psutil
import pytest

from jobs import protocol as p
from tests.conftest import process_gone, small_disk, wait_for, wait_job
from tests.fake_llm import FakeLLM
from tests.server import Server, applied, read_events

MakeServer = Callable[..., Server]


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    with FakeLLM(pieces=["The ", "CPU ", "is ", "fine."], delay_s=0.4) as fake:
        yield fake


@pytest.fixture
def server(make_server: MakeServer, llm: FakeLLM) -> Server:
    return make_server(env={"OPENAI_BASE_URL": llm.base_url, "OFFLOAD_MAX_CONCURRENT": "4"})



def test_seed_frontend_flow(server: Server) -> None:
    """POST /api/ai_chat_async, then poll once a second until `completed`, as the seed does."""
    with server.client() as client:
        started = time.perf_counter()
        answer = client.post("/api/ai_chat_async", json={
            "messages": [{"role": "user", "content": "How is the CPU?"}], "session_id": "s1"})
        assert answer.status_code == 200
        body = answer.json()
        assert body["status"] == "processing" and p.is_valid_id(body["job_id"])
        assert time.perf_counter() - started < 2.0
        seen = []
        for _ in range(30):
            result = client.get(f"/api/ai_chat_result/{body['job_id']}").json()
            seen.append(result["status"])
            if result["status"] == "processing":
                assert result["state"] in ("queued", "running"), result
            if result["status"] in ("completed", "error"):
                break
            time.sleep(1)
    assert result.pop("usage")["completion_tokens"] == 4
    assert result == {"status": "completed", "state": None, "reply": "The CPU is fine.",
                      "message": None}
    assert seen[0] == "processing"


def test_chat_result_errors_and_unknown_ids(make_server: MakeServer) -> None:
    server = make_server(env={"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})
    with server.client() as client:
        job_id = client.post("/api/ai_chat_async", json={
            "messages": [{"role": "user", "content": "hi"}]}).json()["job_id"]
        result = wait_for(lambda: (r := client.get(f"/api/ai_chat_result/{job_id}").json())
                          ["status"] != "processing" and r, 30)
        assert result["status"] == "error"
        # The whole address, and the setting that gives it: that is what to mend.
        assert "LLM server not reachable at http://127.0.0.1:9/v1 (OPENAI_BASE_URL): connection " \
            "refused" in result["message"]
        assert client.get(f"/api/ai_chat_result/{'0' * 32}").json() == {
            "status": "not_found", "state": None, "reply": None, "usage": None,
            "message": None}
        bad = client.get("/api/ai_chat_result/not-an-id")
        assert bad.status_code == 404 and bad.json() == {  # its fields always there too
            "status": "not_found", "state": None, "reply": None, "usage": None,
            "message": None, "detail": "job ids are 32 lowercase hex characters"}
        # A result that is not a chat's (a kind of one's own, a hand edit) answered 500.
        other = client.post("/api/jobs", json={"kind": "probe", "input": {}}).json()["id"]
        wait_for(lambda: client.get(f"/api/jobs/{other}").json()["state"] == "completed", 30)
        job_file = server.data_dir / "jobs" / other / p.JOB_FILE
        results: list[dict[str, Any]] = [{"reply": 5}, {"reply": "hi", "usage": "x"},
                                         {"usage": {"prompt_tokens": 12.5}}]
        for result in results:
            job_file.write_text(json.dumps({**json.loads(job_file.read_text()),
                                            "result": result}))

            def written(result: dict[str, Any] = result) -> bool:
                return bool(client.get(f"/api/jobs/{other}").json()["result"] == result)

            wait_for(written, 30)
            answer = client.get(f"/api/ai_chat_result/{other}")
            assert answer.status_code == 200, answer.text
            assert answer.json()["status"] == "completed" and answer.json()["usage"] is None
        # A sleep's id: no chat has it (it answered "completed" with an empty reply).
        nap = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0}}).json()
        wait_for(lambda: client.get(f"/api/jobs/{nap['id']}").json()["state"] == "completed", 30)
        assert client.get(f"/api/ai_chat_result/{nap['id']}").json()["status"] == "not_found"
        empty = client.post("/api/ai_chat_async", json={"messages": []})
        assert empty.status_code == 422
        assert "messages" in empty.json()["detail"]


def test_submit_get_list_and_log(server: Server) -> None:
    with server.client() as client:
        answer = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0.5}})
        assert answer.status_code == 202
        job = answer.json()
        assert answer.headers["location"] == f"/api/jobs/{job['id']}"
        assert job["state"] == "queued" and job["input"] == {"seconds": 0.5}
        final = wait_job(client, job["id"])
        assert final["state"] == "completed"
        assert final["result"]["slept_s"] == 0.5
        client.post("/api/jobs", json={"kind": "probe", "input": {"fail": "bad luck"}})
        listed = client.get("/api/jobs").json()["jobs"]
        assert listed[-1]["id"] == job["id"], "newest first"
        sleeps = client.get("/api/jobs", params={"kind": "sleep"}).json()["jobs"]
        assert [each["id"] for each in sleeps] == [job["id"]]
        failed = wait_for(lambda: client.get("/api/jobs", params={"state": "failed"})
                          .json()["jobs"], 30)
        assert failed[0]["error"]["message"] == "bad luck"
        # Given again, any of them (one of two was taken, quietly).
        either = client.get("/api/jobs", params={"state": ["failed", "completed"],
                                                 "kind": ["probe", "sleep"]}).json()["jobs"]
        assert [each["id"] for each in either] == [failed[0]["id"], job["id"]], either
        typo = client.get("/api/jobs", params={"kind": ["sleep", "slep"]})
        assert typo.status_code == 422 and "'slep'" in typo.json()["detail"], typo.text
        typo = client.get("/api/jobs", params={"kind": "slep", "before": job["id"]})
        assert typo.status_code == 422, "a next page's typo too: not an empty page"
        log = client.get(f"/api/jobs/{failed[0]['id']}/log")
        assert log.status_code == 200 and log.headers["content-type"].startswith("text/plain")
        assert "error: bad luck" in log.text


def test_a_listing_pages_through_every_job(make_server: Callable[..., Server],
                                           data_dir: Path) -> None:
    # A listing gives at most 1000: `next_before` reaches the older ones, as a cursor.
    from jobs.store.job_store import JobStore

    store, later = JobStore(data_dir / "jobs"), p.iso(time.time() + 3600)
    made = {store.create("sleep", {"seconds": 0}, 30, fields={p.F_RUN_AT: later})["id"]
            for _ in range(25)}
    server = make_server()
    with server.client() as client:
        pages: list[list[dict[str, Any]]] = []
        before: str | None = None
        while before is not None or not pages:
            query: dict[str, str | int] = {"state": "queued", "limit": 10}
            if before is not None:
                query["before"] = before
            page = client.get("/api/jobs", params=query).json()
            pages.append(page["jobs"])
            before = page["next_before"]
            if len(pages) == 1:  # one submitted meanwhile is the newest: no later page has it
                client.post("/api/jobs", json={"kind": "sleep", "input": {}, "delay_s": 600})
        assert [len(each) for each in pages] == [10, 10, 5]
        listed = [job for each in pages for job in each]
        assert sorted(job["id"] for job in listed) == sorted(made), "each job once"
        created = [job["created_at"] for job in listed]
        assert created == sorted(created, reverse=True), "newest first throughout"
        assert pages[0][-1]["id"] == client.get("/api/jobs", params={
            "state": "queued", "limit": 11}).json()["jobs"][-1]["id"]
        everything = client.get("/api/jobs", params={"limit": 1000}).json()
        assert len(everything["jobs"]) == 26 and everything["next_before"] is None
        gone = client.get("/api/jobs", params={"before": "0" * 32})
        assert gone.status_code == 400
        assert "list again without `before`" in gone.json()["detail"]
        assert client.get("/api/jobs", params={"before": "x" * 65}).status_code == 422
        # No id at all: it was said to be a job pruned since.
        typo = client.get("/api/jobs", params={"before": "3f2a9c0e"})
        assert typo.status_code == 400, typo.text
        assert typo.json()["detail"] == ("'3f2a9c0e' is no job's id (32 lowercase hex "
                                         "characters): give `before` a listing's `next_before`")


def test_times_are_iso_utc_with_milliseconds_on_every_route(server: Server) -> None:
    """As the job file and /api/history have them: a job's GET, listing and events once
    answered pydantic's microseconds ('...12.345000Z'), and a whole second with none."""
    millis = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
    tomorrow = time.strftime("%Y-%m-%dT03:00:00Z", time.gmtime(time.time() + 86400))
    with server.client() as client:
        done = client.post("/api/jobs", json={"kind": "sleep", "input": {}}).json()
        wait_job(client, done["id"])
        later = client.post("/api/jobs", json={"kind": "sleep", "run_at": tomorrow}).json()
        for job_id, fields in ((done["id"], ("created_at", "started_at", "finished_at")),
                               (later["id"], ("created_at", "run_at"))):
            on_disk = json.loads((server.data_dir / "jobs" / job_id / "job.json").read_text())
            listed = next(j for j in client.get("/api/jobs").json()["jobs"] if j["id"] == job_id)
            answers = [client.get(f"/api/jobs/{job_id}").json(), listed]
            if job_id == done["id"]:
                answers.append(read_events(client, job_id)[0].fields)
            for answer in answers:
                for field in fields:
                    assert millis.fullmatch(answer[field]), (field, answer[field])
                    assert answer[field] == on_disk[field]
        assert later["run_at"] == tomorrow.replace("Z", ".000Z")


def test_rerun_a_finished_job_as_it_was_or_edited(make_server: MakeServer) -> None:
    server = make_server(env={"OFFLOAD_MAX_CONCURRENT": "1"})
    with server.client() as client:
        first = client.post("/api/jobs", json={"kind": "sleep", "timeout_s": 50,
                                               "input": {"seconds": 60}}).json()
        early = client.post(f"/api/jobs/{first['id']}/rerun")
        assert early.status_code == 409 and "cancel it first" in early.json()["detail"]
        assert client.delete(f"/api/jobs/{first['id']}").json()["state"] == "cancelled"

        again = client.post(f"/api/jobs/{first['id']}/rerun")
        assert again.status_code == 202
        job = again.json()
        assert again.headers["location"] == f"/api/jobs/{job['id']}"
        assert job["id"] != first["id"] and job["rerun_of"] == first["id"]
        assert (job["kind"], job["input"], job["timeout_s"]) == ("sleep", {"seconds": 60}, 50)
        client.delete(f"/api/jobs/{job['id']}")

        edited = client.post(f"/api/jobs/{first['id']}/rerun",
                             json={"input": {"seconds": 0.1}, "timeout_s": 5}).json()
        assert (edited["input"], edited["timeout_s"]) == ({"seconds": 0.1}, 5)
        assert wait_job(client, edited["id"])["state"] == "completed"

        bad = client.post(f"/api/jobs/{first['id']}/rerun", json={"input": {"seconds": -1}})
        assert bad.status_code == 422 and "input.seconds" in bad.json()["detail"]
        unknown = client.post(f"/api/jobs/{'0' * 32}/rerun")
        assert unknown.status_code == 404
        assert client.get(f"/api/jobs/{first['id']}").json()["state"] == "cancelled"

        # Sent again with its key once the old job was removed: it answered a 404, where it
        # now answers the re-run it made; another body with that key is still refused.
        keyed = client.post(f"/api/jobs/{edited['id']}/rerun", headers={"Idempotency-Key": "r"})
        assert client.post(f"/api/jobs/{edited['id']}/remove").status_code == 200
        resent = client.post(f"/api/jobs/{edited['id']}/rerun", headers={"Idempotency-Key": "r"})
        assert resent.status_code == 202 and resent.json()["id"] == keyed.json()["id"], resent.text
        for otherwise in ({"input": {"seconds": 0.2}}, {"timeout_s": 7}):
            refused = client.post(f"/api/jobs/{edited['id']}/rerun", json=otherwise,
                                  headers={"Idempotency-Key": "r"})
            assert refused.status_code == 422, (otherwise, refused.text)
            assert "different request body" in refused.json()["detail"], refused.text
        other = client.post(f"/api/jobs/{edited['id']}/rerun", headers={"Idempotency-Key": "s"})
        assert other.status_code == 404, other.text  # a key of nothing: the job is gone


def test_cancel_running_queued_and_finished(make_server: MakeServer) -> None:
    server = make_server(env={"OFFLOAD_MAX_CONCURRENT": "1"})
    with server.client() as client:
        running = client.post("/api/jobs", json={
            "kind": "probe", "input": {"seconds": 60, "spawn_child": True}}).json()
        queued = client.post("/api/jobs", json={"kind": "sleep", "input": {}}).json()
        job = wait_for(lambda: (j := client.get(f"/api/jobs/{running['id']}").json())
                       .get("pid") and j["progress"] and j, 30)
        assert client.get(f"/api/jobs/{queued['id']}").json()["queue_position"] == 0

        answer = client.delete(f"/api/jobs/{queued['id']}")
        assert answer.status_code == 200 and answer.json()["state"] == "cancelled"
        answer = client.delete(f"/api/jobs/{running['id']}")
        assert answer.status_code == 200 and answer.json()["state"] == "cancelled"
        wait_for(lambda: process_gone(job["pid"]), 10)
        again = client.delete(f"/api/jobs/{running['id']}")
        assert again.status_code == 409
        assert "already finished" in again.json()["detail"]
        # The job as a GET shows it (it was the file's raw fields).
        assert again.json()["job"] == client.get(f"/api/jobs/{running['id']}").json()
        assert client.get(f"/api/jobs/{queued['id']}").json()["started_at"] is None


def test_jobs_cancelled_together_with_those_that_depend_on_them_all_read_cancelled(
        make_server: MakeServer) -> None:
    """As `pueue kill 1 2 3`: one request for a chain, the ids in any order. The supervisor
    takes the stops it is rung with in no set order: one that ended the chain's head first
    failed the job after it (dependency), its own stop standing unlooked at."""
    server = make_server(env={"OFFLOAD_MAX_CONCURRENT": "1"})
    with server.client() as client:
        done = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0}}).json()
        assert wait_job(client, done["id"])["state"] == "completed"
        chain = [client.post("/api/jobs", json={"kind": "sleep",
                                                "input": {"seconds": 60}}).json()["id"]]
        wait_job(client, chain[0], "running")
        for _ in range(20):
            chain.append(client.post("/api/jobs", json={
                "kind": "sleep", "input": {"seconds": 0}, "depends_on": chain[-1]}).json()["id"])
        gone = "0" * 32
        given = [*chain[::2], done["id"].upper(), gone, *chain[1::2], chain[3]]
        answer = client.post("/api/jobs/cancel", json={"ids": given})
        assert answer.status_code == 200, answer.text
        together = answer.json()
        assert sorted(job["id"] for job in together["jobs"]) == sorted(chain)
        assert {(job["state"], job["error"]["type"]) for job in together["jobs"]} == {
            ("cancelled", "cancelled")}, together["jobs"]
        assert [job["id"] for job in together["finished"]] == [done["id"]]
        assert together["finished"][0]["state"] == "completed"
        assert together["missing"] == [gone]
        for job_id in chain:
            assert client.get(f"/api/jobs/{job_id}").json()["state"] == "cancelled"
        again = client.post("/api/jobs/cancel", json={"ids": chain[-1]}).json()
        assert (again["jobs"], [job["id"] for job in again["finished"]]) == ([], [chain[-1]])

        for body, said in (({"ids": []}, "a list of 1 to 1000"), ({}, "ids"),
                           ({"ids": ["12"]}, "'12' is no job's id"),
                           ({"ids": [f"{n:032x}" for n in range(1001)]}, "at most 1000")):
            refused = client.post("/api/jobs/cancel", json=body)
            assert refused.status_code == 422 and said in refused.json()["detail"], refused.text


def test_jobs_cancelled_together_one_of_them_unwritable_say_which(server: Server) -> None:
    """A folder that takes no cancel request among several: the answer said "The job was
    not cancelled", of no job, though the requests left before it stood, unrung until the
    supervisor's next sweep. It names that job, and says the others were cancelled."""
    import subprocess

    with server.client() as client:
        assert client.post("/api/queue/pause").status_code == 200
        # Asked newest first: the newer one's request is left before the older's fails.
        stuck, other = (client.post("/api/jobs", json={"kind": "sleep"}).json()["id"]
                        for _ in range(2))
        folder = server.data_dir / "jobs" / stuck
        subprocess.run(["chattr", "+i", str(folder)], check=True)
        try:
            answer = client.post("/api/jobs/cancel", json={"ids": [stuck, other]})
            assert answer.status_code == 503, answer.text
            said = answer.json()["detail"]
            assert f"Job {stuck} was not cancelled, nor 0 more of them; the other 1 were" in (
                said), said
            assert wait_job(client, other)["state"] == "cancelled"
            assert client.get(f"/api/jobs/{stuck}").json()["state"] == "queued"
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        assert client.delete(f"/api/jobs/{stuck}").json()["state"] == "cancelled"


def test_remove_a_finished_job_now(make_server: MakeServer) -> None:
    """As `pueue remove`, RQ's `job.delete()`: a finished job goes at once, with its
    folder and Idempotency-Key; a live one, or one a queued job waits for, stays."""
    server = make_server(env={"OFFLOAD_MAX_CONCURRENT": "1"})
    with server.client() as client:
        done = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0}},
                           headers={"Idempotency-Key": "nightly-1"}).json()
        assert wait_job(client, done["id"])["state"] == "completed"
        later = client.post("/api/jobs", json={"kind": "sleep", "input": {},
                                               "delay_s": 3600}).json()
        waiting = client.post("/api/jobs", json={"kind": "sleep", "input": {},
                                                 "depends_on": [done["id"], later["id"]]}).json()
        kept = client.post(f"/api/jobs/{done['id']}/remove")
        assert kept.status_code == 409 and waiting["id"] in kept.json()["detail"], kept.text
        assert "remove it once they have ended" in kept.json()["detail"]
        live = client.post(f"/api/jobs/{later['id']}/remove")
        assert live.status_code == 409 and "cancel it first" in live.json()["detail"], live.text
        # A running dependent too: a second attempt would find its dependency gone.
        running = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 60},
                                                 "depends_on": done["id"]}).json()
        wait_job(client, running["id"], "running")
        kept = client.post(f"/api/jobs/{done['id']}/remove")
        assert kept.status_code == 409 and running["id"] in kept.json()["detail"], kept.text
        assert client.delete(f"/api/jobs/{running['id']}").json()["state"] == "cancelled"

        assert client.delete(f"/api/jobs/{waiting['id']}").json()["state"] == "cancelled"
        removed = client.post(f"/api/jobs/{done['id']}/remove")
        assert removed.status_code == 200, removed.text
        assert (removed.json()["id"], removed.json()["state"]) == (done["id"], "completed")
        folder = server.data_dir / "jobs" / done["id"]
        assert not folder.exists()
        for path in (f"/api/jobs/{done['id']}", f"/api/jobs/{done['id']}/log"):
            assert client.get(path).status_code == 404, path
        assert done["id"] not in [job["id"] for job in client.get("/api/jobs").json()["jobs"]]
        assert client.post(f"/api/jobs/{done['id']}/remove").status_code == 404
        # Its key is free again: the same key makes a new job.
        again = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0}},
                            headers={"Idempotency-Key": "nightly-1"}).json()
        assert again["id"] != done["id"]
        client.delete(f"/api/jobs/{later['id']}")


def test_a_job_removed_as_another_is_stored_depending_on_it_is_one_or_the_other(
        make_server: MakeServer) -> None:
    """A removal and a submission that depends on the removed job, at the same moment:
    either the submission is refused (422, no such job) and the removal done, or the job is
    stored and the removal refused (409, a job not ended needs it). Never both: a job
    stored (202) whose dependency is removed a moment after its check fails `dependency`
    ("is gone") for a job it was told was there."""
    import threading

    server = make_server()
    both = []

    def at_once(start: threading.Barrier, answers: dict[str, Any], name: str, method: str,
                path: str, body: dict[str, Any] | None = None) -> threading.Thread:
        def send() -> None:
            with server.client() as own:
                start.wait()
                answers[name] = own.request(method, path, json=body)
        thread = threading.Thread(target=send)
        thread.start()
        return thread

    with server.client() as client:
        for _ in range(30):
            done = client.post("/api/jobs", json={"kind": "sleep", "input": {}}).json()
            assert wait_job(client, done["id"])["state"] == "completed"
            answers: dict[str, Any] = {}
            start = threading.Barrier(2)
            threads = [
                at_once(start, answers, "submit", "POST", "/api/jobs", {
                    "kind": "sleep", "input": {}, "delay_s": 3600, "depends_on": done["id"]}),
                at_once(start, answers, "remove", "POST", f"/api/jobs/{done['id']}/remove")]
            for thread in threads:
                thread.join()
            stored, removed = answers["submit"], answers["remove"]
            assert (stored.status_code, removed.status_code) in ((202, 409), (422, 200)), (
                stored.text, removed.text)
            if stored.status_code == 202:
                both.append(stored.json()["id"])
        for job_id in both:  # each still waits for its dependency, not failed for its loss
            job = client.get(f"/api/jobs/{job_id}").json()
            assert job["state"] == "queued", job
            client.delete(f"/api/jobs/{job_id}")
        # One job removed by several requests at once: one removes it, the others find
        # no job (as they would a moment later), not each "removed".
        done = client.post("/api/jobs", json={"kind": "sleep", "input": {}}).json()
        assert wait_job(client, done["id"])["state"] == "completed"
        answers, start = {}, threading.Barrier(4)
        threads = [at_once(start, answers, str(n), "POST", f"/api/jobs/{done['id']}/remove")
                   for n in range(4)]
        for thread in threads:
            thread.join()
        assert sorted(answer.status_code for answer in answers.values()) == [200, 404, 404, 404]


def test_a_job_cancelled_far_back_in_the_queue_is_so_at_once(make_server: MakeServer) -> None:
    # The index looks at a queued job past the first 64 in line once a second: one
    # cancelled there was listed queued a moment more, and kept the job it depends on.
    server = make_server()
    with server.client() as client:
        done = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0}}).json()
        assert wait_job(client, done["id"])["state"] == "completed"
        assert client.post("/api/queue/pause").status_code == 200
        sleeps = [{"kind": "sleep", "input": {"seconds": 0}}] * 80
        batch = client.post("/api/jobs/batch", json={"jobs": [
            *sleeps, {"kind": "sleep", "input": {"seconds": 0}, "depends_on": done["id"]}]})
        assert batch.status_code == 202, batch.text
        last = batch.json()["jobs"][-1]["id"]
        wait_for(lambda: client.get(f"/api/jobs/{last}").json()["queue_position"] == 80,
                 what="the last job's place")
        time.sleep(0.3)  # the index has looked at it, and will not for a while
        assert client.delete(f"/api/jobs/{last}").json()["state"] == "cancelled"
        queued = client.get("/api/jobs", params={"state": "queued", "limit": 1000}).json()
        assert last not in [job["id"] for job in queued["jobs"]]
        assert client.post(f"/api/jobs/{done['id']}/remove").status_code == 200
        client.post("/api/queue/resume")


def test_a_chat_turn_is_kept_while_its_conversation_goes_on(server: Server) -> None:
    # Earlier turns are a turn's context: removing one lost it from the answer under way.
    def turn(text: str) -> str:
        return str(client.post("/api/jobs", json={"kind": "chat", "input": {
            "messages": [{"role": "user", "content": text}], "session_id": "s-keep"}}
        ).json()["id"])

    with server.client() as client:
        first = turn("cpu?")
        assert wait_job(client, first)["state"] == "completed"
        second = turn("and memory?")
        assert wait_job(client, second)["state"] == "completed"
        third = turn("and disk?")  # it follows the second, and reads back to the first
        kept = client.post(f"/api/jobs/{first}/remove")
        assert kept.status_code == 409 and third in kept.json()["detail"], kept.text
        assert wait_job(client, third)["state"] == "completed"
        assert client.post(f"/api/jobs/{first}/remove").status_code == 200


def test_events_stream_every_change_and_close(server: Server) -> None:
    with server.client() as client:
        job = client.post("/api/jobs", json={"kind": "sleep",
                                             "input": {"seconds": 1.5, "steps": 5}}).json()
        with client.stream("GET", f"/api/jobs/{job['id']}/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
        events = applied(read_events(client, job["id"]))
    states = [e["state"] for e in events]
    assert states[-1] == "completed", "the stream closes after the final state"
    assert "running" in states
    fractions = [e["progress"]["fraction"] for e in events if e["progress"]]
    assert len(set(fractions)) >= 4, f"every progress write should reach the stream: {fractions}"
    assert fractions == sorted(fractions)


@pytest.mark.parametrize("notify", ["1", "0"], ids=["notified", "polled"])
def test_a_follower_sees_each_write_of_a_job(make_server: MakeServer, llm: FakeLLM,
                                             notify: str) -> None:
    """With change notifications, and without them (the poll every stream falls back on)."""
    server = make_server(env={"OPENAI_BASE_URL": llm.base_url, "OFFLOAD_EVENT_NOTIFY": notify})
    with server.client() as client:
        job = client.post("/api/jobs", json={"kind": "sleep",
                                             "input": {"seconds": 2, "steps": 4}}).json()
        events = applied(read_events(client, job["id"]))
    fractions = [e["progress"]["fraction"] for e in events if e["progress"]]
    # Half a second apart, each step's write is an event (the last one's may be the end's).
    assert list(dict.fromkeys(fractions)) == [0.25, 0.5, 0.75, 1.0], fractions
    assert events[-1]["state"] == "completed"


def test_chat_output_streams_over_events(server: Server) -> None:
    with server.client() as client:
        job = client.post("/api/jobs", json={"kind": "chat", "input": {
            "messages": [{"role": "user", "content": "cpu?"}]}}).json()
        outputs = [e["output"] for e in applied(read_events(client, job["id"]))]
    assert outputs[-1] == "The CPU is fine."
    assert len({o for o in outputs if o}) >= 3, f"partial output should stream: {outputs}"


BAD_PATHS = ["/api/jobs/..%2F..%2Fetc%2Fpasswd", "/api/jobs/ABCDEF" + "0" * 26,
             "/api/jobs/" + "a" * 31, "/api/jobs/" + "a" * 33, "/api/jobs/%2e%2e",
             "/api/jobs/" + "a" * 32 + "%00", "/api/jobs/" + "a" * 10_000]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_bad_ids_are_404_for_every_job_route(server: Server, path: str) -> None:
    with server.client() as client:
        for method, suffix in [("GET", ""), ("DELETE", ""), ("GET", "/log"),
                               ("GET", "/events"), ("POST", "/remove")]:
            answer = client.request(method, path + suffix)
            # A NUL in a path is refused before any route (the guard's control characters).
            expected = 400 if "%00" in path else 404
            assert answer.status_code == expected, (method, path + suffix, answer.text[:200])
            assert "detail" in answer.json()
            assert len(answer.text) < 500  # the message quotes no whole id sent


def test_a_path_that_is_not_utf8_names_no_other_session(server: Server) -> None:
    """`%FF` (no UTF-8) was read as U+FFFD, so a GET or a DELETE of such a path read or
    forgot the conversation whose id is "\ufffd"; it is a 400 that says how to encode."""
    with server.client() as client:
        turn = client.post("/api/ai_chat_async", json={
            "messages": [{"role": "user", "content": "hi"}], "session_id": "\ufffd"})
        assert turn.status_code == 200, turn.text
        for path in ("/api/sessions/%FF", "/api/sessions/%ED%A0%80", "/api/jobs/%FF"):
            for method in ("GET", "DELETE"):
                answer = client.request(method, path)
                assert answer.status_code == 400, (method, path, answer.text[:200])
                assert "percent-encode the UTF-8 bytes" in answer.json()["detail"], answer.text
        kept = client.get("/api/sessions/%EF%BF%BD")  # U+FFFD itself, encoded
        assert kept.status_code == 200, kept.text
        assert [t["job_id"] for t in kept.json()["turns"]] == [turn.json()["job_id"]]


def test_a_parameter_taken_once_and_sent_twice_is_a_422(server: Server) -> None:
    """The framework took one of them quietly: `fields=summary&fields=full` answered in
    full, `limit=1&limit=1000` a thousand jobs. Those taken again (`state`, `kind`) list
    the jobs of any of them, as before."""
    with server.client() as client:
        job_id = client.post("/api/jobs", json={"kind": "sleep", "input": {}}).json()["id"]
        twice: list[tuple[str, dict[str, list[str]], str]] = [
            ("/api/jobs", {"fields": ["summary", "full"]}, "query.fields"),
            ("/api/jobs", {"limit": ["1", "1000"]}, "query.limit"),
            ("/api/jobs", {"before": [job_id, job_id]}, "query.before"),
            (f"/api/jobs/{job_id}", {"wait_s": ["0", "1"]}, "query.wait_s"),
            (f"/api/jobs/{job_id}/events", {"after": ["0", "1"]}, "query.after"),
            ("/api/history", {"seconds": ["5", "6"]}, "query.seconds"),
            ("/api/predict", {"horizon": ["1", "2"]}, "query.horizon"),
        ]
        for path, params, named in twice:
            answer = client.get(path, params=params)
            assert answer.status_code == 422, (path, params, answer.text[:200])
            assert answer.json()["detail"] == (f"invalid request: {named}: given 2 times; "
                                               "give it once"), answer.text
        keys = client.post("/api/jobs", json={"kind": "sleep", "input": {}},
                           headers=[("Idempotency-Key", "a"), ("Idempotency-Key", "b")])
        assert keys.status_code == 422, keys.text
        assert "Idempotency-Key: given 2 times; give it once" in keys.json()["detail"]
        resumed = client.get(f"/api/jobs/{job_id}/events",
                             headers=[("Last-Event-ID", "0"), ("Last-Event-ID", "1")])
        assert resumed.status_code == 422, resumed.text[:200]
        assert "last-event-id: given 2 times; give it once" in resumed.json()["detail"]
        either = client.get("/api/jobs", params={
            "state": ["queued", "running", "completed"], "kind": ["sleep", "chat"]})
        assert either.status_code == 200, either.text
        assert [job["id"] for job in either.json()["jobs"]] == [job_id]
    assert len(list((server.data_dir / "jobs").glob("*/job.json"))) == 1


def test_a_wrong_method_is_405_and_an_unknown_path_404(server: Server) -> None:
    # Every method: OPTIONS, TRACE and methods of one's own reached the static files, whose
    # 405 said `Allow: GET, HEAD` for any path.
    with server.client() as client:
        for method, path, takes in [("PUT", "/api/queue", "GET, HEAD"),
                                    ("POST", "/api/history", "GET, HEAD"),
                                    ("TRACE", "/api/queue/pause", "POST"),
                                    ("FOO", "/api/jobs", "GET, HEAD, POST"),
                                    ("PATCH", "/api/jobs/" + "a" * 32, "DELETE, GET, HEAD"),
                                    # Routes of their own, no job's id: each was a 404 that
                                    # said `batch` was no job id, or listed a job's methods.
                                    ("GET", "/api/jobs/batch", "POST"),
                                    ("DELETE", "/api/jobs/cancel", "POST"),
                                    ("HEAD", "/api/jobs/cancel", "POST"),
                                    ("PUT", "/api/jobs/batch", "POST")]:
            answer = client.request(method, path)
            assert answer.status_code == 405, (method, path, answer.text[:200])
            assert answer.headers["allow"] == ", ".join(sorted([*takes.split(", "), "OPTIONS"]))
            if method != "HEAD":
                assert f"takes {takes}, not {method}" in answer.json()["detail"]
        options = client.options("/api/jobs")
        assert options.status_code == 204 and options.headers["allow"] == "GET, HEAD, OPTIONS, POST"
        options = client.options("/api/jobs/batch")
        assert options.status_code == 204 and options.headers["allow"] == "OPTIONS, POST"
        # A word that is no job's id, nor a route's, is still a job id mistyped.
        mistyped = client.get("/api/jobs/batches")
        assert mistyped.status_code == 404 and "32 lowercase hex" in mistyped.json()["detail"]
        # A route whose id may hold a slash is one too (it was said to be no route).
        session = client.options("/api/sessions/team%2Falice")
        assert session.status_code == 204, session.text
        assert session.headers["allow"] == "DELETE, GET, HEAD, OPTIONS"
        for method in ("GET", "PUT", "DELETE", "OPTIONS", "TRACE"):
            answer = client.request(method, "/api/nothing/here")
            assert answer.status_code == 404 and "no API route" in answer.json()["detail"]
        # HEAD is GET without the body, as uptime checks send it.
        for path in ("/api/health", "/metrics", "/", "/docs", "/openapi.json"):
            head = client.head(path)
            assert head.status_code == 200 and head.content == b"", (path, head.status_code)


def test_bad_bodies_get_clear_4xx(server: Server) -> None:
    with server.client() as client:
        cases: list[tuple[Any, int, str]] = [
            ({"kind": "nope"}, 422, "known kinds: chat, probe, sleep"),
            ({"kind": "sleep", "input": {"seconds": "x"}}, 422, "input.seconds"),
            # Said as "input.input: Input should be a valid string" (a key), and as that for
            # a number.
            ('{"kind": "sleep", "input": {"\\ud800": 1}}', 422,
             "job: input: holds half of a surrogate pair (not text)"),
            ('{"kind": "sleep", "input": {"seconds": "\\ud800"}}', 422,
             'job: input.seconds: "\\ud800" is no seconds: give a number'),
            ('{"kind": "\\ud800"}', 422, "kind: holds half of a surrogate pair (not text)"),
            # Said as "invalid request: : holds half ...", of no place.
            ('{"kind": "sleep", "\\ud800": 1}', 422,
             "invalid request: a field's name holds half of a surrogate pair (not text)"),
            ({"kind": "sleep", "timeout_s": -1}, 422, "timeout_s"),
            ({"kind": "sleep", "extra": 1}, 422, "extra"),
            ({"kind": "chat", "input": {"messages": [{"role": "robot", "content": "x"}]}},
             422, "role"),
            ("not json", 422, "invalid request"),
            # A flag where a number goes was taken for 1; NaN was said to be too large.
            ({"kind": "sleep", "priority": True}, 422, "true is no priority: give a number"),
            # Text where a number or a flag goes: "5" taken for 5, "no" for false.
            ({"kind": "sleep", "input": {"seconds": "5"}}, 422, '"5" is no seconds: give a '
                                                                 "number"),
            ({"kind": "sleep", "delay_s": "5"}, 422, '"5" is no delay_s: give a number'),
            ({"kind": "chat", "input": {"messages": [{"role": "user", "content": "x"}],
                                        "expert": "no"}}, 422,
             '"no" is no expert: give true or false'),
            ({"kind": "chat", "input": {"messages": [{"role": "user", "content": "x"}],
                                        "expert": 0}}, 422, "0 is no expert: give true or false"),
            ({"kind": "sleep", "input": {"steps": False}}, 422, "false is no steps"),
            ({"kind": "chat", "input": {"messages": [{"role": "user", "content": "x"}],
                                        "max_tokens": True}}, 422, "true is no max_tokens"),
            ('{"kind": "sleep", "input": {"seconds": NaN}}', 422, "finite number"),
            ('{"kind": "sleep", "timeout_s": Infinity}', 422, "finite number"),
            # A kind that takes any JSON object (as one's own may): what no reader could
            # take back was stored, then answered with 500s (or never stored: a 500).
            ({"kind": "probe", "input": {"x": json.loads("[" * 70 + "]" * 70)}}, 422,
             "nested more than 64 levels deep"),
            ('{"kind": "probe", "input": {"x": NaN}}', 422, "nan is not a JSON number"),
            ('{"kind": "probe", "input": {"x": 1e999}}', 422, "inf is not a JSON number"),
            ('{"kind": "probe", "input": {"x": "\\ud800"}}', 422, "half of a surrogate pair"),
            # Taken, then never to be shown or forgotten: /api/sessions/{id} refuses it.
            ({"kind": "chat", "input": {"messages": [{"role": "user", "content": "x"}],
                                        "session_id": "tab\tone"}}, 422,
             "a session_id holds no control character"),
        ]
        for body, status, needle in cases:
            if isinstance(body, str):
                answer = client.post("/api/jobs", content=body,
                                     headers={"content-type": "application/json"})
            else:
                answer = client.post("/api/jobs", json=body)
            assert answer.status_code == status, (body, answer.text)
            assert needle in answer.json()["detail"], (body, answer.text)
            assert "Value error" not in answer.text, (body, answer.text)  # pydantic's, not ours
        # Bodies that cannot be read as a JSON object: each answer says what to send.
        unreadable: list[tuple[bytes, str]] = [
            (b"", "application/json"),
            (b'{"kind": ', "application/json"),
            (b'{"kind": "sleep\xff"}', "application/json"),
            (b'{"kind": "sleep", "input": ' + b"[" * 5000 + b"]" * 5000 + b"}",
             "application/json"),
            (b'{"kind": "sleep", "priority": 1' + b"0" * 5000 + b"}", "application/json"),
            (b'{"kind": "sleep"}', "text/plain"),
            (b"kind=sleep", "application/x-www-form-urlencoded"),
        ]
        for content, content_type in unreadable:
            answer = client.post("/api/jobs", content=content,
                                 headers={"content-type": content_type})
            assert answer.status_code in (400, 422), (content[:40], answer.text)
            assert "Content-Type: application/json" in answer.json()["detail"], (
                content[:40], answer.text)
        # A JSON object refused as a whole: the hint to send JSON would mislead.
        soon = (datetime.now(timezone.utc) + timedelta(minutes=5)).isoformat()
        both = client.post("/api/jobs", json={"kind": "sleep", "delay_s": 1, "run_at": soon})
        assert both.status_code == 422 and "not both" in both.json()["detail"], both.text
        assert "Content-Type" not in both.json()["detail"], both.text
        # A number was taken as POSIX seconds: 3600 meant as a delay was "3.1e5 h in the
        # past; give a time zone", and a time in the future in seconds was taken.
        for number in (3600, str(int(time.time()) + 600)):
            answer = client.post("/api/jobs", json={"kind": "sleep", "run_at": number})
            assert answer.status_code == 422, answer.text
            assert "run_at: not a number but a time in ISO 8601" in answer.json()["detail"]
            assert answer.json()["detail"].endswith(
                "to start in a number of seconds, give delay_s"), answer.text
        zoned = client.post("/api/jobs", json={"kind": "sleep",
                                               "run_at": "2026-01-01T00:00:00+14:00"})
        assert zoned.status_code == 422 and "time zone" not in zoned.json()["detail"], zoned.text
        huge = {"kind": "probe", "input": {"fail": "x" * 2_000_000}}
        answer = client.post("/api/jobs", json=huge)
        assert answer.status_code == 413
        assert "too large" in answer.json()["detail"]

        def chunks() -> Iterator[bytes]:
            yield b'{"kind": "probe", "input": {"fail": "'
            for _ in range(300):
                yield b"x" * 10_000
            yield b'"}}'

        chunked = client.post("/api/jobs", content=chunks(),
                              headers={"content-type": "application/json"})
        assert chunked.status_code == 413
    assert not list((server.data_dir / "jobs").glob("*/job.json")), "nothing was stored"


def test_an_unknown_field_is_named_briefly_with_the_fields_taken(server: Server) -> None:
    """A field no body takes is named, cut short (its whole name, of most of a megabyte,
    was said back), with the fields its object takes, at any depth of any body."""
    long_name = "x" * 900_000
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("/api/jobs", {"kind": "sleep", long_name: 1},
         "(the body takes only: kind, input, timeout_s, priority, run_at, delay_s, "
         "max_attempts, depends_on)"),
        ("/api/jobs", {"kind": "sleep", "input": {long_name: 1}},
         "(a 'sleep' job takes only: seconds, steps)"),
        ("/api/jobs/batch", {"jobs": [{"kind": "sleep", long_name: 1}]},
         "(jobs.0 takes only: kind, input, timeout_s"),
        ("/api/ai_chat_async", {"messages": [{"role": "user", "content": "x", long_name: 1}]},
         "(messages.0 takes only: role, content)"),
        ("/api/jobs/cancel", {"ids": [p.new_id()], long_name: 1}, "(the body takes only: ids)"),
    ]
    with server.client() as client:
        for path, body, taken in cases:
            answer = client.post(path, json=body)
            assert answer.status_code == 422, (path, answer.text[:300])
            detail = answer.json()["detail"]
            assert len(detail) < 400, (path, detail[:300])
            assert "x" * 40 + "…: Extra inputs are not permitted" in detail, detail
            assert taken in detail, detail
        # A right-to-left override and a NUL in a name: said back escaped, as a kind is,
        # never for a terminal that shows the detail (`offload`) to act on.
        for body in ({"kind": "sleep", "\u202e0\x00": 1},
                     {"kind": "sleep", "input": {"\u202e0\x00": 1}}):
            odd = client.post("/api/jobs", json=body)
            assert odd.status_code == 422, odd.text
            assert "\\u202e0\\x00: Extra inputs are not permitted" in odd.json()["detail"]
            assert "\u202e" not in odd.json()["detail"] and "\x00" not in odd.json()["detail"]
        cap = client.put("/api/queue/cap", json={"max_concurrent": 2, "knd": "sleep"})
        assert cap.status_code == 422, cap.text
        assert "knd: Extra inputs are not permitted (the body takes only: max_concurrent, " \
               "kind)" in cap.json()["detail"], cap.text
        two = client.post("/api/jobs", json={"kind": "sleep", "xx": 1, "yy": 2})
        assert two.json()["detail"].count("takes only") == 1, two.text  # said once
    assert not list((server.data_dir / "jobs").glob("*/job.json")), "nothing was stored"


def test_idempotency_key_returns_the_first_job(server: Server) -> None:
    with server.client() as client:
        body = {"kind": "sleep", "input": {"seconds": 0.1}}
        first = client.post("/api/jobs", json=body, headers={"Idempotency-Key": "abc-1"})
        second = client.post("/api/jobs", json=body, headers={"Idempotency-Key": "abc-1"})
        assert first.status_code == second.status_code == 202
        assert first.json()["id"] == second.json()["id"]
        other = client.post("/api/jobs", json={**body, "input": {"seconds": 0.2}},
                            headers={"Idempotency-Key": "abc-1"})
        assert other.status_code == 422
        assert "Idempotency-Key" in other.json()["detail"]
        delayed = {**body, "delay_s": 30}  # the same delay asked again is the same request
        first_delayed = client.post("/api/jobs", json=delayed, headers={"Idempotency-Key": "d"})
        again = client.post("/api/jobs", json=delayed, headers={"Idempotency-Key": "d"})
        assert first_delayed.json()["id"] == again.json()["id"]
        later = client.post("/api/jobs", json={**body, "delay_s": 60},
                            headers={"Idempotency-Key": "d"})
        assert later.status_code == 422, later.text
        assert len(client.get("/api/jobs").json()["jobs"]) == 2
        # A default sent is the default left out: they were "a different request body".
        plain = client.post("/api/jobs", json={"kind": "sleep"}, headers={"Idempotency-Key": "e"})
        for same in ({"priority": 0}, {"max_attempts": 1}, {"timeout_s": 120},
                     {"input": {"seconds": 0, "steps": 10}}, {"depends_on": None},
                     {"delay_s": 0}):
            again = client.post("/api/jobs", json={"kind": "sleep", **same},
                                headers={"Idempotency-Key": "e"})
            assert again.status_code == 202, (same, again.text)
            assert again.json()["id"] == plain.json()["id"], same
        for other_body in ({"priority": 1}, {"max_attempts": 2}, {"input": {"seconds": 2}}):
            refused = client.post("/api/jobs", json={"kind": "sleep", **other_body},
                                  headers={"Idempotency-Key": "e"})
            assert refused.status_code == 422, (other_body, refused.text)
        assert plain.json()["run_at"] is None  # a delay of 0 s too: it may start at once
        chat = {"messages": [{"role": "user", "content": "hi"}]}
        asked = client.post("/api/jobs", json={"kind": "chat", "input": chat},
                            headers={"Idempotency-Key": "f"}).json()
        for option, same_or_not in (({"expert": True}, 202), ({"on_busy": "wait"}, 202),
                                    ({"expert": False}, 422), ({"on_busy": "interrupt"}, 422)):
            again = client.post("/api/jobs", json={"kind": "chat", "input": {**chat, **option}},
                                headers={"Idempotency-Key": "f"})
            assert again.status_code == same_or_not, (option, again.text)
            assert same_or_not == 422 or again.json()["id"] == asked["id"]
        # A key claimed before 0.10, whose fingerprint was of the body as sent: sent again
        # after the upgrade, it was "a different request body".
        from jobs.store.idempotency import key_name
        from jobs.store.job_store import JobStore
        earlier = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 1}}).json()
        JobStore(server.data_dir / "jobs").keys.claim(
            key_name("from-0.9"), earlier["id"],
            "a2bc09155829ba9d796017515f9646bc5c5f642ee8ca67e2f9b6fce82a37ab20")  # as 0.9 made it
        again = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 1}},
                            headers={"Idempotency-Key": "from-0.9"})
        assert again.status_code == 202 and again.json()["id"] == earlier["id"], again.text


def test_a_body_over_the_limit_is_answered_413_however_it_is_sent(server: Server) -> None:
    """A client that sends its whole body before reading hears the 413 (it heard a broken
    pipe); one that waits for `100 Continue` is told at once, and sends nothing."""
    import socket

    host, port = "127.0.0.1", int(server.url.rsplit(":", 1)[1])
    head = (f"POST /api/jobs HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            "Connection: close\r\n")

    def answered(headers: str, body: Iterator[bytes]) -> tuple[bytes, bool]:
        """The answer's status line, and whether all the body could be sent."""
        with socket.create_connection((host, port), timeout=60) as conn:
            conn.sendall((head + headers + "\r\n").encode())
            sent = True
            try:
                for piece in body:
                    conn.sendall(piece)
            except OSError:  # cut off: the answer may have come all the same
                sent = False
            return conn.recv(65536).split(b"\r\n", 1)[0], sent

    def chunked(size: int) -> Iterator[bytes]:
        for _ in range(size // 65536):
            yield b"10000\r\n" + b"x" * 65536 + b"\r\n"
        yield b"0\r\n\r\n"

    too_large = b"HTTP/1.1 413 Request Entity Too Large"
    for _ in range(5):
        assert answered("Content-Length: 5000000\r\n", iter([b"x" * 5_000_000])) == (
            too_large, True)
        assert answered("Transfer-Encoding: chunked\r\n", chunked(5_000_000)) == (
            too_large, True)
    # Told at once, before any of it is sent: neither a `100 Continue` nor a wait.
    assert answered("Content-Length: 50000000\r\nExpect: 100-continue\r\n", iter(()))[0] == (
        too_large)


def test_a_batch_is_stored_in_its_order_all_or_nothing_and_once_with_a_key(
        make_server: MakeServer) -> None:
    """As RQ's `enqueue_many`: several jobs in one request. One that does not fit (its
    input, its dependency, the queue's room, a key used for another job) stores none."""
    server = make_server(env={"OFFLOAD_MAX_QUEUED": "5"})
    with server.client() as client:
        client.post("/api/queue/pause")  # they stay queued: the queue's room is known
        first = client.post("/api/jobs", json={"kind": "sleep", "delay_s": 3600}).json()["id"]
        refused = {
            "input": ([{"kind": "sleep"}, {"kind": "sleep", "input": {"seconds": -1}}],
                      422, "jobs[1]: invalid input for a 'sleep' job: input.seconds"),
            "kind": ([{"kind": "sleep"}, {"kind": "nope"}], 422, "jobs[1]: unknown job kind"),
            "dependency": ([{"kind": "sleep", "depends_on": "a" * 32}], 422,
                           "jobs[0]: depends_on: no job " + "a" * 32),
            "room": ([{"kind": "sleep"}] * 5, 429, "1 jobs are queued (those waiting for "
                                                   "their start time too), these 5 would make 6"),
            "too many": ([{"kind": "sleep"}] * 6, 422, "6 jobs in one batch, and "
                                                        "OFFLOAD_MAX_QUEUED is 5"),
            "none": ([], 422, "jobs: List should have at least 1 item"),
        }
        for what, (jobs, status, said) in refused.items():
            answer = client.post("/api/jobs/batch", json={"jobs": jobs})
            assert answer.status_code == status and said in answer.json()["detail"], (what,
                                                                                   answer.text)
        assert [job["id"] for job in client.get("/api/jobs").json()["jobs"]] == [first]

        batch = [{"kind": "sleep", "input": {"seconds": 0.1 * n}, "depends_on": first}
                 for n in range(3)]
        stored = client.post("/api/jobs/batch", json={"jobs": batch},
                             headers={"Idempotency-Key": "sweep-1"})
        assert stored.status_code == 202, stored.text
        ids = [job["id"] for job in stored.json()["jobs"]]
        assert [job["input"]["seconds"] for job in stored.json()["jobs"]] == [0, 0.1, 0.2]
        assert [client.get(f"/api/jobs/{job_id}").json()["depends_on"] for job_id in ids] == [
            [first]] * 3
        again = client.post("/api/jobs/batch", json={"jobs": batch},
                            headers={"Idempotency-Key": "sweep-1"})
        assert [job["id"] for job in again.json()["jobs"]] == ids, "sent again: the same jobs"
        changed = client.post("/api/jobs/batch", json={"jobs": [batch[0], {"kind": "sleep"}]},
                              headers={"Idempotency-Key": "sweep-1"})
        assert changed.status_code == 422, changed.text
        assert changed.json() == {"detail": "jobs[1]: this Idempotency-Key was already used "
                                            f"by another batch, which made 3 job(s) ({ids[0]}, "
                                            f"{ids[1]}, {ids[2]}), with another job at this "
                                            "place: a batch sent again holds the same jobs in "
                                            "the same order; use a new key for a new batch. This "
                                            "request stored no job. The job before it was sent "
                                            "with that batch too (their ids are in `stored`).",
                                  "stored": ids[:1]}
        # Neither the batch's key nor one of its jobs' is another request's key.
        alone = client.post("/api/jobs", json=batch[0], headers={"Idempotency-Key": "sweep-1"})
        assert alone.status_code == 202 and alone.json()["id"] not in ids
        assert len(client.get("/api/jobs").json()["jobs"]) == 5

        client.delete(f"/api/jobs/{alone.json()['id']}")
        client.delete(f"/api/jobs/{first}")  # its dependents fail unstarted
        client.post("/api/queue/resume")
        for job_id in ids:
            wait_job(client, job_id)
        assert client.post(f"/api/jobs/{first}/remove").status_code == 200
        # Sent again once the job they depend on is gone: answered, as one job alone is.
        again = client.post("/api/jobs/batch", json={"jobs": batch},
                            headers={"Idempotency-Key": "sweep-1"})
        assert [job["id"] for job in again.json()["jobs"]] == ids, again.text
        two = client.post("/api/jobs/batch", json={"jobs": [
            {"kind": "sleep"}, {"kind": "sleep", "input": {"seconds": 0.2}}]}).json()["jobs"]
        for job in two:
            assert wait_job(client, job["id"])["state"] == "completed"
        assert {wait_job(client, job_id)["state"] for job_id in ids} == {"failed"}
    kept = make_server(env={"OFFLOAD_MAX_JOBS": "3"})
    with kept.client() as client:
        too_many = client.post("/api/jobs/batch", json={"jobs": [{"kind": "sleep"}] * 4})
        assert too_many.status_code == 422 and too_many.json()["detail"] == (
            "4 jobs in one batch, and OFFLOAD_MAX_JOBS is 3: send at most that many at once")


def test_a_batch_sent_again_while_it_is_stored_answers_the_same_jobs(
        make_server: MakeServer) -> None:
    """Three clients send one batch with one key at once, with room for it once: each gets
    its jobs, or a 409 to retry while another stores them; never a 429 that says to raise
    OFFLOAD_MAX_QUEUED (its own jobs counted twice), never a job stored twice."""
    import concurrent.futures

    server = make_server(env={"OFFLOAD_MAX_QUEUED": "1000"})
    batch = {"jobs": [{"kind": "sleep", "delay_s": 3600}] * 999}
    with server.client() as client:
        def send(_: int) -> Any:
            return client.post("/api/jobs/batch", json=batch,
                               headers={"Idempotency-Key": "together"})

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(send, range(3)))
        assert {answer.status_code for answer in answers} <= {202, 409}, [
            answer.text[:300] for answer in answers]
        ids = {tuple(job["id"] for job in answer.json()["jobs"]) for answer in answers
               if answer.status_code == 202}
        assert len(ids) == 1 and len(next(iter(ids))) == 999
        assert len(client.get("/api/jobs", params={"limit": 1000}).json()["jobs"]) == 999


def test_a_batch_the_disk_fills_partway_says_which_jobs_were_stored(
        make_server: MakeServer, tmp_path: Path) -> None:
    with small_disk(tmp_path, "512k") as disk:
        server = make_server(env={"OFFLOAD_DATA_DIR": str(disk / "var")})
        with server.client() as client:
            client.post("/api/queue/pause")
            batch = [{"kind": "probe", "input": {"fail": str(n) * 150_000}} for n in range(6)]
            for key in ("fill-1", "fill-1"):  # sent again, it stores none twice
                answer = client.post("/api/jobs/batch", json={"jobs": batch},
                                     headers={"Idempotency-Key": key})
                assert answer.status_code == 507, answer.text[:300]
                said, stored = answer.json()["detail"], answer.json()["stored"]
                assert said.startswith(f"jobs[{len(stored)}]: cannot store the job"), said
                assert said.endswith(f"The job was not stored; the data folder's disk is full: "
                                     "free some space on it, then retry. The "
                                     f"{len(stored)} before it were stored (their ids are in "
                                     "`stored`): once it can be, send the batch again with the "
                                     "same Idempotency-Key to store the rest."), said
                problem = client.get("/api/health").json()["problems"][0]
                assert "cannot store the job" in problem and stored[0] not in problem
                listed = client.get("/api/jobs").json()["jobs"]
                assert sorted(job["id"] for job in listed) == sorted(stored) and stored
                assert [job["input"]["fail"][0] for job in listed] == [
                    str(n) for n in reversed(range(len(stored)))]


def test_a_batch_stopped_for_room_partway_says_only_what_was_stored() -> None:
    """A refusal for room names the jobs stored before it, never "Nothing was stored"
    beside them (as one job refused alone says)."""
    import asyncio

    from starlette.requests import Request

    from jobs.api.admission import Overloaded
    from jobs.api.errors import HANDLERS
    from jobs.api.service import BatchStopped

    request = Request({"type": "http", "method": "POST", "path": "/api/jobs/batch",
                       "headers": []})
    for stored, said in ((["a", "b"], "The 2 before it were stored"),
                         ([], "No job of the batch was stored.")):
        stopped = BatchStopped(Overloaded("5 jobs are queued", 2.5), 2, stored, True)
        async def answered(stopped: BatchStopped = stopped) -> Any:
            return await HANDLERS[BatchStopped](request, stopped)

        answer = asyncio.run(answered())
        body = json.loads(bytes(answer.body))
        assert answer.status_code == 429 and answer.headers["Retry-After"] == "3"
        assert body["detail"].startswith("jobs[2]: 5 jobs are queued. " + said), body
        assert "Nothing was stored" not in body["detail"] and body["stored"] == stored


def test_the_errors_a_job_route_answers_are_in_its_openapi_document(server: Server) -> None:
    """/docs shows each route's answers: a 404, a 409 or a 400 it gives was missing; and
    as they are: a 422 was described as FastAPI's list of errors, which a client generated
    from the document failed to read, and the guard's refusals were on no route."""
    with server.client() as client:
        done = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0}}).json()
        wait_job(client, done["id"])
        unknown = "0" * 32
        answers = [
            ("get", "/api/jobs/{job_id}", client.get(f"/api/jobs/{unknown}")),
            ("delete", "/api/jobs/{job_id}", client.delete(f"/api/jobs/{unknown}")),
            ("delete", "/api/jobs/{job_id}", client.delete(f"/api/jobs/{done['id']}")),
            ("post", "/api/jobs/{job_id}/rerun", client.post(f"/api/jobs/{unknown}/rerun")),
            ("post", "/api/jobs/{job_id}/remove", client.post(f"/api/jobs/{unknown}/remove")),
            ("get", "/api/jobs/{job_id}/log", client.get(f"/api/jobs/{unknown}/log")),
            ("get", "/api/jobs", client.get("/api/jobs", params={"before": unknown})),
            ("post", "/api/jobs", client.post("/api/jobs", json={"kind": "nope"})),
            ("post", "/api/jobs", client.post("/api/jobs", content=b"{" * 1_100_000)),
            ("get", "/api/jobs/{job_id}", client.get("/api/jobs/%0A")),
            ("get", "/api/health", client.get("/api/health", headers={"Host": "evil.test"})),
            ("post", "/api/jobs/batch", client.post("/api/jobs/batch", json={"jobs": [
                {"kind": "sleep"}, {"kind": "sleep", "input": {"seconds": -1}}]}))]
        document = client.get("/openapi.json").json()
    assert {answer.status_code for *_, answer in answers} >= {400, 404, 409, 413, 421, 422}
    schemas, paths = document["components"]["schemas"], document["paths"]
    assert "HTTPValidationError" not in schemas
    for method, path, answer in answers:
        assert 400 <= answer.status_code < 500, answer.text
        said = paths[path][method]["responses"].get(str(answer.status_code))
        assert said is not None, (method, path, answer.status_code)
        ref = said["content"]["application/json"]["schema"]["$ref"]
        schema = schemas[ref.removeprefix("#/components/schemas/")]
        assert ref.endswith(("/Detail", "/BatchRefusal")), (method, path, ref)
        body = answer.json()
        assert set(schema["required"]) <= set(body), (method, path, body)
        assert isinstance(body["detail"], str) and body["detail"], answer.text
        if path == "/api/jobs/batch":  # which jobs were stored before the one refused
            assert body["stored"] == [] and "stored" in schema["properties"], body
    for path, operations in paths.items():  # the guard's refusals, on every route
        for method, operation in operations.items():
            assert {"400", "401", "403", "413", "421"} <= set(operation["responses"]), (
                method, path)


def test_an_empty_idempotency_key_is_refused(server: Server) -> None:
    with server.client() as client:
        for seconds in (0.1, 0.2):  # two clients that send the header blank
            refused = client.post("/api/jobs", json={"kind": "sleep", "input": {
                "seconds": seconds}}, headers={"Idempotency-Key": ""})
            assert refused.status_code == 422
            assert "Idempotency-Key" in refused.json()["detail"]
        assert client.get("/api/jobs").json()["jobs"] == []


def test_token_required_on_every_api_route(make_server: MakeServer) -> None:
    server = make_server(env={"OFFLOAD_API_TOKEN": "s3cret-token-5d8e1f"})
    job_path = f"/api/jobs/{'0' * 32}"
    routes = [("GET", "/api/health"), ("GET", "/api/history"), ("GET", "/api/jobs"),
              ("POST", "/api/jobs"), ("GET", job_path), ("DELETE", job_path),
              ("GET", job_path + "/log"), ("GET", job_path + "/events"),
              ("POST", job_path + "/remove"),
              ("POST", "/api/ai_chat_async"), ("GET", f"/api/ai_chat_result/{'0' * 32}")]
    with server.client() as client:
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"},
                            {"Authorization": "s3cret-token-5d8e1f"}):
                answer = client.request(method, path, headers=headers)
                assert answer.status_code == 401, (method, path, headers)
                assert "OFFLOAD_API_TOKEN" in answer.json()["detail"]
                assert "s3cret" not in answer.text
        ok = client.get("/api/health", headers={"Authorization": "Bearer s3cret-token-5d8e1f"})
        assert ok.status_code == 200
        assert client.get("/docs").status_code == 200


def test_unwritable_data_folder_answers_503(server: Server) -> None:
    import subprocess

    jobs_dir = server.data_dir / "jobs"
    with server.client() as client:
        kept = client.post("/api/jobs", json={"kind": "sleep"}).json()
        wait_job(client, kept["id"])
        before = {f: f.read_bytes() for f in jobs_dir.rglob("*") if f.is_file()}
        subprocess.run(["chattr", "+i", str(jobs_dir)], check=True)
        try:
            answer = client.post("/api/jobs", json={"kind": "sleep"})
            assert answer.status_code == 503
            assert "data folder" in answer.json()["detail"]
            chat = client.post("/api/ai_chat_async",
                               json={"messages": [{"role": "user", "content": "x"}]})
            assert chat.status_code == 503
            assert client.get(f"/api/jobs/{kept['id']}").json()["state"] == "completed"
            assert client.get("/api/jobs").status_code == 200
            # It said "ok" meanwhile, to the checks that watch it.
            health = client.get("/api/health").json()
            assert health["status"] == "degraded", health
            assert health["problems"][0].startswith("the data folder failed a request ")
            status = subprocess.run([sys.executable, "-m", "jobs", "status"], env={
                **os.environ, "OFFLOAD_URL": server.url}, capture_output=True, text=True)
            assert status.returncode == 7 and "failed a request" in status.stderr, status
        finally:
            subprocess.run(["chattr", "-i", str(jobs_dir)], check=True)
        assert {f: f.read_bytes() for f in jobs_dir.rglob("*") if f.is_file()} == before
        again = client.post("/api/jobs", json={"kind": "sleep"})
        assert again.status_code == 202
        assert client.get("/api/health").json()["problems"] == []


def test_a_data_folder_on_a_nearly_full_disk_is_said_by_health(make_server: MakeServer,
                                                                tmp_path: Path) -> None:
    with small_disk(tmp_path, "4m") as disk:
        server = make_server(env={"OFFLOAD_DATA_DIR": str(disk / "var")})
        with server.client() as client:
            health = client.get("/api/health").json()
            assert health["status"] == "degraded", health
            assert "the data folder's disk has " in health["problems"][0], health
            assert "KiB free" in health["problems"][0]


def test_history_and_health(server: Server) -> None:
    with server.client() as client:
        job = client.post("/api/jobs", json={"kind": "sleep"}).json()
        wait_job(client, job["id"])
        history = wait_for(lambda: (h := client.get("/api/history").json())
                           ["metrics"]["samples"][2:] and h, 15)
        sample = history["metrics"]["samples"][-1]
        assert 0 <= sample["cpu"] <= 100 and 0 < sample["mem"] < 100
        assert sample["t"] == pytest.approx(time.time(), abs=5)
        assert history["jobs"][0]["id"] == job["id"]
        assert history["counts"]["completed"] == 1
        assert history["metrics"]["kept"] >= len(history["metrics"]["samples"])
        assert history["metrics"]["train_needs"] == 90  # a train job's default lags: 30
        health = client.get("/api/health").json()
        assert health["status"] == "ok" and health["max_concurrent"] == 4
        assert health["running"] == 0 and health["queued"] == 0
        assert health["launcher"] == "local"
        assert health["llm"]["provider"] == "openai-compatible"
        assert health["llm"]["ready"] is True


def test_the_history_says_a_busy_machine_is_busy_from_its_first_samples(
        make_server: MakeServer) -> None:
    # psutil keeps its last CPU reading per thread: samples taken on threads new to it
    # said 0.0 % for the first seconds after each start, busy as the machine was.
    spinning = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        server = make_server()
        with server.client() as client:
            samples = wait_for(lambda: (kept := client.get("/api/history").json()
                                        ["metrics"]["samples"])[7:] and kept, 60)
    finally:
        spinning.kill()
        spinning.wait()
    # One core of the machine's spins throughout.
    least = 100 / (psutil.cpu_count() or 1) / 2
    assert all(sample["cpu"] >= least for sample in samples), samples


def test_history_survives_a_restart(make_server: MakeServer) -> None:
    first = make_server()
    with first.client() as client:
        samples = wait_for(lambda: client.get("/api/history").json()["metrics"]["samples"][2:],
                           15)
    first.stop()
    second = make_server()
    with second.client() as client:
        after = client.get("/api/history").json()["metrics"]["samples"]
    assert samples[0] in after


def test_a_history_line_edited_to_no_number_is_left_out(server: Server) -> None:
    # Read as a sample, it made every chat's submission a 500 for ten minutes (its
    # summary for the expert: "could not convert string to float: 'abc'"); so did a
    # last sample whose "mem_used_mb" was null. Any other field was served to every
    # poll of the chart, a line of 300 MB whole.
    with server.client() as client:
        wait_for(lambda: client.get("/api/history").json()["metrics"]["samples"][1:], 15)
        now = time.time()
        with open(server.data_dir / "history" / "metrics.jsonl", "a") as history:
            for edited in ({"t": now, "cpu": "abc", "mem": 5},
                           {"t": now, "cpu": 1, "mem": 2, "mine": "x" * 2000},
                           {"t": now, "cpu": 1, "mem": 2, "mine": "x" * 3_000_000},
                           {"t": now, "cpu": 1, "mem": 2, "mine": "x"},
                           {"t": now, "cpu": 1, "mem": 2, "mem_used_mb": None}):
                history.write(json.dumps(edited) + "\n")
        chat = client.post("/api/jobs", json={"kind": "chat", "input": {
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}})
        assert chat.status_code == 202, chat.text
        assert "CPU over the last" in chat.json()["input"]["context"]
        samples = client.get("/api/history").json()["metrics"]["samples"]
        assert samples and all(isinstance(each["cpu"], float) for each in samples), samples
        assert {"t", "cpu", "mem"} in [set(each) for each in samples], "the last two"
        assert all(set(each) <= {"t", "cpu", "mem", "mem_used_mb"} for each in samples)


def test_a_history_line_cut_short_loses_no_sample_after_it(server: Server) -> None:
    # A crash or a full disk partway into an append: the next sample was glued onto the
    # cut line (`{"t": 17966{"t": ...}`), and both were lost.
    history = server.data_dir / "history" / "metrics.jsonl"
    with server.client() as client:
        wait_for(lambda: client.get("/api/history").json()["metrics"]["samples"][1:], 15)
        with open(history, "a") as cut:
            cut.write('{"t": 17966')
        wait_for(lambda: history.read_text().splitlines()[-1] != '{"t": 17966', 15, 0.1,
                 "the next sample")
        lines = history.read_text().splitlines()
    at = lines.index('{"t": 17966')
    assert lines[at + 1:] and all(json.loads(line)["t"] > 0 for line in lines[at + 1:]), lines


def test_a_history_line_that_is_no_utf8_is_dropped_at_the_next_start(
        make_server: MakeServer) -> None:
    # A supervisor's first sample compacts the history: a line of bytes that are no UTF-8
    # failed that, and the recording started again every 5 s with a traceback, for good.
    first = make_server()
    with first.client() as client:
        wait_for(lambda: client.get("/api/history").json()["metrics"]["samples"][1:], 15)
    first.stop()
    history = Path(p.metrics_file(first.data_dir))
    with open(history, "ab") as damaged:
        damaged.write(b'{"t": 1, "cpu": 5, "mem": 5}\x9a\xff\n')
    second = make_server()
    with second.client() as client:
        before = len(client.get("/api/history").json()["metrics"]["samples"])
        wait_for(lambda: len(client.get("/api/history").json()["metrics"]["samples"])
                 >= before + 4, 15, what="a sample a second again")
    said = (second.data_dir / "supervisor.log").read_text(errors="replace")
    assert "recording metrics failed" not in said, said[-2000:]
    assert b"\x9a\xff" not in history.read_bytes()


def test_stopping_the_api_leaves_runners_and_next_start_adopts_them(
        make_server: MakeServer, data_dir: Path) -> None:
    first = make_server()
    with first.client() as client:
        # Long enough to outlast a slow stop on a busy machine.
        ids = [client.post("/api/jobs", json={"kind": "sleep",
                                              "input": {"seconds": 10}}).json()["id"]
               for _ in range(3)]
        jobs = [wait_job(client, i, "running") for i in ids]
    first.stop()
    assert all(psutil.pid_exists(j["pid"]) for j in jobs), "runners outlive the API"
    second = make_server()
    with second.client() as client:
        finals = [wait_job(client, i) for i in ids]
    assert [f["state"] for f in finals] == ["completed"] * 3
    assert [f["pid"] for f in finals] == [j["pid"] for j in jobs], "adopted, not restarted"
