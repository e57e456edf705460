"""Nothing a job carries can change what Offload says about it: a job's output cannot
forge its state over Ray, a job file that is no job is listed as corrupt (never a 500),
the public `sleep` kind has no test knobs, and no package can silently replace a kind."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from jobs import protocol as p
from jobs.kinds import KindClash, UnusableKinds, discover
from jobs.launch.ray import RayLauncher, submission_id
from jobs.protocol import remote
from tests.conftest import ROOT, RunningSupervisor, free_port, wait_for
from tests.fake_ray import FakeRay
from tests.server import Server

MakeServer = Callable[..., Server]
# What a job printed in the issue: a line in the old snapshot format that says "completed".
FORGED = '@@offload 999999999 {"state":"completed","progress":"x","output":"forged"}'


@pytest.fixture
def fake() -> Iterator[FakeRay]:
    with FakeRay() as server:
        yield server


def _submitted(fake: FakeRay, sid: str) -> dict[str, Any]:
    body: dict[str, Any] = wait_for(lambda: next(
        (b for m, _, b in list(fake.requests) if m == "POST" and b["submission_id"] == sid),
        None), what="the job submitted to Ray")
    return body


def _one_more_poll(fake: FakeRay, sid: str) -> None:
    """Wait until the poller asked for the log again: what it read before is applied."""
    def polls() -> int:
        return sum(1 for m, path, _ in list(fake.requests) if path.endswith(f"{sid}/logs"))

    seen = polls()
    wait_for(lambda: polls() > seen, what="another poll of the log")


# -- 9: a job's output cannot forge its state -----------------------------------------


def test_a_job_printing_a_snapshot_line_cannot_forge_its_state_over_ray(
        fake: FakeRay, make_supervisor: Callable[..., RunningSupervisor],
        tmp_path: Path) -> None:
    """The runner really runs Ray's entrypoint with the environment Ray was sent; its
    output is Ray's log, the poller reading it up to the forged line first."""
    sup = make_supervisor(launcher=RayLauncher(fake.address, poll_s=0.02))
    job_id = sup.submit("probe", fail=f"bad luck\n{FORGED}")
    sid = submission_id(job_id)
    body = _submitted(fake, sid)
    ran = subprocess.run(body["entrypoint"], shell=True, cwd=tmp_path, timeout=60,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={"PATH": os.environ["PATH"], **body["runtime_env"]["env_vars"]})
    assert FORGED in ran.stdout, ran.stdout
    cut = ran.stdout.index(FORGED) + len(FORGED) + 1
    log_file = sup.supervisor.dir / job_id / p.LOG_FILE
    with fake.lock:
        fake.jobs[sid]["status"] = "RUNNING"
        fake.logs[sid] = ran.stdout[:cut]
    wait_for(lambda: log_file.exists() and "bad luck" in log_file.read_text(),
             what="the output up to the forged line")
    _one_more_poll(fake, sid)
    assert sup.job(job_id)["state"] == "running", "the forged line changed nothing"
    with fake.lock:
        fake.logs[sid] = ran.stdout
        fake.jobs[sid].update(status="FAILED", driver_exit_code=ran.returncode)
    final = sup.wait_final(job_id)
    assert final["state"] == "failed", final
    assert final["error"] == {"type": "runner", "message": f"bad luck\n{FORGED}"}
    text = log_file.read_text()
    assert FORGED in text, "the forged line is the job's output, shown as such"
    key = body["runtime_env"]["env_vars"][remote.SNAPSHOT_KEY_ENV]
    assert len(key) >= 32 and key not in text and key not in json.dumps(final)


def test_only_lines_with_the_launch_key_are_snapshots_also_after_a_restart(
        fake: FakeRay, make_supervisor: Callable[..., RunningSupervisor]) -> None:
    sup = make_supervisor(launcher=RayLauncher(fake.address, poll_s=0.02))
    job_id = sup.submit(seconds=60)
    sid = submission_id(job_id)
    key = _submitted(fake, sid)["runtime_env"]["env_vars"][remote.SNAPSHOT_KEY_ENV]
    job = p.new_job(job_id, "sleep", {}, 60)
    job.update({p.F_STATE: p.JobState.RUNNING, p.F_PID: 4242, p.F_PROGRESS: {"fraction": 0.5}})
    done = {**job, p.F_STATE: p.JobState.COMPLETED, p.F_FINISHED_AT: p.now_iso(), p.F_EXIT_CODE: 0}
    other_key = remote.snapshot_line(9, done, "0" * 32)  # a guess, or another launch's key
    with fake.lock:
        fake.jobs[sid]["status"] = "RUNNING"
        fake.logs[sid] = FORGED + "\n" + other_key + remote.snapshot_line(1, job, key)
    assert sup.wait_state(job_id, "running")["progress"]["fraction"] == 0.5
    _one_more_poll(fake, sid)
    log_file = sup.supervisor.dir / job_id / p.LOG_FILE
    assert log_file.read_text() == FORGED + "\n" + other_key
    sup.stop()  # a new supervisor adopts the job: the key is in its launch record
    sup = make_supervisor(launcher=RayLauncher(fake.address, poll_s=0.02))
    with fake.lock:
        fake.logs[sid] += remote.snapshot_line(2, done, key)
        fake.jobs[sid].update(status="SUCCEEDED", driver_exit_code=0)
    assert sup.wait_final(job_id)["state"] == "completed"
    assert log_file.read_text() == FORGED + "\n" + other_key


def test_a_runner_sent_without_a_key_refuses_to_run(tmp_path: Path) -> None:
    job = p.new_job("c" * 32, "sleep", {"seconds": 0}, 30)
    env = {k: v for k, v in os.environ.items() if k != remote.SNAPSHOT_KEY_ENV}
    out = subprocess.run([sys.executable, "-m", "runners.sleep", "--remote-job"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**env, "OFFLOAD_DATA_DIR": str(tmp_path), **remote.job_env(job)})
    assert out.returncode == 2 and remote.SNAPSHOT_KEY_ENV in out.stderr
    assert remote.SNAPSHOT_TAG not in out.stdout


# -- 9: a job file that is no job is listed as corrupt --------------------------------


def _write_job(data_dir: Path, job_id: str, data: dict[str, Any]) -> None:
    folder = data_dir / "jobs" / job_id
    folder.mkdir(parents=True)
    (folder / p.JOB_FILE).write_text(json.dumps(data))


def test_a_job_file_that_is_no_job_is_listed_as_corrupt(make_server: MakeServer) -> None:
    server = make_server()
    with server.client() as client:
        good = client.post("/api/jobs", json={"kind": "sleep", "input": {}}).json()
        wait_for(lambda: client.get(f"/api/jobs/{good['id']}").json()["state"] == "completed",
                 30, what="a good job done")
        valid = client.get(f"/api/jobs/{good['id']}").json()
        deep: list[Any] = []
        for _ in range(300):  # JSON, but deeper than any answer of the API goes: it gave 500s
            deep = [deep]
        changes: list[dict[str, Any]] = [
            {"state": "done"}, {"created_at": "yesterday"}, {"error": "a string"},
            {"result": [1, 2]}, {"id": good["id"]},  # another job's id: not this folder's
            {"result": {"x": deep}},
        ]
        bad = {job_id: {**valid, "id": job_id, **change}
               for job_id, change in ((p.new_id(), change) for change in changes)}
        forged = p.new_id()  # the record the forged line of the issue left behind
        bad[forged] = {"id": forged, "state": "completed", "progress": "x"}
        for job_id, data in bad.items():
            _write_job(server.data_dir, job_id, data)
        # Arrays in arrays 100,000 deep: the JSON decoder's own recursion gave out, and
        # every route answered 500, submissions too.
        abyss = p.new_id()
        (server.data_dir / "jobs" / abyss).mkdir()
        (server.data_dir / "jobs" / abyss / p.JOB_FILE).write_text(
            json.dumps({**valid, "id": abyss})[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000
            + "}")
        one = client.get(f"/api/jobs/{abyss}")
        assert one.status_code == 200 and "nested too deeply" in one.json()["error"]["message"]
        # A half of a surrogate pair alone, escaped (no UTF-8 can hold it): every listing
        # answered 500, the job's own reads and its events too.
        half = p.new_id()
        (server.data_dir / "jobs" / half).mkdir()
        (server.data_dir / "jobs" / half / p.JOB_FILE).write_text(
            json.dumps({**valid, "id": half, "output": "a\ud800b"}))
        one = client.get(f"/api/jobs/{half}")
        assert one.status_code == 200 and one.json()["output"] == "a\ufffdb", one.text
        with client.stream("GET", f"/api/jobs/{half}/events") as stream:
            first = next(line for line in stream.iter_lines() if line.startswith("data:"))
        assert json.loads(first[5:])["output"] == "a\ufffdb"
        # Its submission's time past 64 bits, or none and a date past 2262: the index's order
        # of submissions raised, and every listing, submissions too once they came to list
        # it, answered 500. Such a job is listed, last.
        far = {p.new_id(): {**valid, "created_ns": 2**63}, p.new_id(): {**valid, "created_ns": -1},
               p.new_id(): {**valid, "created_ns": None, "created_at": "9999-12-31T00:00:00Z"}}
        for job_id, data in far.items():
            _write_job(server.data_dir, job_id, {**data, "id": job_id})
        for path in ("/api/health", "/api/history", "/api/jobs"):
            assert client.get(path).status_code == 200, path
        assert client.post("/api/jobs", json={"kind": "sleep", "input": {}}).status_code == 202
        listing = client.get("/api/jobs")
        assert listing.status_code == 200, listing.text
        listed = {job["id"]: job for job in listing.json()["jobs"]}
        assert listed[good["id"]]["state"] == "completed"
        assert all(listed[job_id]["state"] == "completed" for job_id in far), listing.text
        for job_id in bad:
            assert listed[job_id]["state"] == "failed", listed[job_id]
            assert listed[job_id]["error"]["type"] == "corrupt"
            one = client.get(f"/api/jobs/{job_id}")
            assert one.status_code == 200 and one.json()["error"]["type"] == "corrupt"
            assert "not a valid job" in one.json()["error"]["message"]
            again = client.post(f"/api/jobs/{job_id}/rerun")
            assert again.status_code == 409 and "holds no job to run again" in again.text
        with client.stream("GET", f"/api/jobs/{forged}/events") as stream:
            events = [json.loads(line[5:]) for line in stream.iter_lines()
                      if line.startswith("data:")]
        assert [e["error"]["type"] for e in events] == ["corrupt"]
        wait_for(lambda: (h := client.get("/api/history", params={"jobs": 20})).status_code
                 == 200 and {j["id"] for j in h.json()["jobs"]
                             if j["error_type"] == "corrupt"} == {*bad, abyss},
                 30, what="the dashboard's feed listing them as corrupt")


def test_odd_entries_in_the_jobs_folder_stop_no_other_job(data_dir: Path,
                                                          make_server: MakeServer) -> None:
    # Left on disk while no server ran: queued jobs, and beside them a file named like a
    # job's folder, a job.json that is a folder, a job whose kind is a list, and a running
    # job whose launch record no check foresaw (a launch time too large for a float), and a
    # job.json that is a pipe (its readers waited on it for good) or a link that loops.
    from jobs.store.job_store import JobStore

    store = JobStore(data_dir / "jobs")
    queued = [store.create("sleep", {"seconds": 0}, 60)["id"] for _ in range(6)]
    a_file, a_folder, a_list, unforeseen, a_pipe, a_loop = (p.new_id() for _ in range(6))
    (data_dir / "jobs" / a_file).write_text("not a folder")
    (data_dir / "jobs" / a_folder / p.JOB_FILE).mkdir(parents=True)
    (data_dir / "jobs" / a_pipe).mkdir()
    os.mkfifo(data_dir / "jobs" / a_pipe / p.JOB_FILE)
    (data_dir / "jobs" / a_loop).mkdir()
    (data_dir / "jobs" / a_loop / p.JOB_FILE).symlink_to(p.JOB_FILE)
    _write_job(data_dir, a_list, {**p.new_job(a_list, "sleep", {}, 60), "kind": ["sleep"]})
    _write_job(data_dir, unforeseen, {**p.new_job(unforeseen, "sleep", {}, 60),
                                      "state": "running"})
    (data_dir / "jobs" / unforeseen / p.RUN_FILE).write_text('{"launched_ns": 1%s}' % ("0" * 400))
    server = make_server()
    with server.client() as client:
        def all_done() -> bool:
            return all(client.get(f"/api/jobs/{job_id}").json()["state"] == "completed"
                       for job_id in queued)

        wait_for(all_done, 30, what="the queued jobs done")
        listing = client.get("/api/jobs")
        assert listing.status_code == 200, listing.text
        listed = {job["id"]: job for job in listing.json()["jobs"]}
        assert a_file not in listed
        for job_id in (a_folder, a_list, a_pipe, a_loop):
            assert listed[job_id]["error"]["type"] == "corrupt", listed[job_id]
            assert client.get(f"/api/jobs/{job_id}").json()["error"]["type"] == "corrupt"
    log = (data_dir / "supervisor.log").read_text()
    assert "supervisor pass failed" not in log
    assert log.count(f"job {unforeseen} cannot be looked at") == 1  # said once, left alone


# -- 10: the public sleep kind has no test knobs --------------------------------------


def test_sleep_takes_seconds_and_steps_only(make_server: MakeServer) -> None:
    server = make_server()
    knobs: list[dict[str, Any]] = [{"spawn_child": True}, {"ignore_sigterm": True},
                                   {"exit_code": 7}, {"fail": "x"}, {"spew": True},
                                   {"anything": 1}]
    with server.client() as client:
        for knob in knobs:
            answer = client.post("/api/jobs", json={"kind": "sleep", "input": knob})
            assert answer.status_code == 422, (knob, answer.text)
            detail = answer.json()["detail"]
            assert f"input.{next(iter(knob))}" in detail, detail
            assert "takes only: seconds, steps" in detail, detail
        fine = client.post("/api/jobs", json={"kind": "sleep",
                                              "input": {"seconds": 0.1, "steps": 2}})
        assert fine.status_code == 202, fine.text
    assert len(list((server.data_dir / "jobs").glob("*/job.json"))) == 1


def test_the_sleep_runner_ignores_knobs_in_a_job_file_written_by_hand(data_dir: Path) -> None:
    job_id = p.new_id()
    job = p.new_job(job_id, "sleep", {"seconds": 0, "ignore_sigterm": True, "exit_code": 7,
                                      "fail": "x"}, 30)
    _write_job(data_dir, job_id, job)
    job_file = data_dir / "jobs" / job_id / p.JOB_FILE
    done = subprocess.run([sys.executable, "-m", "runners.sleep", "--job-file", str(job_file)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    final = p.read_json(job_file)
    assert final is not None and final["state"] == "completed"


# -- 11: a kind defined twice stops the API and the supervisor ------------------------


def _dist(folder: Path, name: str, kinds: str) -> None:
    """An installed package as importlib.metadata finds it on sys.path."""
    info = folder / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[offload.kinds]\n{kinds}\n")


def _refuses(env: dict[str, str], *needles: str) -> None:
    """The API (as `python api_entry.py` starts it) and the supervisor both refuse to
    start, and say which two sources define the kind."""
    env = {**os.environ, **env}
    for args in (["api_entry.py", "--port", str(free_port())], ["-m", "jobs.supervisor"]):
        try:
            done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, timeout=60,
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{args[0]} started although a kind is defined twice")
        assert done.returncode != 0, done.stderr
        for needle in needles:
            assert needle in done.stderr, (needle, done.stderr[-2000:])


def test_offload_kinds_cannot_replace_a_built_in_kind() -> None:
    _refuses({"OFFLOAD_KINDS": "chat=tests.probe_runner"}, "job kind 'chat' is defined twice",
             "built in (runners.chat)", "OFFLOAD_KINDS (chat=tests.probe_runner)")


def test_an_installed_package_cannot_replace_a_built_in_kind(tmp_path: Path) -> None:
    _dist(tmp_path, "evil-kinds", "chat = evil.chat")
    _refuses({"PYTHONPATH": str(tmp_path), "OFFLOAD_KINDS": ""},
             "job kind 'chat' is defined twice", "built in (runners.chat)",
             "the entry point chat = evil.chat of the package evil-kinds 1.0")


def test_two_packages_with_one_kind_clash(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _dist(tmp_path / "a", "resize-a", "resize = a.resize")
    _dist(tmp_path / "b", "resize-b", "resize = b.resize")
    monkeypatch.syspath_prepend(str(tmp_path / "a"))
    assert discover(env="")["resize"].module == "a.resize"
    with pytest.raises(KindClash, match=r"'resize' is defined twice: the entry point resize = "
                                        r"a\.resize of the package resize-a 1\.0 and "
                                        r"OFFLOAD_KINDS \(resize=json\)"):
        discover(env="resize=json")
    monkeypatch.syspath_prepend(str(tmp_path / "b"))
    with pytest.raises(KindClash, match=r"'resize' is defined twice: the entry point resize = "
                                        r"[ab]\.resize of the package resize-[ab] 1\.0 and the "
                                        r"entry point resize = [ab]\.resize"):
        discover(env="")


def test_offload_kinds_naming_a_kind_twice_clashes() -> None:
    with pytest.raises(KindClash, match=r"OFFLOAD_KINDS \(a=json\) and OFFLOAD_KINDS \(a=os\)"):
        discover(env="a=json, a=os")
    assert discover(env="a=json")["a"].module == "json"


@pytest.mark.parametrize(("spec", "said"), [
    ("x", "OFFLOAD_KINDS holds 'x', no job kind: write name=package.module"),
    ("=json", "OFFLOAD_KINDS holds '=json', no job kind"),
    ("x y=json", "OFFLOAD_KINDS holds 'x y=json', no job kind"),
    # Taken, and each job of it was lost at its runner's start with an ImportError.
    ("x=nonexistent.module", "OFFLOAD_KINDS holds 'x=nonexistent.module', but no module "
                             "'nonexistent' can be imported here"),
])
def test_an_offload_kinds_entry_that_is_no_kind_is_said(spec: str, said: str) -> None:
    # They were warned of in the log, and the server started without them.
    with pytest.raises(UnusableKinds, match=re.escape(said)):
        discover(env=spec)


def test_over_ray_a_kind_may_be_installed_on_the_nodes_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from jobs.settings import get_settings

    monkeypatch.setenv("OFFLOAD_LAUNCHER", "ray")
    get_settings.cache_clear()
    try:
        assert discover(env="x=nonexistent.module")["x"].module == "nonexistent.module"
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()


def test_a_waiting_job_edited_to_an_unknown_kind_fails_saying_so(make_server: MakeServer) -> None:
    # Seen by the supervisor before the edit: its launch raised KeyError, a pass failed.
    server = make_server()
    with server.client() as client:
        waiting = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0},
                                                 "delay_s": 2}).json()
        time.sleep(0.7)  # the supervisor has taken it on by now (its ring is at once)
        path = server.data_dir / "jobs" / waiting["id"] / p.JOB_FILE
        p.write_json(path, {**json.loads(path.read_text()), "kind": "nope"})
        ended = wait_for(lambda: (lambda j: j if j["state"] in p.FINAL_STATES else None)(
            client.get(f"/api/jobs/{waiting['id']}").json()), 30)
        # Listed by its kind, which the server does not run (one removed since, say); a
        # kind of no job and no runner is a typo (it answered an empty list, as "no jobs").
        listed = client.get("/api/jobs", params={"kind": "nope", "state": "failed"}).json()
        assert [job["id"] for job in listed["jobs"]] == [waiting["id"]], listed
        for query in ({"kind": "nope", "state": "queued"}, {"kind": "sleep", "state": "failed"}):
            assert client.get("/api/jobs", params=query).json()["jobs"] == [], query
        typo = client.get("/api/jobs", params={"kind": "slep"})
        assert (typo.status_code, typo.json()) == (422, {
            "detail": "unknown job kind 'slep'; known kinds: chat, probe, sleep, train"})
    assert ended["state"] == "failed" and ended["error"]["message"] == "unknown job kind 'nope'"
    said = (server.data_dir / "supervisor.log").read_text()
    assert "pass failed" not in said and "Traceback" not in said, said


def test_a_queued_job_edited_into_no_job_never_runs(make_server: MakeServer) -> None:
    """A waiting job's file edited by hand so that the API reads it as failed, corrupt:
    its runner ran all the same (its deadline unenforced, with `timeout_s: "abc"`), and
    a cancel was refused as of a finished job while it ran."""
    server = make_server()
    with server.client() as client:
        waiting = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0},
                                                 "delay_s": 1.5}).json()
        path = server.data_dir / "jobs" / waiting["id"] / p.JOB_FILE
        p.write_json(path, {**json.loads(path.read_text()), "timeout_s": "abc"})
        after = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0},
                                               "delay_s": 2}).json()
        wait_for(lambda: client.get(f"/api/jobs/{after['id']}").json()["state"] == "completed",
                 30, what="the job queued after it to run")
        shown = client.get(f"/api/jobs/{waiting['id']}").json()
        assert shown["state"] == "failed" and shown["error"]["type"] == "corrupt", shown
        on_disk = json.loads(path.read_text())
        assert on_disk["state"] == "queued" and on_disk.get("started_at") is None, on_disk
        assert not (path.parent / p.RUN_FILE).exists(), "it was claimed to run"
