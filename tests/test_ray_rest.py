"""The Ray launcher's side of Ray's Jobs REST API against a scripted server: parsing,
errors, duplicates, a head that forgets its jobs, what is sent. Runs everywhere."""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from jobs import protocol as p
from jobs.launch import ray as ray_launcher
from jobs.launch.ray import RayLauncher, submission_id
from jobs.launch.ray_client import RayError, RayJobsClient, RayUnavailable
from jobs.protocol import remote
from jobs.settings import Settings
from tests.conftest import ROOT, RunningSupervisor, free_port, wait_for, wait_job
from tests.fake_ray import FakeRay
from tests.server import Server
from tests.test_cli import cli

TRACEBACK_500 = ("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                 "RuntimeError: GCS unavailable")


@pytest.fixture
def fake() -> Iterator[FakeRay]:
    with FakeRay() as server:
        yield server


def test_job_details_are_parsed(fake: FakeRay) -> None:
    fake.jobs["s1"] = {"submission_id": "s1", "status": "FAILED", "driver_exit_code": 7,
                       "message": "Job entrypoint command failed with exit code 7",
                       "start_time": 1_700_000_000_500}
    info = RayJobsClient(fake.address).info("s1")
    assert (info.status, info.exit_code, info.terminal) == ("FAILED", 7, True)
    assert info.start_time == 1_700_000_000.5


def test_duplicate_submission_counts_as_submitted(fake: FakeRay) -> None:
    client = RayJobsClient(fake.address)
    kwargs = {"env_vars": {}, "num_cpus": 1.0, "num_gpus": 0.0, "metadata": {}}
    assert client.submit("s1", "true", **kwargs) is True  # type: ignore[arg-type]
    assert client.submit("s1", "true", **kwargs) is False  # type: ignore[arg-type]
    assert [r[0] for r in fake.requests] == ["POST", "POST"]


def test_errors_say_what_went_wrong(fake: FakeRay) -> None:
    client = RayJobsClient(fake.address)
    fake.scripted[("GET", "/api/jobs/s1")] = (500, TRACEBACK_500)
    with pytest.raises(RayError, match="answered GET /api/jobs/s1 with 500: RuntimeError: GCS"):
        client.info("s1")
    fake.scripted[("GET", "/api/jobs/s2")] = (200, "<html>a proxy page</html>")
    with pytest.raises(RayError, match="not JSON"):
        client.info("s2")
    fake.scripted[("GET", "/api/jobs/s3")] = (200, {"submission_id": "s3"})
    with pytest.raises(RayError, match="without a status"):
        client.info("s3")
    fake.scripted[("GET", "/api/jobs/")] = (200, {"not": "a list"})
    with pytest.raises(RayError, match="listed jobs as dict"):
        client.jobs()
    with pytest.raises(RayUnavailable, match="connection refused"):
        RayJobsClient(f"http://127.0.0.1:{free_port()}").version()
    with pytest.raises(ValueError, match="not a Ray dashboard address"):
        RayJobsClient("ray://127.0.0.1:10001")


def test_an_address_that_answers_no_http_is_said_so() -> None:
    # Ray's GCS port (6379) taken for the dashboard's: its bytes were said raw, in the
    # health's problems, the log and the job's error.
    listener = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"\x00\x00\x18\x04\x00\x00\x00\x00\x00\xfe\x03\r\n\r\n")
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    try:
        with pytest.raises(RayUnavailable) as said:
            RayJobsClient(f"http://127.0.0.1:{listener.getsockname()[1]}").info("s1")
    finally:
        listener.close()
    assert "no HTTP server" in str(said.value) and "8265" in str(said.value)
    assert "\\x00" not in str(said.value) and "\x00" not in str(said.value)


def test_address_setting_is_the_dashboards_http_address() -> None:
    assert Settings(OFFLOAD_RAY_ADDRESS="head:8265").ray_address == "http://head:8265"
    with pytest.raises(ValidationError, match="dashboard's HTTP address"):
        Settings(OFFLOAD_RAY_ADDRESS="ray://head:10001")
    with pytest.raises(ValidationError):
        Settings(OFFLOAD_LAUNCHER="kubernetes")


def test_secrets_never_reach_ray(fake: FakeRay,
                                 make_supervisor: Callable[..., RunningSupervisor]) -> None:
    secret = "sk-never-in-ray-0123456789"
    env = {"OPENAI_API_KEY": secret, "OPENAI_BASE_URL": "http://llm.example/v1"}
    sup = make_supervisor(launcher=RayLauncher(fake.address, env))
    job_id = sup.submit(seconds=1)
    sid = submission_id(job_id)
    sent = wait_for(lambda: next((body for method, _, body in list(fake.requests)
                                  if method == "POST"), None), what="the job submitted")
    assert sent["submission_id"] == sid
    assert sent["entrypoint_num_cpus"] >= 1
    assert sent["runtime_env"]["env_vars"]["OPENAI_BASE_URL"] == "http://llm.example/v1"
    assert "OPENAI_API_KEY" not in sent["runtime_env"]["env_vars"]
    assert secret not in json.dumps(fake.requests)
    # The entrypoint is the runner's command alone: the job (never a secret) is in its
    # environment, which other accounts on the node cannot read.
    assert sent["entrypoint"].split()[1:] == ["-m", "runners.sleep", "--remote-job"]
    assert remote.pop_job(dict(sent["runtime_env"]["env_vars"]))["id"] == job_id


def _running_snapshot(fake: FakeRay, job_id: str, seq: int, state: str = p.JobState.RUNNING,
                      **fields: object) -> str:
    """A snapshot line as the runner prints it, with the key its launch was given."""
    key = fake.jobs[submission_id(job_id)]["runtime_env"]["env_vars"][remote.SNAPSHOT_KEY_ENV]
    data = p.new_job(job_id, "sleep", {}, 60)
    data.update({p.F_STATE: state, p.F_STARTED_AT: p.now_iso(), p.F_PID: 4242, **fields})
    return remote.snapshot_line(seq, data, key)


def test_poller_writes_snapshots_and_log_then_a_forgotten_job_is_lost(
        fake: FakeRay, make_supervisor: Callable[..., RunningSupervisor]) -> None:
    sup = make_supervisor(launcher=RayLauncher(fake.address, poll_s=0.02))
    job_id = sup.submit(seconds=60)
    sid = submission_id(job_id)
    wait_for(lambda: sid in fake.jobs, what="the job submitted")
    with fake.lock:
        fake.jobs[sid]["status"] = "RUNNING"
        fake.logs[sid] = ("starting\n"
                          + _running_snapshot(fake, job_id, 1, progress={"fraction": 0.1})
                          + _running_snapshot(fake, job_id, 2, progress={"fraction": 0.2})
                          + "half a li")  # a line still being written is left for later
    job = sup.wait_state(job_id, "running")
    assert job["progress"]["fraction"] == 0.2 and job["launcher"] == "ray"
    log_file = Path(sup.supervisor.dir) / job_id / p.LOG_FILE
    assert log_file.read_text() == "starting\n"
    with fake.lock:
        fake.logs[sid] += "ne\n"
    wait_for(lambda: log_file.read_text() == "starting\nhalf a line\n", what="the whole line")
    with fake.lock:
        del fake.jobs[sid]  # the head restarted: its job records and logs are gone
    final = sup.wait_final(job_id)
    assert final["state"] == "failed" and final["error"]["type"] == "lost"
    assert "no longer knows" in final["error"]["message"]
    assert "head restarted" in final["error"]["message"]
    assert final["progress"]["fraction"] == 0.2, "what was seen is kept"


# The runner's last word once Ray stops it: it cannot see the stop request, so since 0.10
# it leaves its end to the supervisor (`running`, the signal as a `lost` error, exit 75);
# before, it said `cancelled` (exit 3), which a runner of an earlier version still may.
STOPPED_SAYS = {
    "unfinal": (p.JobState.RUNNING, 75, {"type": p.ErrorType.LOST, "message": (
        "its runner was stopped by SIGTERM, which no cancel or deadline of Offload's asked "
        "for")}),
    "cancelled": (p.JobState.CANCELLED, 3, {"type": p.ErrorType.CANCELLED,
                                            "message": "cancelled on request"})}


@pytest.mark.parametrize("says", list(STOPPED_SAYS))
def test_final_snapshot_wins_and_a_deadline_reads_as_timeout(
        fake: FakeRay, make_supervisor: Callable[..., RunningSupervisor], says: str) -> None:
    fake.stop_ends_job = False
    sup = make_supervisor(launcher=RayLauncher(fake.address, poll_s=0.02))
    job_id = sup.submit(seconds=60, timeout_s=0.5)
    sid = submission_id(job_id)
    wait_for(lambda: sid in fake.jobs, what="the job submitted")
    with fake.lock:
        fake.jobs[sid]["status"] = "RUNNING"
        fake.logs[sid] = _running_snapshot(fake, job_id, 1)
    sup.wait_state(job_id, "running")
    # The deadline passes: Offload asks Ray to stop it; the runner, signalled, cannot know
    # why; the supervisor knows it was the deadline.
    wait_for(lambda: sid in fake.stopped, what="a stop sent")
    state, code, error = STOPPED_SAYS[says]
    with fake.lock:
        fake.logs[sid] += _running_snapshot(fake, job_id, 2, state, exit_code=code,
                                            output="part", error=error)
        fake.jobs[sid].update(status="STOPPED", driver_exit_code=code)
    final = sup.wait_final(job_id)
    assert final["state"] == "timeout", final
    assert final["error"]["type"] == "timeout" and final["output"] == "part"
    wait_for(lambda: sid not in fake.jobs, what="Ray's record deleted after the final state")


@pytest.mark.parametrize("why", ["cancel", "deadline"])
def test_the_real_runner_stopped_through_ray_ends_as_offload_asked(
        fake: FakeRay, make_supervisor: Callable[..., RunningSupervisor], why: str) -> None:
    # The runner as Ray runs it (its entrypoint and environment, its output read as Ray's
    # log), stopped as Ray's stop does it: with no stop file on its node, a stop read as
    # one no one asked for ended the job `failed`/`lost` on its last attempt.
    fake.stop_ends_job = False
    sup = make_supervisor(launcher=RayLauncher(fake.address, poll_s=0.02))
    job_id = sup.submit(seconds=60, timeout_s=3 if why == "deadline" else 600)
    sid = submission_id(job_id)
    wait_for(lambda: sid in fake.jobs, what="the job submitted")
    launch = fake.jobs[sid]
    runner = subprocess.Popen(
        launch["entrypoint"].split(), cwd=ROOT, text=True, start_new_session=True,
        env={**os.environ, **launch["runtime_env"]["env_vars"], "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    with fake.lock:
        fake.jobs[sid]["status"], fake.logs[sid] = "RUNNING", ""

    def ray_log() -> None:
        assert runner.stdout is not None
        for line in runner.stdout:
            with fake.lock:
                fake.logs[sid] += line

    reading = threading.Thread(target=ray_log, daemon=True)
    reading.start()
    try:
        sup.wait_state(job_id, "running")
        if why == "cancel":
            assert sup.store.request_cancel(job_id)
        wait_for(lambda: sid in fake.stopped, 30, what="Ray asked to stop it")
        os.killpg(runner.pid, signal.SIGTERM)  # Ray's stop
        runner.wait(30)
        reading.join(10)
        with fake.lock:
            fake.jobs[sid].update(status="STOPPED", driver_exit_code=runner.returncode)
        final = sup.wait_final(job_id)
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()
        reading.join(10)
        assert runner.stdout is not None
        runner.stdout.close()
    assert (final["state"], final["error"]["type"]) == (
        ("cancelled", "cancelled") if why == "cancel" else ("timeout", "timeout")), final


def test_a_record_ray_fails_to_delete_is_deleted_when_it_answers_again(
        fake: FakeRay, make_supervisor: Callable[..., RunningSupervisor],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=ray_launcher.__name__)
    sup = make_supervisor(launcher=RayLauncher(fake.address, poll_s=0.02))
    job_id = sup.submit(seconds=60)
    sid = submission_id(job_id)
    wait_for(lambda: sid in fake.jobs, what="the job submitted")
    deleting = ("DELETE", f"/api/jobs/{sid}")
    fake.scripted[deleting] = (500, TRACEBACK_500)  # a busy head fails the first delete
    with fake.lock:
        fake.logs[sid] = _running_snapshot(fake, job_id, 1, p.JobState.COMPLETED, exit_code=0)
        fake.jobs[sid].update(status="SUCCEEDED", driver_exit_code=0)
    assert sup.wait_final(job_id)["state"] == "completed"
    wait_for(lambda: deleting in [r[:2] for r in fake.requests], what="a delete asked for")
    with fake.lock:
        del fake.scripted[deleting]
    wait_for(lambda: sid not in fake.jobs, what="Ray's record deleted on a later try")
    assert "Ray's record not deleted (Ray" in caplog.text and "trying again" in caplog.text


def test_remote_job_travels_in_the_environment_whatever_its_size(tmp_path: Path) -> None:
    big = os.urandom(150_000).hex()  # more than one variable may hold on Linux (128 KiB)
    job = p.new_job("b" * 32, "sleep", {"seconds": 0, "tag": big, "fail": None}, 30)
    pieces = remote.job_env(job)
    assert len(pieces) > 1 and all(len(piece) <= 100_000 for piece in pieces.values())
    key = "k" * 32
    out = subprocess.run([sys.executable, "-m", "runners.sleep", "--remote-job"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={"PATH": "", "OFFLOAD_DATA_DIR": str(tmp_path),
                              remote.SNAPSHOT_KEY_ENV: key, **pieces})
    assert out.returncode == 0, out.stderr
    snapshots, plain = remote.split_snapshots(out.stdout, key)
    seqs = [seq for seq, _ in snapshots]
    assert seqs == sorted(seqs) and seqs[0] == 1
    final = snapshots[-1][1]
    assert final["state"] == "completed" and final["result"]["echo"]["tag"] == big
    assert final["launcher"] == "ray"
    assert not (tmp_path / "remote" / ("b" * 32)).exists(), "the scratch folder is removed"
    assert not (tmp_path / "jobs").exists(), "never the jobs folder of an API"

    # Without a data folder, a folder of its own, not a fixed name in the shared /tmp:
    # another account had made /tmp/offload/remote a link to a folder of ours: the job's
    # input was written through it, and the folder of ours it named deleted after.
    shared, ours = tmp_path / "tmp", tmp_path / "ours"
    (shared / "offload").mkdir(parents=True)
    (ours / job["id"]).mkdir(parents=True)
    (ours / job["id"] / "keep.txt").write_text("ours\n")
    (shared / "offload" / "remote").symlink_to(ours)
    out = subprocess.run([sys.executable, "-m", "runners.sleep", "--remote-job"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={"PATH": "", "TMPDIR": str(shared), remote.SNAPSHOT_KEY_ENV: key,
                              **pieces})
    assert out.returncode == 0, out.stderr
    assert remote.split_snapshots(out.stdout, key)[0][-1][1]["state"] == "completed"
    assert [each.name for each in (ours / job["id"]).iterdir()] == ["keep.txt"]
    assert [each.name for each in shared.iterdir()] == ["offload"], "its own folder removed"

    bad = subprocess.run([sys.executable, "-m", "runners.sleep", "--remote-job"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, remote.SNAPSHOT_KEY_ENV: key,
                              f"{remote.JOB_ENV}_0": "garbage!"})
    assert bad.returncode == 2
    assert "cannot read the job from the environment" in bad.stderr


def test_the_api_process_never_imports_ray(tmp_path: Path) -> None:
    code = ("import sys, api_entry\n"
            "from jobs.settings import get_settings\n"
            "from jobs.launch.pick import make_launcher\n"
            "launcher = make_launcher(get_settings())\n"
            "assert launcher.name == 'ray', launcher\n"
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60,
                         env={"PATH": "", "OFFLOAD_LAUNCHER": "ray",
                              "OFFLOAD_RAY_ADDRESS": "127.0.0.1:1",
                              "OFFLOAD_DATA_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_job_ray_refuses_fails_with_ray_s_reason(
        fake: FakeRay, make_supervisor: Callable[..., RunningSupervisor]) -> None:
    fake.scripted[("POST", "/api/jobs/")] = (
        400, "Traceback (most recent call last):\nValueError: entrypoint_num_gpus: no GPUs")
    sup = make_supervisor(launcher=RayLauncher(fake.address, poll_s=0.02))
    final = sup.wait_final(sup.submit(seconds=1))
    assert final["state"] == "failed"
    assert "never started" in final["error"]["message"]
    assert "ValueError: entrypoint_num_gpus: no GPUs" in final["error"]["message"]


def test_starting_twice_submits_once(fake: FakeRay,
                                     make_supervisor: Callable[..., RunningSupervisor]) -> None:
    sup = make_supervisor()
    sup.stop()
    launcher = RayLauncher(fake.address, poll_s=0.02)
    job_id = sup.store.create("sleep", {"seconds": 1}, 60)["id"]
    job_file = sup.supervisor.dir / job_id / p.JOB_FILE
    try:
        first = launcher.start("runners.sleep", job_file, sup.job(job_id), lambda: None)
        second = launcher.start("runners.sleep", job_file, sup.job(job_id), lambda: None)
        assert first is second, "one poller, one writer"
        wait_for(lambda: submission_id(job_id) in fake.jobs, what="submitted")
        time.sleep(0.2)
        assert [m for m, path, _ in fake.requests if m == "POST"] == ["POST"]
    finally:
        launcher.close()


def test_a_job_claimed_by_hand_as_ray_launches_it_runs_once(
        fake: FakeRay, make_supervisor: Callable[..., RunningSupervisor]) -> None:
    """The Ray launcher wrote its claim over one a runner by hand made a moment before,
    and sent the job to Ray too: it ran twice."""
    by_hand: list[subprocess.Popen[str]] = []

    class LateByHand(RayLauncher):  # the runner by hand claims just as the job launches
        def start(self, module: str, job_file: Path, data: dict[str, Any],
                  on_exit: Callable[[], None]) -> Any:
            by_hand.append(subprocess.Popen(
                [sys.executable, "-m", "runners.sleep", "--job-file", str(job_file)],
                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
            wait_for(lambda: os.path.exists(p.sibling(job_file, p.RUN_FILE)), what="its claim")
            return super().start(module, job_file, data, on_exit)

    sup = make_supervisor(launcher=LateByHand(fake.address, poll_s=0.02))
    final = sup.wait_final(sup.submit(seconds=1), 60)
    stderr = by_hand[0].communicate(timeout=60)[1]
    assert by_hand[0].returncode == 0, stderr
    assert final["state"] == "completed" and final["pid"] == by_hand[0].pid, final
    assert not [m for m, _, _ in fake.requests if m == "POST"], "sent to Ray too"


def test_a_job_too_big_for_ray_fails_at_once_saying_so(
        fake: FakeRay, make_supervisor: Callable[..., RunningSupervisor]) -> None:
    # Ray hands a job's environment to its worker as one argument: one past Linux's
    # 128 KiB never started, held a CPU of the cluster, and ignored its deadline.
    sup = make_supervisor(launcher=RayLauncher(fake.address, poll_s=0.02))
    noise = base64.b64encode(os.urandom(150_000)).decode()  # zlib leaves it as long
    job_id = sup.store.create("chat", {"messages": [{"role": "user", "content": noise}]}, 60,
                              fields={"max_attempts": 2})["id"]
    sup.supervisor.wake(job_id)
    final = sup.wait_final(job_id)
    # Failed for good: another attempt, refused again, was counted a `lost` retry.
    assert final["state"] == "failed" and final["error"]["type"] == "runner", final
    assert final["attempt"] == 1 and not final.get("earlier_errors"), final
    assert "never started: the job takes" in final["error"]["message"], final["error"]
    assert "128 KiB" in final["error"]["message"]
    assert not [m for m, path, _ in fake.requests if m == "POST" and path == "/api/jobs/"]


def test_a_job_ray_keeps_waiting_ends_at_its_deadline(
        fake: FakeRay, make_supervisor: Callable[..., RunningSupervisor],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Ray answers a stop of a job it has no place for (a GPU asked of a cluster without)
    # and keeps it waiting: it stayed queued, minutes past its deadline, and a cancel too.
    monkeypatch.setattr(ray_launcher, "RAY_END_LOOK_S", 0.1)
    fake.stop_ends_job = False
    sup = make_supervisor(launcher=RayLauncher(fake.address, poll_s=0.02))
    job_id = sup.submit(seconds=60, timeout_s=1)
    sid = submission_id(job_id)
    # A stop Ray did not take (its head busy) is sent again; until Ray takes one, the job
    # is not ended here (Ray would run it, unwatched).
    fake.scripted[("POST", f"/api/jobs/{sid}/stop")] = (503, "busy")
    wait_for(lambda: sum(path.endswith("/stop") for _, path, _ in list(fake.requests)) >= 3,
             30, what="the stop asked again")
    assert sup.job(job_id)["state"] == "queued"
    del fake.scripted[("POST", f"/api/jobs/{sid}/stop")]
    final = sup.wait_final(job_id, 30)
    assert final["state"] == "timeout", final
    assert sid in fake.stopped
    # Ray refuses to delete a job it has not ended: its record goes once Ray ends it.
    time.sleep(0.5)
    assert sid in fake.jobs
    with fake.lock:
        fake.jobs[sid]["status"] = "STOPPED"
    wait_for(lambda: sid not in fake.jobs, 30, what="its record deleted once Ray ended it")


def test_a_record_ray_writes_again_after_its_delete_is_deleted_again(
        fake: FakeRay, make_supervisor: Callable[..., RunningSupervisor]) -> None:
    # Deleted while its supervisor actor still lived, Ray wrote the record again as the
    # actor died: "FAILED, Job supervisor actor died", one for every job run.
    sup = make_supervisor(launcher=RayLauncher(fake.address, poll_s=0.02))
    job_id = sup.submit(seconds=1)
    sid = submission_id(job_id)
    wait_for(lambda: sid in fake.jobs, what="submitted")
    with fake.lock:
        fake.jobs[sid]["status"] = "SUCCEEDED"
    written_again = threading.Event()

    def actor_dies() -> None:
        wait_for(lambda: sid not in fake.jobs, 30, what="its first delete")
        time.sleep(0.5)
        with fake.lock:
            fake.jobs[sid] = {"submission_id": sid, "status": "FAILED", "start_time": 0,
                              "message": "Job supervisor actor died: INTENDED_USER_EXIT"}
        written_again.set()

    threading.Thread(target=actor_dies, daemon=True).start()
    sup.wait_final(job_id, 30)
    assert written_again.wait(30)
    wait_for(lambda: sid not in fake.jobs, 20, what="the record written again to go")


def test_a_job_claimed_by_a_supervisor_that_stopped_before_ray_had_it_is_sent(
        fake: FakeRay, make_supervisor: Callable[..., RunningSupervisor]) -> None:
    # Claimed while Ray did not answer, by a supervisor killed then: the next one found
    # Ray without the job and said it "lost: ... no longer knows job", never sent.
    sup = make_supervisor(launcher=RayLauncher(fake.address, poll_s=0.02))
    sup.stop()
    job_id = sup.store.create("sleep", {"seconds": 1}, 60)["id"]
    job_file = sup.supervisor.dir / job_id / p.JOB_FILE
    sid = submission_id(job_id)
    p.write_json(p.sibling(job_file, p.RUN_FILE), p.launch_record(job_file, {
        "launcher": "ray", "submission_id": sid, "address": fake.address,
        "claimed_by": 1, "launched_ns": time.time_ns(), "snapshot_key": "k" * 32}))
    again = make_supervisor(launcher=RayLauncher(fake.address, poll_s=0.02))
    wait_for(lambda: sid in fake.jobs, 30, what="the job sent to Ray")
    assert again.job(job_id)["state"] == "queued"
    assert (p.read_json(p.sibling(job_file, p.RUN_FILE)) or {})["submitted"] is True
    with fake.lock:
        fake.jobs[sid]["status"] = "FAILED"  # its end, as Ray says it
    assert again.wait_final(job_id, 30)["error"]["message"].endswith("Ray job FAILED)")
    again.stop()
    # One cancelled meanwhile is not sent.
    cancelled = sup.store.create("sleep", {"seconds": 1}, 60)["id"]
    cancelled_file = sup.supervisor.dir / cancelled / p.JOB_FILE
    p.write_json(p.sibling(cancelled_file, p.RUN_FILE), p.launch_record(cancelled_file, {
        "launcher": "ray", "submission_id": submission_id(cancelled), "address": fake.address,
        "claimed_by": 1, "launched_ns": time.time_ns(), "snapshot_key": "k" * 32}))
    sup.store.request_cancel(cancelled)
    third = make_supervisor(launcher=RayLauncher(fake.address, poll_s=0.02))
    assert third.wait_final(cancelled, 30)["state"] == "cancelled"
    assert not [body for method, path, body in list(fake.requests) if method == "POST"
                and path == "/api/jobs/" and body["submission_id"] == submission_id(cancelled)]


def test_a_job_cancelled_before_ray_has_it_never_runs(
        fake: FakeRay, make_supervisor: Callable[..., RunningSupervisor]) -> None:
    fake.submit_delay_s = 1.0
    sup = make_supervisor(launcher=RayLauncher(fake.address, poll_s=0.02))
    job_id = sup.submit(seconds=60)
    sid = submission_id(job_id)
    wait_for(lambda: any(m == "POST" for m, _, _ in list(fake.requests)), what="submitting")
    assert sid not in fake.jobs
    sup.store.request_cancel(job_id)  # while the submission is in flight
    sup.supervisor.wake()
    final = sup.wait_final(job_id)
    assert final["state"] == "cancelled", final
    assert sid in fake.stopped


def test_a_ray_that_stays_unreachable_is_said_once_then_the_job_is_lost(
        make_supervisor: Callable[..., RunningSupervisor], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # Each poll (5 a second by default) logged a warning, for the whole minute.
    monkeypatch.setattr(ray_launcher, "RAY_UNREACHABLE_S", 1.0)
    nobody = f"http://127.0.0.1:{free_port()}"
    sup = make_supervisor(launcher=RayLauncher(nobody, poll_s=0.02))
    with caplog.at_level(logging.INFO, logger="jobs.launch.ray"):
        final = sup.wait_final(sup.submit(seconds=1))
    assert final["state"] == "failed"
    assert "not reachable" in final["error"]["message"], final
    assert "for more than 1 s" in final["error"]["message"], final
    said = [r.getMessage() for r in caplog.records
            if r.name == "jobs.launch.ray" and r.levelno == logging.WARNING]
    assert len(said) == 1 and "trying again for up to 1 s" in said[0], "\n".join(said)


def test_a_ray_nobody_answers_at_makes_the_health_degraded_until_it_answers_again(
        make_server: Callable[..., Server]) -> None:
    # The health said "ok" while every Ray job waited, "queued", for a head that was gone.
    head = FakeRay().__enter__()
    server = make_server(env={"OFFLOAD_LAUNCHER": "ray", "OFFLOAD_RAY_ADDRESS": head.address})
    with server.client() as client:
        job_id = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 60}}
                             ).json()["id"]
        sid = submission_id(job_id)
        wait_for(lambda: sid in head.jobs, 30, what="the job sent to Ray")
        head.jobs[sid]["status"] = "RUNNING"
        assert client.get("/api/health").json()["problems"] == []
        head.__exit__()  # the head goes away

        health = wait_for(lambda: (h := client.get("/api/health").json())["status"]
                          == "degraded" and h, 30, what="the health degraded")
        [problem] = health["problems"]
        assert f"Ray Jobs API not reachable at {head.address}" in problem, problem
        assert "1 job waiting for it, each lost after 60 s" in problem, problem
        status = cli(server.url, "status")
        assert status.returncode == 7 and "Ray Jobs API not reachable" in status.stderr, status

        back = FakeRay(head.port)  # the head back at its address, its jobs with it
        back.jobs = head.jobs
        # At first it answers with an error: it answers, so Ray is reachable again.
        back.scripted[("GET", f"/api/jobs/{sid}")] = (500, "Internal Server Error")
        with back:
            wait_for(lambda: client.get("/api/health").json()["problems"] == [], 30,
                     what="the health ok again")
            with back.lock:
                del back.scripted[("GET", f"/api/jobs/{sid}")]
            assert cli(server.url, "status").returncode == 0
            assert client.delete(f"/api/jobs/{job_id}").json()["state"] == "cancelled"


def test_records_an_earlier_start_left_in_ray_are_deleted_at_the_next(
        fake: FakeRay, make_server: Callable[..., Server]) -> None:
    """Offload stopped while deleting the record of a job that had just ended (or Ray
    wrote one again after): it stayed in Ray for good. The next start deletes such
    records of its own jobs, and leaves those of other folders and of Ray's own users."""
    env = {"OFFLOAD_LAUNCHER": "ray", "OFFLOAD_RAY_ADDRESS": fake.address}
    theirs = {"offload-" + "ab" * 16: "SUCCEEDED", "raysubmit_n4Kq7": "FAILED"}
    with fake.lock:
        for sid, status in theirs.items():
            fake.jobs[sid] = {"submission_id": sid, "status": status, "start_time": 0}
    first = make_server(env=env)
    with first.client() as client:
        # A schedule's job has the same id in every folder: another's run of it, running.
        copied = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0}}
                             ).json()["id"]
        wait_for(lambda: submission_id(copied) in fake.jobs, 30, what="the job sent to Ray")
        with fake.lock:
            fake.logs[submission_id(copied)] = _running_snapshot(
                fake, copied, 1, p.JobState.COMPLETED, exit_code=0)
            fake.jobs[submission_id(copied)].update(status="SUCCEEDED", driver_exit_code=0)
        assert wait_job(client, copied)["state"] == "completed"
        wait_for(lambda: submission_id(copied) not in fake.jobs, 30, what="its record deleted")
        with fake.lock:
            theirs[submission_id(copied)] = "RUNNING"
            fake.jobs[submission_id(copied)] = {
                "submission_id": submission_id(copied), "status": "RUNNING", "start_time": 0,
                "metadata": {"offload_job_id": copied, "offload_folder": "0123456789abcdef"}}
        job_id = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 60}}
                             ).json()["id"]
        sid = submission_id(job_id)
        wait_for(lambda: sid in fake.jobs, 30, what="the job sent to Ray")
        deleting = ("DELETE", f"/api/jobs/{sid}")
        with fake.lock:
            fake.scripted[deleting] = (500, TRACEBACK_500)  # a busy head, as Offload stops
            fake.logs[sid] = _running_snapshot(fake, job_id, 1, p.JobState.COMPLETED,
                                               exit_code=0)
            fake.jobs[sid].update(status="SUCCEEDED", driver_exit_code=0)
        assert wait_job(client, job_id)["state"] == "completed"
        wait_for(lambda: deleting in [r[:2] for r in fake.requests], 30, what="a delete")
    first.stop()
    assert sid in fake.jobs, "the record left"
    with fake.lock:
        del fake.scripted[deleting]
    second = Server(first.data_dir, first.log.with_name("second.log"), env).start()
    try:
        wait_for(lambda: sid not in fake.jobs, 30, what="the record left deleted")
        time.sleep(1)  # what it would delete of the others, it would have by now
        assert set(theirs) <= set(fake.jobs), "another's records are left"
        assert submission_id(copied) not in fake.stopped, "another's run goes on"
    finally:
        second.stop()
