from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
import pytest

from jobs import protocol as p
from jobs.protocol import embedded
from jobs.settings import get_settings
from jobs.store.job_store import JobStore
from jobs.supervisor.loop import Supervisor
from jobs.supervisor.thread import SupervisorThread

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")
# The OFFLOAD_* variables a test may take from outside: the suite's own kind (tests/__init__),
# launch.py's build cache, and the suite's knobs.
KEPT_FROM_OUTSIDE = frozenset({
    "OFFLOAD_KINDS", "OFFLOAD_CACHE_DIR", "OFFLOAD_CHROMIUM", "OFFLOAD_SOAK_JOBS"})


def _exported_settings() -> list[str]:
    """Settings exported for one's own server (a deadline, a cap, a token, a model)."""
    return [name for name in os.environ
            if (name.startswith("OFFLOAD_") and name not in KEPT_FROM_OUTSIDE)
            or name in ("OPENAI_BASE_URL", "OPENAI_API_KEY")]


def _stopped_as_by_ctrl_c() -> None:
    """A SIGTERM or SIGHUP ends the suite as Ctrl+C does, the servers its tests started
    stopped by their teardown (they died with it, these left running). Only the first:
    one sent to the whole group and passed on by launch.py too would cut that short."""
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    for name in ("SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)
        if number is not None and signal.getsignal(number) is not signal.SIG_IGN:
            signal.signal(number, stop)


_stopped_as_by_ctrl_c()

# As the suite starts, before any server a module or the session shares (not in
# tests/__init__: a runner of the tests' own kind imports it, and takes its job from these).
for _name in _exported_settings():
    del os.environ[_name]


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
             monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every test gets its own data folder, and no settings leak in from outside: none
    from the environment, none from a `.env` or `schedules.toml` a developer keeps in the
    project's folder (where the servers of the tests run)."""
    # Cleared again for each test: code a test runs in-process (a runner, the API's
    # start) sets some for its own children (OPENAI_BASE_URL, OFFLOAD_HOST).
    for name in _exported_settings():
        monkeypatch.delenv(name)
    folder = tmp_path / "data"
    monkeypatch.setenv("OFFLOAD_DATA_DIR", str(folder))
    shared = tmp_path_factory.getbasetemp()  # not tmp_path: tests look at what it holds
    monkeypatch.setenv("OFFLOAD_ENV_FILE", str(shared / "no.env"))
    no_schedules = shared / "no-schedules.toml"
    if not no_schedules.exists():
        no_schedules.write_text("# none\n")
    monkeypatch.setenv("OFFLOAD_SCHEDULES_FILE", str(no_schedules))
    get_settings.cache_clear()
    yield folder
    get_settings.cache_clear()
    _kill_leftover_runners(folder / "jobs")
    _kill_leftover_model(folder)


def _kill_leftover_runners(jobs_dir: Path) -> None:
    """Whatever a failed test left running must not outlive it."""
    if not jobs_dir.exists():
        return
    for run_file in jobs_dir.glob("*/run.json"):
        with contextlib.suppress(Exception):
            pid = (p.read_json(run_file) or {}).get("pid")
            if isinstance(pid, int) and psutil.pid_exists(pid):
                proc = psutil.Process(pid)
                if "runners." in " ".join(proc.cmdline()):
                    for each in [*proc.children(recursive=True), proc]:
                        each.kill()


def _kill_leftover_model(data_dir: Path) -> None:
    """A supervisor killed outright leaves its model server to the next one, which a test
    never starts."""
    with contextlib.suppress(Exception):
        pid = (embedded.read_status(str(data_dir)) or {}).get("pid")
        if isinstance(pid, int) and pid > 0 and psutil.pid_exists(pid):
            proc = psutil.Process(pid)
            if embedded.is_server(proc.cmdline()):
                proc.kill()


def wait_job(client: httpx.Client, job_id: str, *states: str,
             timeout: float = 60) -> dict[str, Any]:
    """The job once it is in one of `states` (by default: final)."""
    wanted = states or tuple(p.FINAL_STATES)

    def check() -> dict[str, Any] | None:
        job: dict[str, Any] = client.get(f"/api/jobs/{job_id}").json()
        return job if job["state"] in wanted else None

    return wait_for(check, timeout, 0.05, f"job {job_id} in {wanted}")


def wait_for(predicate: Callable[[], T | None], timeout: float = 20.0, interval: float = 0.02,
             what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class RunningSupervisor(SupervisorThread):
    """A supervisor as the API runs it, plus helpers to submit and wait."""

    def __init__(self, supervisor: Supervisor) -> None:
        super().__init__(supervisor)
        self.store = JobStore(supervisor.dir)

    def submit(self, kind: str = "sleep", timeout_s: float = 60, **job_input: Any) -> str:
        job_id = str(self.store.create(kind, job_input, timeout_s)["id"])
        self.supervisor.wake(job_id)
        return job_id

    def job(self, job_id: str) -> dict[str, Any]:
        return self.store.read(job_id)

    def wait_state(self, job_id: str, *states: str, timeout: float = 20.0) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            job = self.job(job_id)
            return job if job["state"] in states else None

        return wait_for(check, timeout, what=f"job {job_id} to reach {states}")

    def wait_final(self, job_id: str, timeout: float = 20.0) -> dict[str, Any]:
        return self.wait_state(job_id, *p.FINAL_STATES, timeout=timeout)


@pytest.fixture
def make_supervisor(data_dir: Path) -> Iterator[Callable[..., RunningSupervisor]]:
    started: list[RunningSupervisor] = []

    def factory(**options: Any) -> RunningSupervisor:
        options.setdefault("grace_s", 2.0)
        running = RunningSupervisor(Supervisor(data_dir / "jobs", **options))
        running.start()
        started.append(running)
        return running

    yield factory
    for running in started:
        running.stop()


@pytest.fixture
def supervisor(make_supervisor: Callable[..., RunningSupervisor]) -> RunningSupervisor:
    return make_supervisor(max_concurrent=4)


def process_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_process(args: list[str], env: dict[str, str] | None = None,
                  log: Path | None = None) -> subprocess.Popen[bytes]:
    with open(log or os.devnull, "ab") as out:
        return subprocess.Popen([sys.executable, *args], cwd=ROOT,
                                env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@contextlib.contextmanager
def small_disk(tmp_path: Path, size: str, at: Path | None = None) -> Iterator[Path]:
    """A tmpfs of `size` (a disk that fills up), mounted on a new folder `at` (by default
    `small` in `tmp_path`); skipped where none can be mounted."""
    disk = at or tmp_path / "small"
    disk.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                              str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()[:200]}")
    try:
        yield disk
    finally:
        # Lazily: a server on it stops only at the test's teardown, after this.
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.fixture
def make_server(data_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Start a real server (uvicorn by default) on a free loopback port; stopped at the end."""
    from tests.server import Server

    servers: list[Server] = []

    def factory(env: dict[str, str] | None = None, workers: int = 1,
                gunicorn: bool = False, cwd: Path = ROOT, python: str = sys.executable
                ) -> Server:
        log = tmp_path / f"server-{len(servers)}.log"
        server = Server(data_dir, log, env, workers, gunicorn, cwd, python)
        servers.append(server)
        return server.start()

    yield factory
    for server in servers:
        server.stop()


@pytest.fixture
def strace() -> str:
    """strace, able to trace here (.ci/run installs it where it is missing)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("strace is Linux's")
    path = shutil.which("strace")
    if path is None:
        reason = "strace is not installed (apt-get install strace)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: .ci/run installs it, so CI must run this test")
        pytest.skip(reason)
    probe = subprocess.run([path, "-f", "-o", os.devnull, "true"], capture_output=True,
                           text=True, timeout=30)
    if probe.returncode != 0:  # a container without ptrace, say
        pytest.skip(f"strace cannot trace here: {probe.stderr.strip()[:200]}")
    return path


@pytest.fixture(scope="session")
def ray_head() -> Iterator[Any]:
    """One real Ray head for the session (loopback only), stopped at the end."""
    from tests.ray_head import SUPPORTED, RayHead, ray_cli

    if not SUPPORTED:
        pytest.skip("these tests start a Ray head, which Ray supports on Linux and on macOS "
                    "on Apple silicon (the Ray launcher itself is plain HTTP, tested "
                    "everywhere in test_ray_rest.py)")
    if ray_cli() is None:
        reason = ("Ray is not installed in this environment (`pip install 'offload[ray]'`; "
                  "`python launch.py test` installs it where Ray has wheels)")
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: Ray supports this platform, so CI must run these tests")
        pytest.skip(reason)
    head = RayHead(num_cpus=2).start()
    yield head
    head.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests on the Ray head run last, so its processes idle beside no other test."""
    items.sort(key=lambda item: item.get_closest_marker("ray") is not None)
