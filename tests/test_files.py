"""Job files: atomic writes, tolerant reads, ids that never reach the disk."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jobs import protocol as p
from jobs.models import Job
from jobs.store.errors import StoreUnavailable
from jobs.store.job_store import JobNotFound, JobStore
from tests.conftest import ROOT

WRITER = """
import sys, itertools
from pathlib import Path
from jobs import protocol as p
path = Path(sys.argv[1])
for i in itertools.count():
    # sizes vary from a few bytes to ~200 kB so a torn read would show
    p.write_json(path, {"n": i, "output": "x" * (i * 7919 % 200_000)})
"""


def test_reads_during_concurrent_rewrites_never_see_a_torn_file(tmp_path: Path) -> None:
    path = tmp_path / ("a" * 32 + ".json")
    p.write_json(path, {"n": -1, "output": ""})
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=ROOT)
               for _ in range(2)]
    try:
        seen = set()
        for _ in range(10_000):
            # A raw read, no retries: atomic replace alone must guarantee a whole file.
            with open(path, "rb") as f:
                data = json.loads(f.read())
            assert set(data) == {"n", "output"}
            assert len(data["output"]) == data["n"] * 7919 % 200_000 or data["n"] == -1
            seen.add(data["n"])
        assert len(seen) > 100, "the writers should have rewritten the file many times"
    finally:
        for w in writers:
            w.kill()
            w.wait()
    leftovers = [f.name for f in tmp_path.iterdir() if f.name.endswith(p.TMP_SUFFIX)]
    assert len(leftovers) <= 2  # at most the temp file each killed writer was writing


def test_read_json_missing_and_corrupt(tmp_path: Path) -> None:
    assert p.read_json(tmp_path / "none.json") is None
    bad = tmp_path / "bad.json"
    bad.write_text('{"state": "runn')
    with pytest.raises(p.CorruptJobFile):
        p.read_json(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(p.CorruptJobFile):
        p.read_json(bad)


@pytest.mark.faults
def test_corrupt_job_file_reads_as_failed_and_listing_keeps_working(data_dir: Path) -> None:
    store = JobStore(data_dir / "jobs")
    good = store.create("sleep", {}, 10)["id"]
    broken = "b" * 32
    (data_dir / "jobs" / broken).mkdir()
    (data_dir / "jobs" / broken / p.JOB_FILE).write_text("{not json")
    job = Job.model_validate(store.read(broken))  # as the API answers it
    assert job.state.value == "failed"
    assert job.error is not None and job.error.type.value == "corrupt"
    assert {j["id"] for j in store.list_jobs()} == {good, broken}


@pytest.fixture
def opened_paths() -> Iterator[list[str]]:
    """Every path Python opens, stats or lists, through the interpreter's audit hooks."""
    seen: list[str] = []
    active = [True]

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if active[0] and event in ("open", "os.listdir", "os.scandir", "os.remove", "os.rename"):
            seen.append(str(args[0]))

    sys.addaudithook(hook)
    yield seen
    active[0] = False


BAD_IDS = ["../x", "..%2Fx", "..\\x", "A" * 32, "a" * 31, "a" * 33, "g" * 32, "",
           "a" * 31 + "/", "%2e%2e%2f" + "a" * 23, "a" * 32 + ".json", "a" * 32 + "\x00"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_ids_never_reach_the_file_system(data_dir: Path, bad: str,
                                             opened_paths: list[str]) -> None:
    # A real job file where a traversal would land, to prove it is not read.
    (data_dir / "x").mkdir(parents=True, exist_ok=True)
    (data_dir / "x" / p.JOB_FILE).write_text(json.dumps(p.new_job("c" * 32, "sleep", {}, 1)))
    store = JobStore(data_dir / "jobs")
    opened_paths.clear()
    with pytest.raises(JobNotFound):
        store.read(bad)
    with pytest.raises(JobNotFound):
        store.request_cancel(bad)
    with pytest.raises(JobNotFound):
        store.remove(bad)
    assert opened_paths == []
    with pytest.raises(ValueError):
        p.job_path(data_dir, bad)


def test_valid_ids_do_reach_the_file_system(data_dir: Path, opened_paths: list[str]) -> None:
    # The control for the test above: the hook does see a good id's file being read.
    store = JobStore(data_dir / "jobs")
    job_id = store.create("sleep", {}, 10)["id"]
    opened_paths.clear()
    store.read(job_id)
    assert any(job_id in path for path in opened_paths)


def test_new_job_has_every_contract_field() -> None:
    job = p.new_job("d" * 32, "chat", {"messages": []}, 120)
    assert set(job) >= {"id", "kind", "state", "created_at", "started_at", "finished_at",
                        "timeout_s", "queue_position", "progress", "output", "result",
                        "error", "pid", "exit_code", "resources"}
    assert job["state"] == "queued"
    assert job["created_at"].endswith("Z")


def test_replace_retries_while_a_reader_holds_the_file(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows: os.replace fails with PermissionError while another process has the
    target open; the write retries briefly instead of failing (or tearing the file)."""
    real_replace = os.replace
    failures = [PermissionError(13, "Access is denied")] * 3

    def flaky_replace(src: Any, dst: Any) -> None:
        if failures:
            raise failures.pop()
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    target = tmp_path / "job.json"
    p.write_json(target, {"n": 1})
    assert json.loads(target.read_text()) == {"n": 1} and not failures

    failures.extend([PermissionError(13, "Access is denied")] * 10_000)
    with pytest.raises(PermissionError):
        p.write_json(target, {"n": 2})
    assert json.loads(target.read_text()) == {"n": 1}, "the old file is intact"
    assert [f.name for f in tmp_path.iterdir()] == ["job.json"], "no temp file left behind"


def test_overview_answers_from_the_snapshot_while_the_index_is_busy(data_dir: Path) -> None:
    store = JobStore(data_dir / "jobs")
    ids = [store.create("sleep", {}, 10)["id"] for _ in range(3)]
    assert store.cached_overview(2, max_age_s=1.0) is None  # never refreshed: no answer
    store.refresh()
    with store._lock:  # a refresh in progress in another thread holds it
        answer = store.cached_overview(2, max_age_s=1.0)
    assert answer is not None
    jobs, counts = answer
    assert [j["id"] for j in jobs] == ids[:0:-1] and counts["queued"] == 3
    time.sleep(0.05)
    assert store.cached_overview(2, max_age_s=0.01) is None  # too old: the caller reads


@pytest.mark.skipif(sys.platform == "win32", reason="Windows: always worker threads")
def test_submissions_write_on_the_event_loop_until_a_write_is_slow(
        data_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import asyncio
    import threading

    from jobs.api import small_io
    from jobs.api.service import JobService
    from jobs.protocol import files
    from jobs.settings import get_settings

    monkeypatch.setattr(files, "FSYNC", False)  # a quick disk, whatever this machine's fsync costs
    caplog.set_level(logging.INFO, logger=small_io.__name__)
    store = JobStore(data_dir / "jobs")
    service = JobService(get_settings(), store)
    writers: list[str] = []
    create = store.create

    def spied_create(*args: Any, **kwargs: Any) -> dict[str, Any]:
        writers.append("loop" if threading.current_thread() is threading.main_thread()
                       else "worker")
        return create(*args, **kwargs)

    monkeypatch.setattr(store, "create", spied_create)
    chat = {"messages": [{"role": "user", "content": "hi"}]}

    async def submit() -> dict[str, Any]:
        return await service.submit("chat", dict(chat), None)

    first = asyncio.run(submit())  # no index snapshot yet: never wait for the index lock
    store.refresh()
    second = asyncio.run(submit())  # a fresh snapshot: written right on the event loop
    assert writers == ["worker", "loop"]
    # The expert's context counted the jobs from the snapshot: the first one, queued.
    assert second["input"]["context"].endswith("Jobs: 1 queued.")
    assert {first["id"], second["id"]} <= {job["id"] for job in store.list_jobs()}

    readers: list[str] = []
    read = store.read

    def spied_read(job_id: str) -> dict[str, Any]:
        readers.append("loop" if threading.current_thread() is threading.main_thread()
                       else "worker")
        return read(job_id)

    monkeypatch.setattr(store, "read", spied_read)
    assert asyncio.run(service.get(first["id"]))[p.F_QUEUE_POSITION] == 0
    monkeypatch.setattr(small_io, "INLINE_MAX_S", 0.0)  # now every operation is "slow"
    store.refresh()
    asyncio.run(submit())
    store.refresh()
    asyncio.run(submit())  # a slow disk sends file operations to worker threads for a while
    assert asyncio.run(service.get(first["id"]))[p.F_ID] == first["id"]
    assert writers[2:] == ["loop", "worker"] and readers == ["loop", "worker"]
    said = [r for r in caplog.records if "the API touches job files from worker" in r.message]
    # One slow operation is a hiccup, said as news; another soon after, a slow disk: a warning.
    assert [r.levelno for r in said] == [logging.INFO]
    service.small_io._inline_from = 0.0  # the pause is over: inline again, and slow again
    asyncio.run(service.get(first["id"]))  # within what a busy CPU explains: news again
    said = [r for r in caplog.records if "the API touches job files from worker" in r.message]
    assert [r.levelno for r in said] == [logging.INFO, logging.INFO]
    monkeypatch.setattr(small_io, "SLOW_DISK_S", 0.0)  # past what a busy CPU explains
    service.small_io._inline_from = 0.0
    asyncio.run(service.get(first["id"]))
    said = [r for r in caplog.records if "the API touches job files from worker" in r.message]
    assert [r.levelno for r in said] == [logging.INFO, logging.INFO, logging.WARNING]
    assert "is the data folder on a slow disk?" in said[2].message
    assert all(store.read(job["id"])[p.F_STATE] == p.JobState.QUEUED for job in store.list_jobs())



def test_queue_positions_are_counted_once_per_refresh_and_know_new_jobs(
        data_dir: Path) -> None:
    store = JobStore(data_dir / "jobs")
    ids = [store.create("sleep", {}, 60)["id"] for _ in range(3)]
    store.refresh()
    in_line = {"reason": "queue_position"}
    assert [store.cached_queue_place(i, 60) for i in ids] == [(0, in_line), (1, in_line),
                                                              (2, in_line)]
    late = store.create("sleep", {}, 60)["id"]
    assert store.cached_queue_place(late, 60) is None  # not counted yet: ask the index
    assert store.queue_place(late, 60) == (3, in_line)  # counted now, however fresh the last
    assert store.cached_queue_place(ids[0], 0) is None  # too old for the caller


def test_a_chat_turn_waiting_for_the_turn_before_it_has_no_queue_position(
        data_dir: Path) -> None:
    # It read 0, "next", while a job submitted after it would start first.
    store = JobStore(data_dir / "jobs")
    first = store.create("chat", {"messages": [{"role": "user", "content": "hi"}]}, 60)["id"]
    second = store.create("chat", {"messages": [{"role": "user", "content": "and?"}]}, 60,
                          fields={p.F_AFTER: first})["id"]
    other = store.create("sleep", {}, 60)["id"]
    assert [store.queue_place(i, 0) for i in (first, second, other)] == [
        (0, {"reason": "queue_position"}), (None, {"reason": "after", "jobs": [first]}),
        (1, {"reason": "queue_position"})]


def test_a_file_in_place_of_the_data_folder_is_named_not_the_jobs_folder(
        data_dir: Path) -> None:
    # The listing's 503 said to move away the file in place of `jobs`, where there was none.
    store = JobStore(data_dir / "jobs")
    store.create("sleep", {}, 10)
    data_dir.rename(data_dir.with_name("data.moved"))
    data_dir.write_text("")
    with pytest.raises(StoreUnavailable) as raised:
        store.list_jobs()
    assert f"move away the file in place of the folder {data_dir}" in str(raised.value)
