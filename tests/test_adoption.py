"""A supervisor that dies leaves its runners running; the next one adopts them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from jobs import protocol as p
from jobs.launch import pids
from jobs.launch.processes import Runner
from jobs.protocol import embedded
from jobs.store.job_store import JobStore
from tests.conftest import (
    ROOT,
    RunningSupervisor,
    process_gone,
    start_process,
    stop_process,
    wait_for,
    wait_job,
)
from tests.server import Server


def test_second_supervisor_adopts_runners_of_a_killed_one(
        data_dir: Path, make_supervisor: Callable[..., RunningSupervisor]) -> None:
    store = JobStore(data_dir / "jobs")
    first = start_process(["-m", "jobs.supervisor"], log=data_dir.parent / "supervisor.log",
                          env={"OFFLOAD_DATA_DIR": str(data_dir), "OFFLOAD_MAX_CONCURRENT": "3"})
    try:
        ids = [store.create("sleep", {"seconds": 3, "steps": 3}, 60)["id"] for _ in range(3)]

        def all_running() -> list[dict[str, Any]] | None:
            jobs = [store.read(i) for i in ids]
            return jobs if all(j["state"] == "running" for j in jobs) else None

        running = wait_for(all_running, timeout=30, what="all three running under the first one")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    pids = {j["id"]: j["pid"] for j in running}

    # While nobody supervises: one runner dies, and a new job is submitted.
    os.kill(pids[ids[2]], signal.SIGKILL)
    late = store.create("sleep", {"seconds": 0}, 60)["id"]

    second = make_supervisor(max_concurrent=3)
    for job_id in ids[:2]:
        final = second.wait_final(job_id)
        assert final["state"] == "completed", final
        assert final["pid"] == pids[job_id], "adopted, never started twice"
    lost = second.wait_final(ids[2])
    assert lost["state"] == "failed"
    assert lost["error"]["type"] == "lost"
    assert lost["exit_code"] is None
    assert "earlier supervisor" in lost["error"]["message"]
    assert second.wait_final(late)["state"] == "completed"


@pytest.mark.parametrize("named", ["an hour ago", "in another boot"])
def test_a_lost_runner_whose_pid_another_process_took_is_not_killed_with_it(
        named: str, data_dir: Path) -> None:
    store = JobStore(data_dir / "jobs")
    job_id = store.create("sleep", {"seconds": 1}, 60)["id"]
    # Its runner, as an earlier supervisor recorded it, ended while none watched, and an
    # unrelated process (a shell with a pipeline, say) took its pid and leads a group.
    innocent = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60; wait"],
                                start_new_session=True)
    try:
        def whole_group() -> list[psutil.Process] | None:
            members = [proc for proc in psutil.process_iter() if _group_of(proc) == innocent.pid]
            return members if len(members) == 3 else None

        group = wait_for(whole_group, timeout=10, what="the shell and its two sleeps")
        an_hour_ago = time.time() - 3600
        job_file = store.path(job_id)
        p.write_json(job_file, {**store.read(job_id), p.F_STATE: p.JobState.RUNNING,
                                p.F_PID: innocent.pid, p.F_STARTED_AT: p.iso(an_hour_ago)})
        record = Runner(job_id, innocent.pid, an_hour_ago).record()
        if named == "in another boot":  # the same start since its boot as this process's
            record.update(create_time=pids.created(innocent.pid), boot_id="an earlier boot")
        p.write_json(p.sibling(job_file, p.RUN_FILE), record)
        supervisor = start_process(["-m", "jobs.supervisor"],
                                   env={"OFFLOAD_DATA_DIR": str(data_dir)})
        try:
            lost = wait_for(lambda: (job := store.read(job_id))["state"] == "failed" and job,
                            timeout=30, what="the job found lost")
            assert lost["error"]["type"] == "lost"
            time.sleep(0.5)  # its launch released: what was left of its group was killed
        finally:
            stop_process(supervisor)
        assert innocent.poll() is None
        assert all(proc.is_running() for proc in group)
    finally:
        os.killpg(innocent.pid, signal.SIGKILL)
        innocent.wait(10)


def test_a_runner_its_claim_does_not_name_is_adopted_by_the_pid_it_wrote(
        data_dir: Path) -> None:
    store = JobStore(data_dir / "jobs")
    job_id = store.create("sleep", {"seconds": 3, "steps": 3}, 60)["id"]
    job_file = store.path(job_id)
    # The claim named the child forked ahead, which died before it was handed the job;
    # another child took it, and the supervisor was killed before it wrote that one's record.
    ahead = subprocess.Popen(["sleep", "60"])
    created = psutil.Process(ahead.pid).create_time()
    ahead.kill()
    ahead.wait(10)
    p.write_json(p.sibling(job_file, p.RUN_FILE), Runner(job_id, ahead.pid, created).record())
    runner = start_process(["-m", "runners.sleep", "--job-file", str(job_file)],
                           env={p.LAUNCHED_ENV: "1"})  # by the supervisor that was killed
    try:
        wait_for(lambda: store.read(job_id).get("pid") == runner.pid, timeout=30,
                 what="the runner running, its pid in the job file")
        supervisor = start_process(["-m", "jobs.supervisor"],
                                   env={"OFFLOAD_DATA_DIR": str(data_dir)})
        try:
            def final_state() -> dict[str, Any] | None:
                job = store.read(job_id)
                return job if job["state"] in p.FINAL_STATES else None

            final = wait_for(final_state, timeout=30, what="the job final")
            assert runner.wait(30) == 0
        finally:
            stop_process(supervisor)
    finally:
        stop_process(runner)
    # Adopted and left to finish: not found lost while it ran, nor run a second time.
    assert final["state"] == p.JobState.COMPLETED, final
    assert final["pid"] == runner.pid and final.get("error") is None


@pytest.mark.parametrize("claim", ["bare", "naming a child forked ahead that died"])
def test_a_runner_that_has_not_yet_said_its_pid_is_adopted_not_run_again(
        claim: str, data_dir: Path) -> None:
    store = JobStore(data_dir / "jobs")
    job_id = store.create("sleep", {"seconds": 0}, 60, fields={p.F_MAX_ATTEMPTS: 2})["id"]
    job_file = store.path(job_id)
    # Its supervisor was killed after the spawn, before it wrote the runner's pid: the
    # claim is bare. The runner waits for the word that its claim is on disk (as a
    # starved one would take its time), so it has not written its pid either.
    record: dict[str, Any] = {"pid": None, "claimed_by": 1, "launched_ns": time.time_ns()}
    if claim != "bare":  # another child took the job, and its record was never written
        ahead = subprocess.Popen(["sleep", "60"])
        record = Runner(job_id, ahead.pid, pids.created(ahead.pid)).record()
        ahead.kill()
        ahead.wait(10)
    p.write_json(p.sibling(job_file, p.RUN_FILE), record)
    listen, word = os.pipe()
    runner = subprocess.Popen(
        [sys.executable, "-m", "runners.sleep", "--job-file", str(job_file)], cwd=ROOT,
        env={**os.environ, p.CLAIM_WORD_ENV: str(listen), p.LAUNCHED_ENV: "1"},
        pass_fds=(listen,),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(listen)
    try:
        supervisor = start_process(["-m", "jobs.supervisor"],
                                   env={"OFFLOAD_DATA_DIR": str(data_dir)})
        try:
            wait_for(lambda: "adopted" in _log(data_dir), timeout=30,
                     what="the job adopted by the new supervisor")
            os.write(word, p.DURABLE_WORD)  # the runner goes on
            assert runner.wait(30) == 0
            final = wait_for(lambda: (job := store.read(job_id))["state"] in p.FINAL_STATES
                             and job, timeout=30, what="the job final")
        finally:
            stop_process(supervisor)
    finally:
        os.close(word)
        runner.kill()
        runner.wait(10)
    assert isinstance(final, dict)
    assert final["state"] == p.JobState.COMPLETED, final
    assert final["pid"] == runner.pid and final.get(p.F_ATTEMPT, 1) == 1, final


def _log(data_dir: Path) -> str:
    path = data_dir / "supervisor.log"
    return path.read_text() if path.exists() else ""


STEP_S = 30.0  # how far the test steps the clock forward, and back at its end


@pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0,
                    reason="steps this machine's clock: Linux, as root (as CI runs)")
def test_a_clock_step_leaves_a_running_job_alone(make_server: Callable[..., Any]) -> None:
    # Linux's create time of a process is the boot's time on the wall clock plus its
    # start since the boot, and a step of the clock (NTP, a virtual machine's resume)
    # moves the first: the runner looked gone, and was killed as lost.
    server = make_server()
    with server.client() as client:
        job_id = client.post("/api/jobs", json={"kind": "sleep", "timeout_s": 300, "input": {
            "seconds": 16, "steps": 16}}).json()["id"]

        def job() -> dict[str, Any]:
            answer: dict[str, Any] = client.get(f"/api/jobs/{job_id}").json()
            return answer

        running = wait_for(lambda: job()["state"] == "running" and job(), timeout=30,
                           what="the job running")
        assert isinstance(running, dict)
        time.clock_settime(time.CLOCK_REALTIME, time.time() + STEP_S)
        try:
            # Its supervisor watches it past the step (its waiter gave up on the fork
            # server's word within 11 s) ...
            time.sleep(12)
            assert job()["state"] == "running", job()
            # ... and one started after the step adopts it (the keeper starts one).
            supervisors = [proc for proc in psutil.Process(server.proc.pid).children()
                           if "jobs.supervisor" in " ".join(proc.cmdline())]
            assert len(supervisors) == 1
            supervisors[0].kill()
            final = wait_for(lambda: job()["state"] not in ("queued", "running") and job(),
                             timeout=60, what="the job final")
        finally:
            time.clock_settime(time.CLOCK_REALTIME, time.time() - STEP_S)
    assert isinstance(final, dict)
    assert final["state"] == "completed", final
    assert final["pid"] == running["pid"] and final.get("attempt", 1) == 1, final


def _group_of(proc: psutil.Process) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except OSError:
        return None


def test_standalone_supervisor_process_runs_jobs(data_dir: Path) -> None:
    store = JobStore(data_dir / "jobs")
    proc = start_process(["-m", "jobs.supervisor"], env={"OFFLOAD_DATA_DIR": str(data_dir)})
    try:
        job_id = store.create("sleep", {"seconds": 0.2}, 30)["id"]
        final = wait_for(lambda: (j := store.read(job_id))["state"] == "completed" and j,
                         timeout=20, what="completed")
        assert final["result"]["slept_s"] == 0.2
    finally:
        stop_process(proc)


@pytest.mark.llm
def test_a_killed_supervisor_takes_its_model_server_with_it(data_dir: Path) -> None:
    """Its key died with it, so no later supervisor could use that server: it must not run
    on, and llm.json names it from its start, for the next leader to stop elsewhere."""
    if embedded.server_binary() is None:
        pytest.skip("llama-server is not built here: run `python launch.py` (it builds it)")
    first = start_process(["-m", "jobs.supervisor"], log=data_dir.parent / "supervisor.log",
                          env={"OFFLOAD_DATA_DIR": str(data_dir), "OFFLOAD_LLM_ENGINE": "auto"})
    try:
        server = wait_for(lambda: next((c for c in psutil.Process(first.pid).children()
                                        if embedded.is_server(c.cmdline())), None),
                          timeout=60, interval=0.1, what="the model server to start")
        wait_for(lambda: (embedded.read_status(str(data_dir)) or {}).get("pid") == server.pid,
                 timeout=60, interval=0.1, what="llm.json to name the model server")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    wait_for(lambda: process_gone(server.pid), timeout=30, what="the model server to go")


@pytest.mark.parametrize("launcher", ["local", pytest.param("ray", marks=pytest.mark.ray)])
def test_queued_jobs_run_by_hand_as_their_supervisor_launches_them_run_once(
        launcher: str, make_server: Callable[..., Server], tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    # Run by hand as the queue went on, a job ran twice at once: the runner by hand and
    # the supervisor's each read it queued before the other's claim. Others were logged
    # "failed (lost)" while their runner by hand completed them. The Ray launcher wrote
    # its claim over the one by hand, and sent the job to Ray too.
    runs = tmp_path / "runs.txt"
    env = {"OFFLOAD_MAX_CONCURRENT": "16"}
    if launcher == "ray":
        env.update(OFFLOAD_LAUNCHER="ray",
                   OFFLOAD_RAY_ADDRESS=request.getfixturevalue("ray_head").address)
    server = make_server(env=env)
    with server.client() as client:
        client.post("/api/queue/pause").raise_for_status()
        ids = [client.post("/api/jobs", json={"kind": "probe", "input": {
            "seconds": 2, "steps": 1, "count_to": str(runs)}}).json()["id"]
            for _ in range(12)]
        client.post("/api/queue/resume").raise_for_status()
        by_hand = [subprocess.Popen(
            [sys.executable, "-m", "tests.probe_runner", "--job-file",
             str(server.data_dir / "jobs" / job_id / p.JOB_FILE)], cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for job_id in ids]
        said = [proc.communicate(timeout=120)[1] for proc in by_hand]
        finals = [wait_job(client, job_id) for job_id in ids]
    counted = [line.split()[0] for line in runs.read_text().splitlines()]
    assert sorted(counted) == sorted(ids), "each job ran once"
    assert [job["state"] for job in finals] == ["completed"] * len(ids), finals
    for proc, stderr in zip(by_hand, said, strict=True):  # ran it, or said who does or did
        assert proc.returncode == 0 or (proc.returncode == 2 and any(
            why in stderr for why in ("is claimed already", "is running", "has already finished"))
        ), stderr
    assert "lost" not in _log(server.data_dir)


@pytest.mark.skipif(sys.platform == "win32", reason="process groups")
def test_a_runner_by_hand_leaves_the_rest_of_its_process_group_alone(
        make_server: Callable[..., Server]) -> None:
    """A runner run by hand leads its shell's pipeline (`... | tee log`): the supervisor
    that watched it to its end killed its group, as it does a runner of its own whose
    children outlived it, and the `tee` with it."""
    server = make_server()
    with server.client() as client:
        client.post("/api/queue/pause").raise_for_status()  # it runs by hand alone
        job_id = client.post("/api/jobs", json={"kind": "sleep", "input": {
            "seconds": 1, "steps": 1}}).json()["id"]
        runner = subprocess.Popen(
            [sys.executable, "-m", "runners.sleep", "--job-file",
             str(server.data_dir / "jobs" / job_id / p.JOB_FILE)],
            cwd=ROOT, stdout=subprocess.DEVNULL, preexec_fn=os.setpgrp)  # as a shell's job
        pipeline = subprocess.Popen(["sleep", "600"],
                                    preexec_fn=lambda: os.setpgid(0, runner.pid))
        try:
            wait_for(lambda: f"job {job_id}" in _log(server.data_dir), 30, 0.05,
                     "the supervisor to watch the job")
            assert runner.wait(timeout=60) == 0
            assert wait_job(client, job_id)["state"] == "completed"
            wait_for(lambda: f"job {job_id}: completed" in _log(server.data_dir), 30, 0.05,
                     "the supervisor to see the job end")
            time.sleep(0.5)
            assert pipeline.poll() is None, "the pipeline's other process was killed"
        finally:
            pipeline.kill()
            pipeline.wait()


def test_a_spare_known_only_by_the_pid_it_wrote_is_adopted_if_it_was_there_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # macOS and Windows: a spare shows no job in its command line, and starts long before
    # the job it takes; with no launch record (its supervisor killed before writing it),
    # its job was taken for lost and run a second time beside it.
    from jobs.launch import local
    from jobs.launch.local import ADOPT_START_TOLERANCE_S, _create_time_of_its_runner

    monkeypatch.setattr(local, "SPARES_SHOW_NO_JOB", True)  # as on macOS and Windows

    job_file = tmp_path / "jobs" / ("a" * 32) / p.JOB_FILE
    spare = subprocess.Popen([sys.executable, "-m", "jobs.launch.spare", "runners.sleep"],
                             cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        later = p.iso(time.time() + 3 * ADOPT_START_TOLERANCE_S)  # a spare's job
        assert _create_time_of_its_runner(spare.pid, later, job_file) == pids.created(spare.pid)
        # Any other process there first (init, in another pid namespace on one folder).
        assert _create_time_of_its_runner(other.pid, later, job_file) is None
        # Started after the job had: another process, which took a runner's pid since.
        earlier = p.iso(time.time() - 3 * ADOPT_START_TOLERANCE_S)
        assert _create_time_of_its_runner(spare.pid, earlier, job_file) is None
    finally:
        for proc in (spare, other):
            proc.kill()
            proc.wait()
        assert spare.stdin is not None and spare.stdout is not None
        spare.stdin.close()
        spare.stdout.close()


@pytest.mark.skipif(sys.platform != "linux", reason="/proc lists a process group")
def test_what_a_runner_left_when_no_supervisor_watched_its_end_is_stopped_by_it(
        make_server: Callable[..., Server]) -> None:
    # A runner that ended during a restart (its final state written itself) left the
    # child it started running for good: only an end a supervisor watched killed its group.
    server = make_server()
    with server.client() as client:
        job_id = client.post("/api/jobs", json={"kind": "probe", "input": {
            "seconds": 3, "spawn_child": True}}).json()["id"]
        running = wait_for(lambda: (j := client.get(f"/api/jobs/{job_id}").json())
                           ["progress"] and j, 30, what="its child started")
    child = int(running["progress"]["message"].split()[1])
    server.stop()
    store = JobStore(server.data_dir / "jobs")
    wait_for(lambda: store.read(job_id)["state"] == "completed", 30,
             what="the job's end, unwatched")
    wait_for(lambda: process_gone(child), 10, what="the child it left stopped by the runner")
    # A stop is no fault: "its fork server ended or stalled first" was said of each runner.
    assert "stalled first" not in _log(server.data_dir)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="starting a process as another account takes root")
def test_another_accounts_process_is_never_adopted_as_a_runner(tmp_path: Path) -> None:
    # Known only by a pid (no launch record), a process of another account that started
    # with the job and even shows its job file (a reused pid) was taken for its runner:
    # a cancel would then stop it, or fail to, and the job wait on it.
    from jobs.launch.local import _create_time_of_its_runner

    job_file = tmp_path / "jobs" / ("a" * 32) / p.JOB_FILE
    started = p.iso(time.time())
    stranger = subprocess.Popen(["sh", "-c", "sleep 60; :", "sh", "--job-file", str(job_file)],
                                user=65534, group=65534, cwd="/")
    try:
        wait_for(lambda: psutil.Process(stranger.pid).username() != psutil.Process().username(),
                 timeout=10, what="the process as another account")
        assert _create_time_of_its_runner(stranger.pid, started, job_file) is None
    finally:
        stranger.kill()
        stranger.wait()
