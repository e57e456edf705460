"""The launcher contract, against both launchers: the local one, and Ray Jobs on a
real Ray head of this machine (the runners run on it as Ray jobs)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psutil
import pytest

from jobs import protocol as p
from jobs.launch.base import Launcher
from jobs.launch.local import SPARES, SPAWN, LocalLauncher, LocalRun
from jobs.launch.ray import RayLauncher, RemoteRun, submission_id
from jobs.launch.ray_client import RayJobNotFound, RayJobsClient
from jobs.supervisor.loop import Supervisor
from tests.conftest import RunningSupervisor, process_gone, wait_for

MakeLaunched = Callable[..., RunningSupervisor]


@pytest.fixture(params=["local", "local-exec", "local-spares",
                        pytest.param("ray", marks=pytest.mark.ray)])
def launcher_name(request: pytest.FixtureRequest) -> str:
    """local: runners forked by the fork server (Linux; elsewhere warm spares); local-exec:
    each a new interpreter; local-spares: each taken by a warm spare, as on macOS and
    Windows; ray: Ray Jobs."""
    return str(request.param)


@pytest.fixture
def make_launcher(launcher_name: str, request: pytest.FixtureRequest
                  ) -> Callable[[], Launcher]:
    if launcher_name == "local":
        return LocalLauncher
    if launcher_name == "local-exec":
        return lambda: LocalLauncher(mode=SPAWN)
    if launcher_name == "local-spares":
        return lambda: LocalLauncher(mode=SPARES)
    head = request.getfixturevalue("ray_head")
    return lambda: RayLauncher(head.address)


@pytest.fixture
def launched(make_supervisor: Callable[..., RunningSupervisor],
             make_launcher: Callable[[], Launcher]) -> MakeLaunched:
    def factory(**options: Any) -> RunningSupervisor:
        return make_supervisor(launcher=make_launcher(), **options)

    return factory


def engine_jobs(sup: Supervisor, job_id: str) -> int:
    """How many jobs the engine runs for this job id."""
    if isinstance(sup.launcher, RayLauncher):
        sid = submission_id(job_id)
        return sum(1 for j in sup.launcher.client.jobs() if j.submission_id == sid)
    job_file = str(sup.dir / job_id / p.JOB_FILE)
    return sum(1 for proc in psutil.process_iter(["cmdline"])
               if job_file in (proc.info["cmdline"] or []))


def test_running_then_completed_with_rising_progress(launched: MakeLaunched,
                                                     launcher_name: str) -> None:
    sup = launched(max_concurrent=2)
    job_id = sup.submit(seconds=1.5, steps=5, tag="x")
    job = sup.wait_state(job_id, "running", timeout=60)
    assert job["launcher"] == launcher_name.split("-")[0] and job["host"]
    fractions: list[float] = []
    while (job := sup.job(job_id))["state"] == "running":
        fraction = (job["progress"] or {}).get("fraction")
        if fraction is not None and fraction not in fractions:
            fractions.append(fraction)
        time.sleep(0.05)
    assert job["state"] == "completed", job
    assert job["result"]["echo"] == {"seconds": 1.5, "steps": 5, "tag": "x"}
    assert job["exit_code"] == 0 and job["error"] is None
    assert len(fractions) >= 2 and fractions == sorted(fractions), fractions
    assert job["launcher"] == launcher_name.split("-")[0]
    if isinstance(sup.supervisor.launcher, RayLauncher):
        client = sup.supervisor.launcher.client
        # Released once the local file is final.
        wait_for(lambda: _unknown(client, submission_id(job_id)), 30,
                 what="Ray's record deleted (tried again while its head fails)")


def test_stop_mid_run_cancels_and_ends_runner_and_grandchild(launched: MakeLaunched) -> None:
    sup = launched(max_concurrent=2)
    job_id = sup.submit("probe", seconds=60, spawn_child=True)
    job = wait_for(lambda: (j := sup.job(job_id)).get("child_pid") and j, 60, what="child")
    runner_pid, child_pid = job["pid"], job["child_pid"]
    assert psutil.Process(child_pid).ppid() == runner_pid
    sup.store.request_cancel(job_id)
    sup.supervisor.wake()
    final = sup.wait_final(job_id, timeout=30)
    assert final["state"] == "cancelled", final
    assert final["error"]["type"] == "cancelled"
    assert (final["progress"] or {}).get("message") == f"child {child_pid} started", \
        "partial progress is kept"
    wait_for(lambda: process_gone(runner_pid) and process_gone(child_pid), 15,
             what="runner and grandchild gone")


def test_starting_twice_runs_one_engine_job(make_launcher: Callable[[], Launcher],
                                            make_supervisor: Callable[..., RunningSupervisor]
                                            ) -> None:
    sup = make_supervisor(max_concurrent=1)  # only its store and folder are used here
    sup.stop()
    launcher = make_launcher()
    job_id = sup.store.create("sleep", {"seconds": 3, "steps": 3}, 60)["id"]
    job_file = sup.supervisor.dir / job_id / p.JOB_FILE
    data = sup.job(job_id)
    try:
        first = launcher.start("runners.sleep", job_file, data, lambda: None)
        second = launcher.start("runners.sleep", job_file, data, lambda: None)
        wait_for(lambda: sup.job(job_id)["state"] == "running", 60, what="running")
        probe = Supervisor(sup.supervisor.dir, launcher=launcher)
        assert engine_jobs(probe, job_id) == 1
        if isinstance(first, LocalRun):
            assert isinstance(second, LocalRun) and first.runner.pid == second.runner.pid
        else:
            assert isinstance(first, RemoteRun) and isinstance(second, RemoteRun)
            assert first.submission_id == second.submission_id
        final = sup.wait_final(job_id, timeout=60)
        assert final["state"] == "completed", final
    finally:
        launcher.close()


def test_passed_deadline_is_timeout(launched: MakeLaunched) -> None:
    sup = launched(max_concurrent=2)
    job_id = sup.submit(seconds=60, timeout_s=2.0)
    final = sup.wait_final(job_id, timeout=60)
    assert final["state"] == "timeout", final
    assert final["error"]["type"] == "timeout"
    assert "deadline of 2.0 s" in final["error"]["message"]


def test_crashing_runner_is_failed_with_its_exit_code(launched: MakeLaunched) -> None:
    sup = launched(max_concurrent=2)
    job_id = sup.submit("probe", exit_code=7)
    final = sup.wait_final(job_id, timeout=60)
    assert final["state"] == "failed", final
    assert final["error"]["type"] == "lost"
    assert final["exit_code"] == 7
    assert "exit code 7" in final["error"]["message"]


def test_restart_adopts_running_jobs(launched: MakeLaunched) -> None:
    first = launched(max_concurrent=2)
    job_id = first.submit(seconds=4, steps=4)
    running = first.wait_state(job_id, "running", timeout=60)
    first.stop()  # the API restarts: runners keep running
    second = launched(max_concurrent=2)
    final = second.wait_final(job_id, timeout=60)
    assert final["state"] == "completed", final
    assert final["pid"] == running["pid"], "adopted, never started twice"
    record = p.read_json(second.supervisor.dir / job_id / p.RUN_FILE) or {}
    assert record.get("launcher", "local") == running["launcher"]


def _unknown(client: RayJobsClient, sid: str) -> bool:
    try:
        client.info(sid)
    except RayJobNotFound:
        return True
    return False


def test_children_start_on_the_real_interpreter_of_a_windows_venv(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A venv's python.exe on Windows is a redirector that starts the interpreter as its
    # own child: the supervisor started through it saw the redirector as its parent, not
    # the API it watches, and left at once; a runner's pid was the redirector's.
    import sys

    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(sys, "executable", r"C:\app\.venv\Scripts\python.exe")
    monkeypatch.setattr(sys, "_base_executable", r"C:\Python312\python.exe", raising=False)
    assert p._python_for_children() == (r"C:\Python312\python.exe",
                                        {"__PYVENV_LAUNCHER__": r"C:\app\.venv\Scripts\python.exe"})
    monkeypatch.setattr(sys, "_base_executable", r"C:\app\.venv\Scripts\python.exe")
    assert p._python_for_children() == (r"C:\app\.venv\Scripts\python.exe", {})  # no venv
    monkeypatch.setattr(sys, "platform", "linux")  # a venv's python there is the interpreter
    monkeypatch.setattr(sys, "_base_executable", "/usr/bin/python3")
    assert p._python_for_children() == (r"C:\app\.venv\Scripts\python.exe", {})
