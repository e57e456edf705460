"""Bounds on work and on idempotency keys, through the real API (uvicorn and its real
supervisor process): a full queue and a full store answer 429 and lose nothing, the
job cap never prunes a fresh result, and a key never blocks a worker, never poisons
itself and is pruned with its job."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.scale import write_finished_jobs
from jobs import protocol as p
from jobs.settings import HISTORY_KEEP_S, PRUNE_OVER_CAP_S
from jobs.store.idempotency import PENDING_S, STORING_S, Keys, being_stored
from jobs.store.job_store import JobStore
from tests.conftest import start_process, stop_process, wait_for
from tests.server import Server

pytestmark = pytest.mark.faults
MakeServer = Callable[..., Server]
QUICK = {"kind": "sleep", "input": {"seconds": 0}}
CHAT = {"messages": [{"role": "user", "content": "hello"}]}


def _final(client: httpx.Client, job_id: str, timeout: float = 60) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        job = client.get(f"/api/jobs/{job_id}").json()
        return job if job["state"] in p.FINAL_STATES else None

    return wait_for(check, timeout, 0.1, f"job {job_id} to finish")


def _counted(client: httpx.Client, check: Callable[[dict[str, int]], bool]) -> None:
    """Wait until the API's own counts (its index snapshot) satisfy `check`."""
    wait_for(lambda: check(client.get("/api/history", params={"seconds": 1}).json()["counts"]),
             30, 0.05, "the API's counts")


def _key_file(data_dir: Path, key: str) -> Path:
    return data_dir / "idempotency" / f"{hashlib.sha256(key.encode()).hexdigest()}.json"


def _assert_429(response: httpx.Response, *words: str) -> int:
    assert response.status_code == 429, (response.status_code, response.text)
    detail = response.json()["detail"]
    for word in words:
        assert word in detail, detail
    retry_after = int(response.headers["Retry-After"])
    assert retry_after >= 1
    return retry_after


# -- item 5: bounded work --------------------------------------------------------------


def test_a_full_queue_answers_429_and_loses_nothing(make_server: MakeServer) -> None:
    server = make_server(env={"OFFLOAD_MAX_QUEUED": "3", "OFFLOAD_MAX_CONCURRENT": "1"})
    with server.client() as client:
        long = client.post("/api/jobs", json={"kind": "sleep",
                                              "input": {"seconds": 10, "steps": 10}}).json()
        wait_for(lambda: client.get(f"/api/jobs/{long['id']}").json()["state"] == "running",
                 30, what="the long job to run")
        queued = [client.post("/api/jobs", json=QUICK) for _ in range(3)]
        assert [r.status_code for r in queued] == [202] * 3
        _counted(client, lambda counts: counts["queued"] == 3)
        refused = client.post("/api/jobs", json=QUICK)
        _assert_429(refused, "OFFLOAD_MAX_QUEUED", "retry")
        _assert_429(client.post("/api/ai_chat_async", json=CHAT), "OFFLOAD_MAX_QUEUED")
        assert client.get(f"/api/jobs/{long['id']}").json()["state"] == "running", (
            "the long job ended before the check: the queue was not full")
        finals = [_final(client, job["id"]) for job in [long, *(r.json() for r in queued)]]
        assert [f["state"] for f in finals] == ["completed"] * 4
        assert len(client.get("/api/jobs").json()["jobs"]) == 4  # the refused were not stored
        again = client.post("/api/jobs", json=QUICK)  # room again
        assert again.status_code == 202
        assert _final(client, again.json()["id"])["state"] == "completed"


def test_a_full_queue_that_is_paused_says_to_resume_it(make_server: MakeServer) -> None:
    # It said to retry "when some have started": none starts while the queue is paused.
    server = make_server(env={"OFFLOAD_MAX_QUEUED": "2"})
    with server.client() as client:
        assert client.post("/api/queue/pause").json()["paused"] is True
        queued = [client.post("/api/jobs", json=QUICK) for _ in range(2)]
        assert [r.status_code for r in queued] == [202] * 2
        _counted(client, lambda counts: counts["queued"] == 2)
        refused = client.post("/api/jobs", json=QUICK)
        _assert_429(refused, "the queue is paused, so none starts until it is resumed",
                    "`offload resume`")
        assert "when some have started" not in refused.text
        assert client.post("/api/queue/resume").json()["paused"] is False
        assert [_final(client, r.json()["id"])["state"] for r in queued] == ["completed"] * 2
        assert client.post("/api/jobs", json=QUICK).status_code == 202


def test_one_job_after_another_cannot_pass_the_queued_limit(make_server: MakeServer) -> None:
    # Admitted on the index snapshot's counts (up to 0.25 s old), 8 of 100 got in at 5.
    server = make_server(env={"OFFLOAD_MAX_QUEUED": "5"})
    with server.client() as client:
        assert client.post("/api/queue/pause").json()["paused"] is True
        _counted(client, lambda counts: counts["queued"] == 0)  # a fresh snapshot
        answers = [client.post("/api/jobs", json=QUICK).status_code for _ in range(20)]
        assert answers == [202] * 5 + [429] * 15, answers
        assert len(client.get("/api/jobs").json()["jobs"]) == 5


def test_a_queue_emptied_a_moment_ago_takes_a_job(make_server: MakeServer) -> None:
    """The index snapshot may still count a job that left the queue a moment ago: a
    submission refused on it would be a 429 with room in the queue (fails when the
    refusal is made on the snapshot's counts)."""
    server = make_server(env={"OFFLOAD_MAX_QUEUED": "1", "OFFLOAD_MAX_CONCURRENT": "1"})
    with server.client() as client:
        long = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 60}})
        wait_for(lambda: client.get(f"/api/jobs/{long.json()['id']}").json()["state"]
                 == "running", 30, what="the long job to run")
        job = client.post("/api/jobs", json=QUICK)
        for _ in range(10):
            assert job.status_code == 202, job.text
            _counted(client, lambda counts: counts["queued"] == 1)  # in the snapshot
            cancelled = client.delete(f"/api/jobs/{job.json()['id']}")
            assert cancelled.json()["state"] == "cancelled"
            job = client.post("/api/jobs", json=QUICK)
        assert job.status_code == 202, job.text
        client.delete(f"/api/jobs/{long.json()['id']}")


def test_cap_reached_with_nothing_prunable_answers_429(make_server: MakeServer) -> None:
    server = make_server(env={"OFFLOAD_MAX_JOBS": "3", "OFFLOAD_MIN_RETENTION_S": "10"})
    with server.client() as client:
        kept = [client.post("/api/jobs", json=QUICK).json()["id"] for _ in range(3)]
        for job_id in kept:
            _final(client, job_id)
        _counted(client, lambda counts: sum(counts.values()) == 3)
        refused = client.post("/api/jobs", json=QUICK)
        retry_after = _assert_429(refused, "OFFLOAD_MAX_JOBS", "OFFLOAD_MIN_RETENTION_S")
        assert retry_after <= 11
        assert "OFFLOAD_MAX_JOBS is 3: no finished job may be pruned" in refused.text
        # A batch's in words too (it said "and OFFLOAD_MAX_JOBS is 3, and not 2 may be pruned").
        two = client.post("/api/jobs/batch", json={"jobs": [QUICK, QUICK]})
        _assert_429(two, "3 jobs are kept, these 2 would make 5, and OFFLOAD_MAX_JOBS is 3: "
                         "fewer than 2 finished jobs may be pruned to make room yet")
        _assert_429(client.post("/api/ai_chat_async", json=CHAT), "OFFLOAD_MAX_JOBS")
        # Nothing accepted is lost: all three stay readable over the prune interval.
        until = time.monotonic() + PRUNE_OVER_CAP_S + 1
        while time.monotonic() < until:
            assert [client.get(f"/api/jobs/{j}").status_code for j in kept] == [200] * 3
            time.sleep(0.2)
        time.sleep(retry_after)  # the oldest may be pruned now: there is room
        accepted = client.post("/api/jobs", json=QUICK)
        assert accepted.status_code == 202, accepted.text
        assert _final(client, accepted.json()["id"])["state"] == "completed"
        wait_for(lambda: client.get(f"/api/jobs/{kept[0]}").status_code == 404, 30, 0.2,
                 "the oldest job to be pruned to the cap")
        assert [client.get(f"/api/jobs/{j}").status_code for j in kept[1:]] == [200] * 2


def test_cap_reached_by_a_running_job_says_to_retry_after_the_minimum_retention(
        make_server: MakeServer) -> None:
    # It said "Retry after 5 s", yet a job that ends then is kept ten minutes more.
    server = make_server(env={"OFFLOAD_MAX_JOBS": "1", "OFFLOAD_MIN_RETENTION_S": "600"})
    with server.client() as client:
        running = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 60}})
        _counted(client, lambda counts: sum(counts.values()) == 1)
        retry_after = _assert_429(client.post("/api/jobs", json=QUICK), "OFFLOAD_MAX_JOBS")
        assert 599 <= retry_after <= 600
        client.delete(f"/api/jobs/{running.json()['id']}")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_job_cap_never_prunes_a_fresh_result(make_server: MakeServer,
                                                  data_dir: Path) -> None:
    jobs_dir = data_dir / "jobs"
    old = write_finished_jobs(jobs_dir, 2)  # finished an hour ago
    first = make_server()
    with first.client() as client:
        fresh = [client.post("/api/jobs", json=QUICK).json()["id"] for _ in range(4)]
        finished_at = max(p.parse_iso(_final(client, j)["finished_at"]) for j in fresh)
    first.stop()
    retention = 30.0
    # Restarted with a cap below what is kept: six jobs, cap two.
    second = make_server(env={"OFFLOAD_MAX_JOBS": "2",
                              "OFFLOAD_MIN_RETENTION_S": str(int(retention))})
    with second.client() as client:
        wait_for(lambda: not any((jobs_dir / j).exists() for j in old), 30, 0.1,
                 "the old jobs to be pruned")
        # Still over the cap, and the fresh results stay readable over prune passes.
        polled_from = time.monotonic()
        until = min(polled_from + 2 * PRUNE_OVER_CAP_S + 1,
                    time.monotonic() + finished_at + retention - 3 - time.time())
        assert until - polled_from > PRUNE_OVER_CAP_S, "too slow to see a prune pass"
        while time.monotonic() < until:
            codes = [client.get(f"/api/jobs/{j}").status_code for j in fresh]
            assert codes == [200] * 4, codes
            time.sleep(0.2)
        _assert_429(client.post("/api/jobs", json=QUICK), "OFFLOAD_MAX_JOBS")
        # Once older than the minimum retention, they are pruned to the cap, oldest first.
        wait_for(lambda: sum((jobs_dir / j).exists() for j in fresh) == 2, 60, 0.2,
                 "the fresh jobs, grown old, to be pruned to the cap")
        assert [(jobs_dir / j).exists() for j in fresh] == [False, False, True, True]
        accepted = client.post("/api/jobs", json=QUICK)
        assert accepted.status_code == 202, accepted.text


def test_a_kept_dependency_does_not_keep_the_store_over_its_cap(
        make_server: MakeServer) -> None:
    # It took a pruning slot and none went in its place: the cap plus one kept for good,
    # and a prune every PRUNE_OVER_CAP_S.
    server = make_server(env={"OFFLOAD_MAX_JOBS": "5", "OFFLOAD_MIN_RETENTION_S": "0"})
    jobs = server.data_dir / "jobs"
    with server.client() as client:
        done = [client.post("/api/jobs", json=QUICK).json()["id"] for _ in range(5)]
        for job_id in done:
            _final(client, job_id)
        assert client.post("/api/queue/pause").json()["paused"] is True
        later = client.post("/api/jobs", json={**QUICK, "depends_on": done[0]}).json()["id"]
        queued = [client.post("/api/jobs", json=QUICK).json()["id"] for _ in range(3)]
        # 9 kept: the 4 queued stay, and the dependency; 4 finished ones go.
        wait_for(lambda: len(os.listdir(jobs)) <= 5, 30, 0.2, "pruning to the cap")
        assert set(os.listdir(jobs)) == {done[0], later, *queued}
        assert client.post("/api/queue/resume").json()["paused"] is False
        assert _final(client, later)["state"] == "completed"


def test_the_index_knows_what_may_be_pruned(data_dir: Path) -> None:
    store = JobStore(data_dir / "jobs")
    old = write_finished_jobs(store.dir, 3)  # an hour ago
    fresh = write_finished_jobs(store.dir, 2, age_s=1)
    live = store.create("sleep", {}, 10)["id"]
    store.refresh()
    load = store.cached_load(60)
    assert load is not None and load.total == 6
    assert load.finished_before(time.time() - 600) == 3
    job = store.read(live)
    job.update({p.F_STATE: p.JobState.COMPLETED, p.F_FINISHED_AT: p.now_iso()})
    p.write_json(store.path(live), job)  # finishes now
    assert len(store.load().finished) == 6
    job[p.F_OUTPUT] = "rewritten"
    p.write_json(store.path(live), job)  # a finished job file written again: read again
    assert len(store.load().finished) == 6
    store.remove(old[0])
    load = store.load()
    assert (load.total, len(load.finished), load.finished_before(time.time() - 600)) == (5, 5, 2)
    # Over the cap, pruning takes the old ones only; the fresh ones stay.
    assert store.prune(retention_s=3600 * 24, max_jobs=1, min_retention_s=600) == 2
    assert {j["id"] for j in store.list_jobs()} == {*fresh, live}
    assert store.load().finished_before(time.time()) == 3



def test_pruning_keeps_a_job_that_a_job_stored_a_moment_ago_depends_on(data_dir: Path) -> None:
    """The supervisor's `keep` (the dependencies of the jobs in its queue) may not hold a
    job stored since its last pass: the store keeps what every live job on disk depends
    on all the same, so that job does not fail `dependency` ("is gone") for a job its
    submission was told was there."""
    store = JobStore(data_dir / "jobs")
    old = write_finished_jobs(store.dir, 3)  # an hour ago
    waiting = store.create("sleep", {}, 10, fields={p.F_DEPENDS_ON: [old[0]]})["id"]
    assert store.prune(retention_s=60, keep=set()) == 2
    assert {j["id"] for j in store.list_jobs()} == {old[0], waiting}
    # Over the cap too.
    more = write_finished_jobs(store.dir, 3)
    assert store.prune(retention_s=3600 * 24, max_jobs=1, keep=set()) == 3
    assert old[0] in {j["id"] for j in store.list_jobs()}, more


# -- item 6: idempotency keys ----------------------------------------------------------


def test_a_key_in_flight_does_not_block_the_worker(make_server: MakeServer,
                                                   data_dir: Path) -> None:
    server = make_server()
    key = "in-flight-1"
    key_file = _key_file(data_dir, key)
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_bytes(b"")  # claimed by a request that has not written its job yet
    answers: list[tuple[str, float, httpx.Response]] = []

    def keyed() -> None:
        with server.client() as client:
            response = client.post("/api/jobs", json=QUICK, headers={"Idempotency-Key": key})
            answers.append(("keyed", time.monotonic(), response))

    thread = threading.Thread(target=keyed)
    thread.start()
    time.sleep(0.5)  # the keyed request waits for its key's job by now
    with server.client() as client:
        while thread.is_alive() and len(answers) < 20:
            answers.append(("other", time.monotonic(), client.get("/api/health")))
    thread.join(30)
    order = [name for name, _, _ in sorted(answers, key=lambda a: a[1])]
    assert order.index("keyed") >= 3, f"the worker answered nothing else meanwhile: {order}"
    assert all(r.status_code == 200 for name, _, r in answers if name == "other")
    response = next(r for name, _, r in answers if name == "keyed")
    # The claim never got its job: the key was released and the job created.
    assert response.status_code == 202, response.text
    with server.client() as client:
        assert _final(client, response.json()["id"])["state"] == "completed"
        again = client.post("/api/jobs", json=QUICK, headers={"Idempotency-Key": key})
        assert again.json()["id"] == response.json()["id"]


def test_a_claim_that_never_ages_is_a_409(make_server: MakeServer, data_dir: Path) -> None:
    server = make_server()
    key_file = _key_file(data_dir, "future-1")
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_bytes(b"")
    future = time.time() + 3600  # written under a clock an hour ahead
    os.utime(key_file, (future, future))
    with server.client() as client:
        busy = client.post("/api/jobs", json=QUICK, headers={"Idempotency-Key": "future-1"})
        assert busy.status_code == 409, busy.text
        assert "retry" in busy.json()["detail"] and busy.headers["Retry-After"]
        assert client.get("/api/jobs").json()["jobs"] == []


def test_a_key_whose_job_is_gone_creates_the_job_again(make_server: MakeServer,
                                                       data_dir: Path) -> None:
    server = make_server()
    headers = {"Idempotency-Key": "gone-1"}
    with server.client() as client:
        first = client.post("/api/jobs", json=QUICK, headers=headers).json()
        _final(client, first["id"])
        shutil.rmtree(data_dir / "jobs" / first["id"])  # deleted by hand
        retry = client.post("/api/jobs", json=QUICK, headers=headers)
        assert retry.status_code == 202, retry.text
        assert retry.json()["id"] != first["id"]
        assert client.post("/api/jobs", json=QUICK,
                           headers=headers).json()["id"] == retry.json()["id"]
        _final(client, retry.json()["id"])
        JobStore(data_dir / "jobs").remove(retry.json()["id"])  # what pruning does
        assert not _key_file(data_dir, "gone-1").exists()
        third = client.post("/api/jobs", json=QUICK, headers=headers)
        assert third.status_code == 202, third.text
        assert third.json()["id"] not in (first["id"], retry.json()["id"])
        assert _final(client, third.json()["id"])["state"] == "completed"


def test_a_key_folder_that_is_a_file_is_a_503(make_server: MakeServer,
                                              data_dir: Path) -> None:
    server = make_server()
    headers = {"Idempotency-Key": "blocked-1"}
    blocker = data_dir / "idempotency"
    blocker.write_bytes(b"")  # a file where the keys' folder should be
    with server.client() as client:
        refused = client.post("/api/jobs", json=QUICK, headers=headers)
        assert refused.status_code == 503, refused.text
        assert (f"cannot read the Idempotency-Key's record in {blocker}: Not a directory "
                f"(move away the file at {blocker})") in refused.json()["detail"], refused.text
        assert client.get("/api/jobs").json()["jobs"] == []
        blocker.unlink()
        accepted = client.post("/api/jobs", json=QUICK, headers=headers)
        assert accepted.status_code == 202, accepted.text


def test_a_key_file_write_that_fails_is_a_503(make_server: MakeServer) -> None:
    resource = pytest.importorskip("resource")
    if not hasattr(resource, "prlimit"):
        pytest.skip("needs prlimit (Linux) to make the API's writes fail")
    server = make_server()
    assert server.proc is not None
    headers = {"Idempotency-Key": "efbig-1"}
    soft, hard = resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE)
    # The API process may write at most 16 bytes into a file: the key file's write fails
    # after it was created (EFBIG, as a full disk fails with ENOSPC).
    resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (16, hard))
    with server.client() as client:
        try:
            refused = client.post("/api/jobs", json=QUICK, headers=headers)
        finally:
            resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (soft, hard))
        assert refused.status_code == 503, refused.text
        assert "cannot write the Idempotency-Key's record in " in refused.json()["detail"]
        accepted = client.post("/api/jobs", json=QUICK, headers=headers)
        assert accepted.status_code == 202, accepted.text
        assert _final(client, accepted.json()["id"])["state"] == "completed"


def test_a_job_file_write_that_fails_leaves_no_folder(make_server: MakeServer,
                                                     data_dir: Path) -> None:
    resource = pytest.importorskip("resource")
    if not hasattr(resource, "prlimit"):
        pytest.skip("needs prlimit (Linux) to make the API's writes fail")
    server = make_server()
    assert server.proc is not None
    soft, hard = resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE)
    resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (16, hard))  # as a full disk
    with server.client() as client:
        try:
            refused = [client.post("/api/jobs", json=QUICK) for _ in range(3)]
        finally:
            resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (soft, hard))
        assert [answer.status_code for answer in refused] == [503] * 3, refused[0].text
        # Folders that hold no job were re-read by the supervisor on every pass, for good.
        assert list((data_dir / "jobs").iterdir()) == []
        accepted = client.post("/api/jobs", json=QUICK)
        assert _final(client, accepted.json()["id"])["state"] == "completed"


def test_keys_are_pruned_with_their_jobs(make_server: MakeServer, data_dir: Path) -> None:
    server = make_server(env={"OFFLOAD_MAX_JOBS": "1", "OFFLOAD_MIN_RETENTION_S": "1"})
    with server.client() as client:
        first = client.post("/api/jobs", json=QUICK, headers={"Idempotency-Key": "k-1"}).json()
        _final(client, first["id"])
        time.sleep(1.5)  # older than the minimum retention
        second = client.post("/api/jobs", json=QUICK, headers={"Idempotency-Key": "k-2"})
        assert second.status_code == 202, second.text
        _final(client, second.json()["id"])
        wait_for(lambda: not (data_dir / "jobs" / first["id"]).exists(), 30, 0.2,
                 "the first job to be pruned (over the cap)")
        assert not _key_file(data_dir, "k-1").exists()
        assert _key_file(data_dir, "k-2").exists()


def test_a_key_whose_job_is_still_being_stored_is_kept(data_dir: Path) -> None:
    """A slow disk: the claimer has made the job's folder but not yet its file. Releasing
    the key then would let the retry create a second job for it."""
    keys, job_id = Keys(data_dir / "idempotency"), p.new_id()
    assert keys.claim("a" * 64, job_id, "fingerprint")
    old = time.time() - PENDING_S - 1
    os.utime(keys.path("a" * 64), (old, old))
    folder = data_dir / "jobs" / job_id
    folder.mkdir(parents=True)  # store.create's first step
    assert not keys.release("a" * 64, job_id, folder)
    assert keys.read("a" * 64) is not None
    stale = time.time() - STORING_S - 1  # a claimer that died after it made the folder
    os.utime(folder, (stale, stale))
    assert keys.release("a" * 64, job_id, folder)
    assert keys.read("a" * 64) is None


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="a writer's pid is told by /proc")
def test_a_folder_whose_writer_died_frees_its_key_and_is_pruned(data_dir: Path) -> None:
    """A request killed while it wrote its job file: its key was refused for a minute
    (409s), and its folder, the input in the temp file, stayed for good."""
    store = JobStore(data_dir / "jobs")
    store.ensure_dir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folders = {}
    for writer in (dead.pid, os.getpid()):
        job_id = p.new_id()
        name = hashlib.sha256(job_id.encode()).hexdigest()
        assert store.keys.claim(name, job_id, "fingerprint")
        folder = folders[writer] = data_dir / "jobs" / job_id
        folder.mkdir()
        Keys.link(folder, name)
        (folder / f".{p.JOB_FILE}.{writer}.0a1b2c3d{p.TMP_SUFFIX}").write_text('{"secret": 1}')
        old = time.time() - PENDING_S - 1
        os.utime(store.keys.path(name), (old, old))
    gone, alive = folders[dead.pid], folders[os.getpid()]
    assert not being_stored(gone) and being_stored(alive)
    store.prune(retention_s=3600)
    assert not gone.exists(), "the dead request's folder was left"
    assert alive.exists(), "a folder still being written was pruned"
    assert len(list((data_dir / "idempotency").glob("*.json"))) == 1  # the live one's key


def test_old_machine_metrics_are_dropped_by_a_leader_that_lasts_a_moment(
        data_dir: Path) -> None:
    # Leaders that each lasted less than 600 samples never dropped a line before.
    history = Path(p.metrics_file(data_dir))
    history.parent.mkdir(parents=True)
    old = time.time() - HISTORY_KEEP_S - 60
    history.write_text("".join(f'{{"t":{old + i},"cpu":1,"mem":1,"mem_used_mb":1}}\n'
                               for i in range(50)))
    supervisor = start_process(["-m", "jobs.supervisor"],
                               env={"OFFLOAD_DATA_DIR": str(data_dir)})
    try:
        def only_new() -> bool:
            times = [json.loads(line)["t"] for line in history.read_text().splitlines()]
            return bool(times) and min(times) > old + 100

        wait_for(only_new, timeout=30, what="the old samples dropped")
    finally:
        stop_process(supervisor)


def test_a_runners_output_stops_growing_in_its_job_file(make_server: MakeServer) -> None:
    # Every change rewrote the whole job file, and every follower read it whole: a kind
    # that emitted without end made both cost more with each piece, for good.
    from runners.job import OUTPUT_CUT, OUTPUT_MAX_CHARS

    server = make_server(env={"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})
    with server.client() as client:
        job_id = client.post("/api/jobs", json={"kind": "probe", "input": {
            "seconds": 0, "emit": 1_500_000}}).json()["id"]
        job = wait_for(lambda: (j := client.get(f"/api/jobs/{job_id}").json())["state"]
                       in p.FINAL_STATES and j, 60, 0.1, "the job to end")
        log = client.get(f"/api/jobs/{job_id}/log").text
    assert job["state"] == "completed", job["error"]
    assert len(job["output"]) == OUTPUT_MAX_CHARS + len(OUTPUT_CUT)
    assert job["output"].endswith(OUTPUT_CUT) and job["output"].startswith("0123456789")
    assert (server.data_dir / "jobs" / job_id / p.JOB_FILE).stat().st_size < 1_100_000
    assert log.count("0123456789") >= 50_000  # the rest went to the log
