"""Periodic schedules, the queue's pause and its cap on runners, through the real API and
supervisor."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import psutil
import pytest

from jobs import protocol as p
from jobs.protocol import control, embedded
from jobs.schedules import (
    RELOAD_CHECK_S,
    Schedule,
    ScheduleError,
    ScheduleFile,
    load,
    parse_cron,
    parse_every,
)
from jobs.settings import Settings
from jobs.store.job_store import JobStore
from jobs.supervisor.schedules import Scheduler
from tests.conftest import ROOT, wait_for
from tests.server import Server

MakeServer = Callable[..., Server]

SCHEDULES = """
[rare]
kind = "sleep"
every = "36500d"  # one slot in this test's lifetime, whenever it runs
input = {seconds = 0, steps = 1}

[tick]
kind = "sleep"
every = 2
input = {seconds = 0, steps = 1}
priority = 3
timeout_s = 30
"""


def schedules_env(tmp_path: Path, text: str = SCHEDULES) -> dict[str, str]:
    path = tmp_path / "schedules.toml"
    path.write_text(text)
    return {"OFFLOAD_SCHEDULES_FILE": str(path)}


def jobs_of(client: httpx.Client, schedule: str) -> list[dict[str, Any]]:
    jobs = client.get("/api/jobs", params={"limit": 1000}).json()["jobs"]
    return [job for job in jobs if job.get("schedule") == schedule]


def entry(client: httpx.Client, name: str) -> dict[str, Any]:
    listed = client.get("/api/schedules").json()["schedules"]
    return next(each for each in listed if each["name"] == name)


def test_a_schedule_fires_and_survives_a_restart(make_server: MakeServer,
                                                 tmp_path: Path) -> None:
    env = schedules_env(tmp_path)
    server = make_server(env=env)
    with server.client() as client:
        first = wait_for(lambda: [job for job in jobs_of(client, "tick")
                                  if job["state"] == "completed"], 60, 0.1, "a tick job")
        rare = wait_for(lambda: jobs_of(client, "rare"), 30, 0.1, "the rare job")
        tick = entry(client, "tick")
        assert tick["kind"] == "sleep" and tick["every_s"] == 2 and tick["priority"] == 3
        assert tick["input"] == {"seconds": 0, "steps": 1} and tick["paused"] is False
        assert tick["last_job_id"] in {job["id"] for job in jobs_of(client, "tick")}
        assert first[0]["timeout_s"] == 30
        assert entry(client, "rare")["priority"] is None
    server.stop()
    before = {path.parent.name for path in (server.data_dir / "jobs").glob("*/job.json")
              if (p.read_json(path) or {}).get("schedule") == "tick"}
    assert {job["id"] for job in first} <= before
    server = make_server(env=env, workers=2)  # two supervisors: one leads
    with server.client() as client:
        # The restart's slot and the next one (jobs on disk before it are not counted).
        later = wait_for(lambda: len({job["id"] for job in jobs_of(client, "tick")} - before)
                         >= 2, 60, 0.1, "tick jobs after the restart")
        assert later
        assert [job["id"] for job in jobs_of(client, "rare")] == [rare[0]["id"]]
        ids = [job["id"] for job in jobs_of(client, "tick")]
        assert len(ids) == len(set(ids))
        rare_entry = entry(client, "rare")
        assert rare_entry["last_job_id"] == rare[0]["id"]
        assert rare_entry["last_state"] == "completed"
        assert p.parse_iso(rare_entry["next_run_at"]) > time.time()


def test_a_supervisor_started_again_while_the_file_is_broken_goes_on_with_the_last_good(
        make_server: MakeServer, tmp_path: Path) -> None:
    # Every schedule stopped ("no schedules: ..."), while the API listed them and said
    # "the last good schedules stay until the file is fixed".
    env = schedules_env(tmp_path)
    server = make_server(env=env)
    with server.client() as client:
        wait_for(lambda: jobs_of(client, "tick"), 60, 0.1, "a tick job")
        Path(env["OFFLOAD_SCHEDULES_FILE"]).write_text(SCHEDULES + "bogus = 1\n")
        wait_for(lambda: client.get("/api/schedules").json()["error"], 30, 0.1,
                 "the file's error")
        time.sleep(3 * RELOAD_CHECK_S)  # the supervisor has read it too
        killed = server.supervisor()
        killed.kill()
        killed.wait(10)

        def started_again() -> bool:
            try:
                return server.supervisor().pid != killed.pid
            except (StopIteration, psutil.Error):  # none yet, or one going
                return False

        wait_for(started_again, 30, 0.1, "a supervisor started again")
        before = {job["id"] for job in jobs_of(client, "tick")}
        wait_for(lambda: len({job["id"] for job in jobs_of(client, "tick")} - before) >= 2,
                 60, 0.1, "tick jobs from the supervisor started again")
    said = (server.data_dir / "supervisor.log").read_text()
    assert "unknown field bogus" in said and "(2 schedules go on, as last applied)" in said


def test_a_slot_whose_creation_stopped_halfway_is_created(make_server: MakeServer,
                                                          data_dir: Path,
                                                          tmp_path: Path) -> None:
    env = schedules_env(tmp_path)
    rare = next(each for each in load(tmp_path / "schedules.toml") if each.name == "rare")
    # Its folder made, its file not written (the disk was full, or the leader was killed).
    (data_dir / "jobs" / rare.job_id(rare.slot(time.time()))).mkdir(parents=True)
    server = make_server(env=env)
    with server.client() as client:
        job = wait_for(lambda: [job for job in jobs_of(client, "rare")
                                if job["state"] == "completed"], 30, 0.1, "the rare job done")
    assert job[0]["id"] == rare.job_id(rare.slot(time.time()))


def test_an_edited_schedules_file_applies_without_a_restart(make_server: MakeServer,
                                                            tmp_path: Path) -> None:
    rare_only = SCHEDULES.split("[tick]")[0]
    env = schedules_env(tmp_path, rare_only)
    path = Path(env["OFFLOAD_SCHEDULES_FILE"])
    server = make_server(env=env)

    def listed(client: httpx.Client) -> tuple[list[str], str | None]:
        answer = client.get("/api/schedules").json()
        return [each["name"] for each in answer["schedules"]], answer["error"]

    with server.client() as client:
        assert listed(client) == (["rare"], None)
        path.write_text(SCHEDULES)  # a schedule added
        wait_for(lambda: listed(client) == (["rare", "tick"], None), 30, 0.1,
                 "the added schedule listed")
        wait_for(lambda: [job for job in jobs_of(client, "tick")
                          if job["state"] == "completed"], 60, 0.1, "the added schedule's job")

        # A change that cannot be used: said, and the last good schedules go on.
        path.write_text(SCHEDULES + "\n[broken]\nkind = 'nope'\nevery = 5\n")
        def refused() -> tuple[list[str], str] | None:
            names, error = listed(client)
            return None if error is None else (names, error)

        names, error = wait_for(refused, 30, 0.1, "the file's error")
        assert names == ["rare", "tick"]
        assert "schedule [broken]: unknown job kind 'nope'" in error
        assert "last good schedules stay" in error
        before = {job["id"] for job in jobs_of(client, "tick")}
        wait_for(lambda: {job["id"] for job in jobs_of(client, "tick")} - before, 30, 0.1,
                 "a tick job after the bad change")
        assert client.post("/api/schedules/tick/pause").status_code == 200
        path.write_bytes(SCHEDULES.encode() + b"# caf\xe9\n")  # not UTF-8: said too
        wait_for(lambda: "codec can't decode" in (listed(client)[1] or ""), 30, 0.1,
                 "the file's error")

        path.write_text(rare_only)  # fixed, and a schedule removed
        wait_for(lambda: listed(client) == (["rare"], None), 30, 0.1, "the fixed file")
        gone = client.post("/api/schedules/tick/resume")
        assert gone.status_code == 404 and "the schedules are: rare" in gone.json()["detail"]

        # Changed while nobody asked the API, then broken: the API's last good schedules
        # are the supervisor's (it listed those of its last request, without `tick`).
        path.write_text(SCHEDULES)
        time.sleep(3 * RELOAD_CHECK_S)  # the supervisor has read it (`tick` stays paused)
        path.write_text(SCHEDULES + "\n[broken]\nkind = 'nope'\nevery = 5\n")
        names, error = wait_for(refused, 30, 0.1, "the file's error")
        assert names == ["rare", "tick"], (names, error)


def test_without_a_schedules_file_there_are_none_and_nothing_is_wrong(
        make_server: MakeServer) -> None:
    server = make_server()  # schedules.toml in the working folder: there is none
    with server.client() as client:
        assert client.get("/api/schedules").json() == {"schedules": [], "error": None}
    log = server.data_dir / "supervisor.log"
    wait_for(lambda: log.exists() and "supervisor leads" in log.read_text(), 30, 0.1,
             "the supervisor's lead")
    assert " ERROR " not in log.read_text()


def test_a_paused_schedule_creates_nothing_until_resumed(make_server: MakeServer,
                                                         tmp_path: Path) -> None:
    env = schedules_env(tmp_path, SCHEDULES.replace('"36500d"', "2"))
    server = make_server(env=env)
    with server.client() as client:
        wait_for(lambda: jobs_of(client, "rare"), 30, 0.1, "a first job")
        paused = client.post("/api/schedules/rare/pause")
        assert paused.status_code == 200 and paused.json()["paused"] is True
        assert paused.json()["next_run_at"] is None
        missing = client.post("/api/schedules/nightly/pause")
        assert missing.status_code == 404
        assert "no schedule named 'nightly'" in missing.json()["detail"]
        assert "rare, tick" in missing.json()["detail"]
        assert client.post("/api/schedules/nightly/resume").status_code == 404
    server.stop()
    server = make_server(env=env)  # the pause outlasts a restart
    with server.client() as client:
        assert entry(client, "rare")["paused"] is True
        count = len(jobs_of(client, "rare"))
        # Two slots of the other schedule pass: its jobs are created, this one's not.
        ticks = {job["id"] for job in jobs_of(client, "tick")}
        wait_for(lambda: len({job["id"] for job in jobs_of(client, "tick")} - ticks) >= 2,
                 60, 0.1, "two slots")
        assert len(jobs_of(client, "rare")) == count
        resumed = client.post("/api/schedules/rare/resume").json()
        assert resumed["paused"] is False and resumed["next_run_at"] is not None
        wait_for(lambda: len(jobs_of(client, "rare")) > count, 30, 0.1, "a job once resumed")


def test_the_paused_queue_starts_nothing_until_resumed(make_server: MakeServer) -> None:
    server = make_server()
    with server.client() as client:
        assert client.get("/api/queue").json()["paused"] is False
        running = client.post("/api/jobs", json={"kind": "sleep",
                                                 "input": {"seconds": 2}}).json()["id"]
        wait_for(lambda: client.get(f"/api/jobs/{running}").json()["state"] == "running",
                 30, 0.05, "the first job running")
        assert client.post("/api/queue/pause").json()["paused"] is True
        assert client.get("/api/health").json()["queue"]["paused"] is True
        waiting = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0}})
        assert waiting.status_code == 202
        waiting_id = waiting.json()["id"]
        # The running job finishes while the queue is paused; the queued one stays.
        done = wait_for(lambda: (job := client.get(f"/api/jobs/{running}").json())["state"]
                        in p.FINAL_STATES and job, 30, 0.1, "the running job's end")
        assert done["state"] == "completed"
        time.sleep(1.0)  # several supervisor passes
        assert client.get(f"/api/jobs/{waiting_id}").json()["state"] == "queued"
    server.stop()
    server = make_server()  # the pause outlasts a restart
    with server.client() as client:
        assert client.get("/api/queue").json()["paused"] is True
        assert client.get(f"/api/jobs/{waiting_id}").json()["state"] == "queued"
        assert client.post("/api/queue/resume").json()["paused"] is False
        assert client.get("/api/health").json()["queue"]["paused"] is False
        wait_for(lambda: client.get(f"/api/jobs/{waiting_id}").json()["state"] == "completed",
                 30, 0.05, "the queued job's run once resumed")


# The caps by kind of the default OFFLOAD_KIND_CAPS, none set while running.
TRAIN_ALONE = {"kind_caps": {"train": 1}, "kind_caps_default": {"train": 1}, "kind_caps_set": [],
               "kinds": ["chat", "probe", "sleep", "train"],
               "model_slots": 1,  # the embedded model's, sized at start: one per runner
               "model_engine": embedded.engine()}  # llama-server where it is built


def test_a_kinds_cap_changes_while_it_runs(make_server: MakeServer) -> None:
    # As a Pueue group's `parallel N --group G`: one kind's cap, the others' untouched.
    env = {"OFFLOAD_MAX_CONCURRENT": "4", "OFFLOAD_KIND_CAPS": "sleep=1"}
    server = make_server(env=env)
    with server.client() as client:
        ids = [client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 30}}
                           ).json()["id"] for _ in range(3)]

        def running() -> int:
            return [client.get(f"/api/jobs/{job_id}").json()["state"]
                    for job_id in ids].count("running")

        wait_for(lambda: running() == 1, 30, 0.05, "a first runner")
        time.sleep(1.0)  # several passes: one runs, at the kind's cap
        assert running() == 1
        raised = client.put("/api/queue/cap", json={"max_concurrent": 2, "kind": "sleep"})
        assert raised.status_code == 200, raised.text
        assert {key: raised.json()[key] for key in ("max_concurrent", "kind_caps",
                                                    "kind_caps_default", "kind_caps_set")} == {
            "max_concurrent": 4, "kind_caps": {"sleep": 2}, "kind_caps_default": {"sleep": 1},
            "kind_caps_set": ["sleep"]}
        wait_for(lambda: running() == 2, 30, 0.05, "a second runner")
        # Back to the setting's: the two go on, the third waits.
        back = client.put("/api/queue/cap", json={"max_concurrent": None, "kind": "sleep"})
        assert back.json()["kind_caps"] == {"sleep": 1} and back.json()["kind_caps_set"] == []
        time.sleep(1.0)
        assert running() == 2
        for body, needle in (({"max_concurrent": 1, "kind": "nope"}, "unknown job kind 'nope'"),
                             ({"max_concurrent": 1, "kind": 5}, "kind"),
                             ({"max_concurrent": 1, "kind": "x" * 65}, "kind"),
                             ({"max_concurrent": 0, "kind": "sleep"}, "max_concurrent")):
            refused = client.put("/api/queue/cap", json=body)
            assert refused.status_code == 422 and needle in refused.json()["detail"], refused.text
        for job_id in ids:
            client.delete(f"/api/jobs/{job_id}")
        assert client.put("/api/queue/cap", json={"max_concurrent": 3, "kind": "probe"}
                          ).status_code == 200
    server.stop()
    # A cap set for a kind without one of its own outlasts a restart; lifted, the jobs
    # it held back start at once.
    server = make_server(env={**env, "OFFLOAD_KIND_CAPS": ""})
    with server.client() as client:
        assert client.get("/api/queue").json()["kind_caps"] == {"probe": 3}
        client.put("/api/queue/cap", json={"max_concurrent": 1, "kind": "sleep"})
        ids = [client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 30}}
                           ).json()["id"] for _ in range(3)]
        wait_for(lambda: running() == 1, 30, 0.05, "a first runner")
        time.sleep(1.0)
        assert running() == 1
        lifted = client.put("/api/queue/cap", json={"max_concurrent": None, "kind": "sleep"})
        assert lifted.json()["kind_caps"] == {"probe": 3}
        wait_for(lambda: running() == 3, 30, 0.05, "all three running")
        for job_id in ids:
            client.delete(f"/api/jobs/{job_id}")
        # The cap of a kind no longer there (its runner removed) is not shown, and can be
        # taken away (it could not: "unknown job kind").
        path = server.data_dir / "queue.cap"
        path.write_text(json.dumps({"kinds": {"probe": 3, "gone": 2}}))
        assert client.get("/api/queue").json()["kind_caps"] == {"probe": 3}
        gone = client.put("/api/queue/cap", json={"max_concurrent": None, "kind": "gone"})
        assert gone.status_code == 200 and json.loads(path.read_text())["kinds"] == {"probe": 3}
        # A kind neither known nor capped is a typo, taken with a 200 and nothing done.
        typo = client.put("/api/queue/cap", json={"max_concurrent": None, "kind": "gone"})
        assert typo.status_code == 422 and "unknown job kind 'gone'" in typo.json()["detail"]


def test_the_cap_on_runners_changes_while_it_runs(make_server: MakeServer) -> None:
    # As `pueue parallel` or Celery's pool_grow: no restart, no job lost or stopped.
    env = {"OFFLOAD_MAX_CONCURRENT": "1"}
    server = make_server(env=env)
    with server.client() as client:
        assert client.get("/api/queue").json() == {
            "paused": False, "max_concurrent": 1, "max_concurrent_default": 1,
            "max_concurrent_set": False, **TRAIN_ALONE}
        ids = [client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 30}}
                           ).json()["id"] for _ in range(3)]

        def states() -> list[str]:
            return [client.get(f"/api/jobs/{job_id}").json()["state"] for job_id in ids]

        wait_for(lambda: "running" in states(), 30, 0.05, "a first runner")
        time.sleep(1.0)  # several supervisor passes: one runs, at the setting's cap
        assert sorted(states()) == ["queued", "queued", "running"]
        raised = client.put("/api/queue/cap", json={"max_concurrent": 3})
        assert raised.status_code == 200
        assert raised.json() == {"paused": False, "max_concurrent": 3,
                                 "max_concurrent_default": 1, "max_concurrent_set": True,
                                 **TRAIN_ALONE}
        wait_for(lambda: states() == ["running"] * 3, 30, 0.05, "all three running")
        health = client.get("/api/health").json()
        assert health["max_concurrent"] == 3 and health["queue"]["max_concurrent"] == 3
        # Lowered: the running ones go on; none starts until fewer run than the cap.
        assert client.put("/api/queue/cap", json={"max_concurrent": 2}).status_code == 200
        fourth = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0}}
                             ).json()["id"]
        time.sleep(1.0)
        assert states() == ["running"] * 3
        assert client.get(f"/api/jobs/{fourth}").json()["state"] == "queued"
        for wrong in (0, 1025, True, "2", 2.0, None, [2]):
            body = {} if wrong is None else {"max_concurrent": wrong}
            refused = client.put("/api/queue/cap", json=body)
            assert refused.status_code == 422, (wrong, refused.text)
            assert "max_concurrent" in refused.json()["detail"], refused.text
        assert client.get("/api/queue").json()["max_concurrent"] == 2
        assert client.delete(f"/api/jobs/{ids[0]}").status_code == 200
        wait_for(lambda: states()[0] == "cancelled", 30, 0.05, "the first one's end")
        time.sleep(1.0)  # two run: the cap's
        assert client.get(f"/api/jobs/{fourth}").json()["state"] == "queued"
        assert client.delete(f"/api/jobs/{ids[1]}").status_code == 200
        wait_for(lambda: client.get(f"/api/jobs/{fourth}").json()["state"] == "completed",
                 30, 0.05, "the fourth job's run once one ran")
        assert states()[2] == "running"
    server.stop()
    server = make_server(env=env)  # the cap outlasts a restart
    with server.client() as client:
        assert client.get("/api/queue").json()["max_concurrent"] == 2
        # A file edited by hand into no cap is left alone: the setting's cap applies.
        (server.data_dir / "queue.cap").write_text('{"max_concurrent": "many"}')
        assert client.get("/api/queue").json()["max_concurrent"] == 1
        back = client.put("/api/queue/cap", json={"max_concurrent": None})
        assert back.json() == {"paused": False, "max_concurrent": 1,
                               "max_concurrent_default": 1, "max_concurrent_set": False,
                               **TRAIN_ALONE}
        assert not (server.data_dir / "queue.cap").exists()
        # The setting's own number, set: said so, as it stays through a restart.
        pinned = client.put("/api/queue/cap", json={"max_concurrent": 1}).json()
        assert pinned["max_concurrent_set"] is True
        # A pipe or a looping link put in the file's place: no 500, no hang.
        for make in (lambda path: os.mkfifo(path), lambda path: path.symlink_to(path.name)):
            cap_file = server.data_dir / "queue.cap"
            cap_file.unlink()
            make(cap_file)
            for route in ("/api/queue", "/api/health", "/metrics"):
                assert client.get(route, timeout=10).status_code == 200, route
        cap_file.unlink()
        client.delete(f"/api/jobs/{ids[2]}")


def test_a_lower_cap_or_a_pause_holds_in_the_middle_of_a_burst(
        make_server: MakeServer) -> None:
    # A burst of launches takes seconds: the cap and the pause were read once for all.
    server = make_server(env={"OFFLOAD_MAX_CONCURRENT": "1", "OFFLOAD_MAX_QUEUED": "500"})
    with server.client() as client:
        burst = 100
        ids = [client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 120}}
                           ).json()["id"] for _ in range(burst)]

        def running() -> int:
            return int(client.get("/api/health").json()["running"])

        for stop in ({"max_concurrent": 2}, None):  # lowered; then paused
            client.put("/api/queue/cap", json={"max_concurrent": burst})
            if stop is None:
                client.post("/api/queue/pause")
            else:
                client.put("/api/queue/cap", json=stop)
            time.sleep(3)  # the burst would have reached every job by now
            held = running()
            assert held < burst / 2, held
            time.sleep(1)
            assert running() == held  # and no launch since
            client.post("/api/queue/resume")
        for job_id in ids:
            client.delete(f"/api/jobs/{job_id}")


def test_missed_slots_are_one_job_and_a_slot_is_never_created_twice(data_dir: Path,
                                                                    tmp_path: Path) -> None:
    store = JobStore(data_dir / "jobs")
    path = tmp_path / "schedules.toml"
    path.write_text("[often]\nkind = 'sleep'\nevery = 60\ninput = {seconds = 0}\n")
    (schedule,) = load(path)
    created: list[str] = []
    scheduler = Scheduler(store, ScheduleFile(path, (schedule,)),
                          Settings(OFFLOAD_JOB_TIMEOUT_S=30))
    now = 1_800_000_000.0
    scheduler.fire(created.append, now)
    scheduler.fire(created.append, now + 1)
    assert created == [schedule.job_id(schedule.slot(now))]
    job = store.read(created[0])
    assert job["schedule"] == "often" and job["state"] == "queued" and job["timeout_s"] == 30
    # Still queued: a later slot waits for it rather than piling up a second job, and is
    # run by it: once it ran, the slot it ran in made a second job, back to back.
    scheduler.fire(created.append, now + 600)
    assert len(created) == 1
    p.write_json(store.path(created[0]), {**job, "state": "completed",
                                          "started_at": p.iso(now + 600.5)})
    scheduler.fire(created.append, now + 601)
    assert len(created) == 1
    # From a new scheduler (a restart) too; the next slot has a job of its own.
    again = Scheduler(store, ScheduleFile(path, (schedule,)), Settings(OFFLOAD_JOB_TIMEOUT_S=30))
    again.fire(created.append, now + 602)
    assert len(created) == 1
    again.fire(created.append, now + 660)
    again.fire(created.append, now + 661)
    assert created[1:] == [schedule.job_id(schedule.slot(now + 660))]
    # A slot's job made before its record (a crash between), the one before queued again
    # (a retry): the slot's job is its run, not the queued one (both would run).
    p.write_json(store.path(created[1]), {**store.read(created[1]), "state": "queued"})
    mine = schedule.job_id(schedule.slot(now + 720))
    store.create("sleep", {"seconds": 0}, 30, job_id=mine)
    again.fire(created.append, now + 720)
    assert (control.last_fired(data_dir, "often") or {}).get("job_id") == mine


def test_a_schedule_creates_no_chat_in_a_forgotten_conversation(
        data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A forgotten conversation's session_id is refused for good by the API; a schedule
    whose chats name it went on creating turns in it, the conversation open again."""
    store = JobStore(data_dir / "jobs")
    path = tmp_path / "schedules.toml"
    path.write_text("[ask]\nkind = 'chat'\nevery = 60\ninput = {messages = [{role = 'user', "
                    "content = 'status?'}], session_id = 'ops'}\n")
    (schedule,) = load(path)
    created: list[str] = []
    scheduler = Scheduler(store, ScheduleFile(path, (schedule,)), Settings())
    now = 1_800_000_000.0
    scheduler.fire(created.append, now)
    assert len(created) == 1 and store.read(created[0])["input"]["session_id"] == "ops"
    p.write_json(store.path(created[0]), {**store.read(created[0]), "state": "completed"})
    store.mark_session_forgotten("ops")  # as DELETE /api/sessions/ops does
    for later in (now + 60, now + 61, now + 120):
        scheduler.fire(created.append, later)
    assert len(created) == 1, created
    said = [r.getMessage() for r in caplog.records if "was forgotten" in r.getMessage()]
    assert said == ["schedule ask: its chats' conversation (session_id) was forgotten, so "
                    "it creates none; give it another session_id"], said


def test_a_new_cron_series_starts_with_its_next_time_and_a_changed_timing_is_one(
        data_dir: Path, tmp_path: Path) -> None:
    store = JobStore(data_dir / "jobs")
    path = tmp_path / "schedules.toml"
    created: list[str] = []

    def scheduler(table: str) -> tuple[Scheduler, Schedule]:
        path.write_text(f"[nightly]\nkind = 'sleep'\ninput = {{seconds = 0}}\n{table}\n")
        (schedule,) = load(path)
        return Scheduler(store, ScheduleFile(path, (schedule,)),
                         Settings(OFFLOAD_JOB_TIMEOUT_S=30)), schedule

    def done() -> None:
        for job_id in created:
            p.write_json(store.path(job_id), {**store.read(job_id), "state": "completed"})

    noon = datetime(2026, 12, 2, 12, 0, tzinfo=timezone.utc).timestamp()
    nightly, schedule = scheduler('cron = "30 2 * * *"')
    nightly.fire(created.append, noon)  # added at noon: not run for last night's 02:30
    assert created == []
    tomorrow = noon + 14.5 * 3600 + 5  # 02:30:05 the next day
    nightly.fire(created.append, tomorrow)
    assert created == [schedule.job_id(schedule.slot(tomorrow))]
    done()
    # Its time zone changed: a new series, whose latest time (01:30 UTC) is past: none now,
    # and none again from the scheduler's memory of the old series either.
    berlin, moved = scheduler('cron = "30 2 * * *"\ntimezone = "Europe/Berlin"')
    berlin.fire(created.append, tomorrow + 60)
    nightly.schedules = berlin.schedules
    nightly.fire(created.append, tomorrow + 120)
    assert len(created) == 1
    # Its newest job is still its last (`last_job_id`): the new series' slot has none.
    assert (control.last_fired(data_dir, "nightly") or {}).get("job_id") == created[0]
    # Added on the minute of its time, it runs then.
    minute, each = scheduler('cron = "* * * * *"')
    minute.fire(created.append, tomorrow + 125)
    assert created[1:] == [each.job_id(each.slot(tomorrow + 125))]
    done()
    # Back to `every`: a series of its own, which runs its current slot at once.
    hourly, every = scheduler('every = "1h"')
    hourly.fire(created.append, tomorrow + 130)
    assert created[2:] == [every.job_id(every.slot(tomorrow + 130))]
    assert moved.job_id(5) != schedule.job_id(5) != every.job_id(5)


def test_a_clock_that_was_ahead_stops_no_schedule(data_dir: Path, tmp_path: Path) -> None:
    # Fired while the clock was a day ahead (a wrong clock at boot, before NTP): that
    # record covered every slot up to it, and the schedule fired nothing for a day.
    store = JobStore(data_dir / "jobs")
    path = tmp_path / "schedules.toml"
    path.write_text("[hourly]\nkind = 'sleep'\nevery = '1h'\ninput = {seconds = 0}\n")
    (schedule,) = load(path)
    created: list[str] = []

    def fire(now: float) -> None:
        scheduler = Scheduler(store, ScheduleFile(path, (schedule,)),
                              Settings(OFFLOAD_JOB_TIMEOUT_S=30))  # as after a restart
        before = len(created)
        scheduler.fire(created.append, now)
        for job_id in created[before:]:  # done at once: the next slot does not wait for it
            p.write_json(store.path(job_id), {**store.read(job_id), "state": "completed"})

    now = 1_800_000_000.0
    fire(now + 86_400)
    for hour in range(3):
        fire(now + hour * 3600)
    assert created == [schedule.job_id(schedule.slot(now + 86_400))] + [
        schedule.job_id(schedule.slot(now + hour * 3600)) for hour in range(3)]
    fire(now + 2 * 3600 - 5)  # set back by a little, into the slot before: nothing again
    fire(now + 2 * 3600 + 5)
    assert len(created) == 4


@pytest.mark.parametrize(("text", "message"), [
    ("[a]\nkind = 'nope'\nevery = 5\n", "schedule [a]: unknown job kind 'nope'; known kinds:"),
    ("[a]\nkind = 'sleep'\nevery = '5 weeks'\n", "schedule [a]: `every` must be a number"),
    ("[a]\nkind = 'sleep'\nevery = 0\n", "schedule [a]: `every` must be at least 1 s"),
    ("[a]\nkind = 'sleep'\nevery = 1e308\n", "schedule [a]: `every` must be at most"),
    ("[a]\nkind = 'sleep'\nevery = '1e308h'\n", "schedule [a]: `every` must be a number"),
    ("[a]\nkind = 'sleep'\n", "schedule [a]: give `every`"),
    ("[a]\nkind = 'sleep'\nevery = 5\ninput = {seconds = -1}\n",
     "schedule [a]: invalid input for a 'sleep' job: input.seconds"),
    ("[a]\nkind = 'sleep'\nevry = 5\n", "schedule [a]: unknown field evry"),
    # TOML's dates and times are no JSON: a kind that takes any JSON took them, and every
    # supervisor pass then failed on the job it could not write (its schedule never ran).
    ("[a]\nkind = 'probe'\nevery = 5\ninput = {at = 2026-01-01T00:00:00Z}\n",
     "schedule [a]: invalid input for a 'probe' job: '2026-01-01 00:00:00+00:00' (a datetime) "
     "is no JSON value"),
    ("[a]\nkind = 'probe'\nevery = 5\ninput = {x = [{t = 07:32:00}]}\n",
     "(a time) is no JSON value"),
    ("[A]\nkind = 'sleep'\nevery = 5\n", "schedule [A]: a schedule's name is"),
    ("[nul]\nkind = 'sleep'\nevery = 5\n", "schedule [nul]: a schedule's name cannot be "
                                          "nul, the name of a device on Windows"),
    ("[a]\nkind = 'sleep'\nevery = -2e301\n", "schedule [a]: `every` must be at least 1 s"),
    ("[a]\nkind = 'sleep'\nevery = nan\n", "schedule [a]: `every` must be at least 1 s"),
    ("[a]\nkind = 'sleep'\nevery = 5\npriority = 'high'\n", "`priority` must be a whole"),
    ("[a]\nkind = 'sleep'\nevery = 5\npriority = 5000\n", "from -1000 to 1000"),
    ("[a\n", "cannot read the schedules file"),
    # Errors other than a ValueError of ours, until they were turned into one: an edit
    # to the file then made a 500 and a failed supervisor pass, then went unreported.
    (b"[a]\nkind = 'sleep'\nevery = 5\n# caf\xe9\n", "cannot read the schedules file"),
    ("a = " + "[" * 5000 + "]" * 5000 + "\n", "cannot read the schedules file"),
    ("[a]\nkind = ['sleep']\nevery = 5\n", "schedule [a]: unknown job kind ['sleep']"),
    ("[a]\nkind = 'sleep'\nevery = 1" + "0" * 400 + "\n", "schedule [a]: `every` must be"),
])
def test_a_bad_schedules_file_names_the_file_and_the_entry(data_dir: Path, tmp_path: Path,
                                                           text: str | bytes,
                                                           message: str) -> None:
    path = tmp_path / "schedules.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ScheduleError) as raised:
        load(path)
    assert str(path) in str(raised.value) and message in str(raised.value)


def test_a_schedules_file_in_error_is_read_again_until_fixed(
        data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("jobs.schedules.RELOAD_CHECK_S", 0.0)
    path = tmp_path / "schedules.toml"
    good = "[a]\nkind = 'sleep'\nevery = 5\n"
    path.write_text(good)
    schedules = ScheduleFile(path, load(path))
    path.write_text(good.replace("5", "0"))
    stat = path.stat()
    assert [each.every_s for each in schedules.current()] == [5]
    assert schedules.error is not None and "schedule [a]: `every`" in schedules.error
    # Fixed within the file system's clock tick (its time and size as they were): applied.
    path.write_text(good.replace("5", "7"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert [each.every_s for each in schedules.current()] == [7]
    assert schedules.error is None


def test_a_copy_is_kept_of_each_new_set_of_schedules_only(
        data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each look after a start, or after a comment edited, wrote the copy again, durably.
    monkeypatch.setattr("jobs.schedules.RELOAD_CHECK_S", 0.0)
    path = tmp_path / "schedules.toml"
    path.write_text("[a]\nkind = 'sleep'\nevery = 5\n")
    kept: list[bytes | None] = []
    schedules = ScheduleFile(path, load(path), applied=kept.append)
    schedules.current()
    path.write_text("# nightly\n[a]\nkind = 'sleep'\nevery = 5\n")
    schedules.current()
    assert kept == []
    path.write_text("[a]\nkind = 'sleep'\nevery = 7\n")
    schedules.current()
    path.unlink()
    schedules.current()
    assert kept == [b"[a]\nkind = 'sleep'\nevery = 7\n", None]


def test_a_change_while_the_file_was_first_read_applies(
        data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("jobs.schedules.RELOAD_CHECK_S", 0.0)
    path = tmp_path / "schedules.toml"
    path.write_text("[a]\nkind = 'sleep'\nevery = 5\n")
    # As if it changed between its first reading and the first look at its signature.
    schedules = ScheduleFile(path, ())
    assert [each.name for each in schedules.current()] == ["a"]


def test_a_named_pipe_in_place_of_the_file_is_refused_without_waiting(tmp_path: Path) -> None:
    if sys.platform == "win32":
        pytest.skip("named pipes in the file system are POSIX")
    path = tmp_path / "schedules.toml"
    os.mkfifo(path)
    raised: list[ScheduleError] = []

    def read() -> None:
        try:
            load(path)
        except ScheduleError as exc:
            raised.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(60)
    try:
        # Blocked in open() until a writer came, it held the lock every request waits for.
        assert not reader.is_alive(), "load() waits for a writer to the pipe"
        assert len(raised) == 1 and "not a regular file" in str(raised[0])
    finally:
        with contextlib.suppress(OSError):  # lets a blocked reader go
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


CRON = """
[each-minute]
kind = "sleep"
cron = "* * * * *"
input = {seconds = 0}

[berlin-night]
kind = "sleep"
cron = "30 2 * * *"
timezone = "Europe/Berlin"
input = {seconds = 0}
"""


def test_a_cron_schedule_fires_in_its_minute_once_and_says_its_next_time(
        make_server: MakeServer, tmp_path: Path) -> None:
    # As Celery beat's crontab or RQ's cron: times of the day in a time zone.
    env = schedules_env(tmp_path, CRON)
    server = make_server(env=env)
    with server.client() as client:
        ran = wait_for(lambda: [job for job in jobs_of(client, "each-minute")
                                if job["state"] == "completed"], 60, 0.1, "its minute's job")
        minute = entry(client, "each-minute")
        assert (minute["cron"], minute["timezone"], minute["every_s"]) == ("* * * * *", None, None)
        created = datetime.fromisoformat(ran[0]["created_at"].replace("Z", "+00:00"))
        following = datetime.fromisoformat(minute["next_run_at"].replace("Z", "+00:00"))
        assert following.second == 0 and 0 < (following - created).total_seconds() <= 60, (
            created, following)
        night = entry(client, "berlin-night")
        assert night["timezone"] == "Europe/Berlin"
        at = datetime.fromisoformat(night["next_run_at"].replace("Z", "+00:00"))
        assert at.astimezone(ZoneInfo("Europe/Berlin")).strftime("%H:%M") in ("02:30", "03:00")
    server.stop()
    server = make_server(env=env)  # a restart in the same minute makes no second job
    with server.client() as client:
        time.sleep(3)
        ids = {job["id"] for job in jobs_of(client, "each-minute")}
        minutes = int(time.time() // 60 - created.timestamp() // 60) + 1
        assert ran[0]["id"] in ids and len(ids) <= minutes, (ids, minutes)


def test_cron_times_and_what_a_cron_schedule_refuses(tmp_path: Path) -> None:
    def at(text: str) -> float:
        return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()

    night = Schedule("night", "sleep", None, {}, cron="30 2 * * *", timezone="Europe/Berlin")
    slot = night.slot(at("2026-03-28T12:00:00"))
    # 02:30 in Berlin (01:30 UTC in winter); on the night the clocks skip 02:00-03:00,
    # at 03:00 (as cron runs a skipped time once the clock has passed it); then in summer.
    times = [night.starts(slot), night.starts(night.next_slot(slot)),
             night.starts(night.next_slot(night.next_slot(slot)))]
    assert times == [at("2026-03-28T01:30:00"), at("2026-03-29T01:00:00"),
                     at("2026-03-30T00:30:00")]
    minute = Schedule("m", "sleep", None, {}, cron="* * * * *")
    assert minute.slot(at("2026-12-02T10:00:00")) == minute.slot(at("2026-12-02T10:00:59.9"))
    assert minute.job_id(5) != Schedule("m", "sleep", 60, {}).job_id(5), "timings differ"
    assert night.has_job({"slot": slot, "cron": "30 2 * * *", "timezone": "Europe/Berlin"}, slot)
    assert not night.has_job({"slot": slot, "cron": "30 3 * * *", "timezone": "Europe/Berlin"},
                             slot), "another time: its slots start anew"
    assert parse_cron(" 0  3 * * MON-fri ", "UTC") == ("0 3 * * mon-fri", None)
    assert parse_cron("@Daily", "Europe/Berlin") == ("@daily", "Europe/Berlin")
    # A range that runs backwards wraps round (a night window, a week from Monday), as
    # schedules written before stay meant.
    late = Schedule("late", "sleep", None, {}, cron="0 22-1 * * *")
    slot = late.slot(at("2026-12-02T20:00:00"))
    hours = []
    for _ in range(5):
        hours.append(datetime.fromtimestamp(late.starts(slot), timezone.utc).hour)
        slot = late.next_slot(slot)
    assert hours == [1, 22, 23, 0, 1], hours  # the slot under way at 20:00, then on
    assert parse_cron("0 9 * * mon-sun", None) == ("0 9 * * mon-sun", None)
    # croniter's own extensions are no crontab's: R (random) gave another slot at each
    # look, so a job at every pass; # ANDs a day with a weekday.
    for cron, zone, needle in (("0 3 * *", None, "five fields"), ("* * * * * *", None, "five"),
                               ("@reboot", None, "five fields"), ("61 * * * *", None, "five"),
                               (5, None, "five fields"), ("0 0 30 2 *", None, "no time that"),
                               ("R * * * *", None, "five"), ("H * * * *", None, "five"),
                               ("0 0 31 * 1#5", None, "five"), ("0 0 L * *", None, "five"),
                               ("0 0 15W * *", None, "five"), ("0 0 ? * *", None, "five"),
                               ("0 0 * mon *", None, "five"), ("1," * 20_000 + " * * * *",
                                                               None, "characters"),
                               ("* * * * *", "Mars/Base", "time zone's name"),
                               ("* * * * *", "localtime", "time zone's name"),
                               ("* * * * *", "posix/Europe/Berlin", "time zone's name"),
                               ("* * * * *", "../../etc/passwd", "time zone's name")):
        with pytest.raises(ValueError, match=needle):
            parse_cron(cron, zone)
    path = tmp_path / "schedules.toml"
    for table, needle in (('every = "1h"\ncron = "@hourly"', "one of them"),
                          ('every = "1h"\ntimezone = "UTC"', "`timezone` goes with `cron`"),
                          ("", "give `every`")):
        path.write_text(f'[x]\nkind = "sleep"\n{table}\n')
        with pytest.raises(ScheduleError, match=needle):
            load(path)


def test_intervals(tmp_path: Path) -> None:
    assert [parse_every(v) for v in ("90s", "30m", "6h", "1d", "1.5h", 2, 2.5)] == [
        90, 1800, 21600, 86400, 5400, 2, 2.5]
    assert load(Path("no-such-file.toml")) == ()
    # Saved by Notepad, with a BOM: "Invalid statement (at line 1, column 1)".
    bom = tmp_path / "schedules.toml"
    bom.write_bytes(b"\xef\xbb\xbf[a]\nkind = 'sleep'\nevery = '1h'\n")
    assert [each.every_s for each in load(bom)] == [3600]


def test_the_api_refuses_to_start_on_a_bad_schedules_file(data_dir: Path,
                                                          tmp_path: Path) -> None:
    bad = schedules_env(tmp_path, "[retrain]\nkind = 'train'\nevery = '6 hours'\n")
    missing = {"OFFLOAD_SCHEDULES_FILE": str(tmp_path / "nowhere.toml")}
    for env, message in ((bad, "schedule [retrain]: `every` must be a number"),
                         (missing, "nowhere.toml, which is not a file")):
        server = Server(data_dir, tmp_path / "server.log", env)
        try:
            with pytest.raises(AssertionError, match="server did not start") as refused:
                server.start()
        finally:
            server.stop()
        assert message in str(refused.value)


def test_the_contracts_example_is_a_valid_schedules_file(data_dir: Path, tmp_path: Path) -> None:
    contract = (ROOT / "docs" / "contract.md").read_text(encoding="utf-8")
    example = contract.split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "schedules.toml"
    path.write_text(example)
    assert [(each.name, each.kind, each.every_s, each.cron) for each in load(path)] == [
        ("retrain", "train", 21600, None), ("heartbeat", "sleep", 600, None),
        ("nightly", "sleep", None, "30 2 * * *")]
