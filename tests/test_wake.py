"""The supervisor's doorbell (jobs.protocol.wake): a submission or a cancel wakes the
real supervisor process through its socket, naming the job; without a socket, through
the wake file."""

from __future__ import annotations

import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from jobs import protocol as p
from jobs.protocol.wake import CAN_LISTEN, RING_READ, SOCKET_FILE, WAKE_FILE
from tests.conftest import wait_for
from tests.server import Server
from tests.tracing import PUT_IN_PLACE, TracedServer, parse

pytestmark = pytest.mark.skipif(not CAN_LISTEN, reason="no Unix sockets on this platform")

NO_MODEL = {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}  # no embedded model to load


@pytest.fixture
def short_data_dir() -> Iterator[Path]:
    """A socket address holds about a hundred bytes: pytest's folders are often longer."""
    folder = Path(tempfile.mkdtemp(prefix="offload-"))
    yield folder / "data"
    shutil.rmtree(folder, ignore_errors=True)


def _run_one(server: Server, seconds: float = 0) -> None:
    with server.client() as client:
        job = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": seconds}})
        job_id = job.json()["id"]
        wait_for(lambda: client.get(f"/api/jobs/{job_id}").json()["state"]
                 == p.JobState.COMPLETED, 60, 0.05, "the job to complete")


def test_submissions_and_cancels_ring_the_supervisor_socket(short_data_dir: Path,
                                                            tmp_path: Path) -> None:
    server = Server(short_data_dir, tmp_path / "server.log", NO_MODEL).start()
    try:
        sock = short_data_dir / SOCKET_FILE
        wait_for(lambda: sock.exists(), 60, 0.05, "the leader's doorbell")
        assert stat.S_ISSOCK(sock.lstat().st_mode)
        assert stat.S_IMODE(sock.lstat().st_mode) == 0o600  # only its owner may ring
        for _ in range(3):
            _run_one(server)
        with server.client() as client:
            job_id = client.post("/api/jobs", json={"kind": "sleep",
                                                    "input": {"seconds": 60}}).json()["id"]
            wait_for(lambda: client.get(f"/api/jobs/{job_id}").json()["state"]
                     == p.JobState.RUNNING, 60, 0.05, "the job to run")
            assert client.delete(f"/api/jobs/{job_id}").json()["state"] == "cancelled"
        assert not (short_data_dir / WAKE_FILE).exists()  # every ring went by the socket
    finally:
        server.stop()
    wait_for(lambda: not (short_data_dir / SOCKET_FILE).exists(), 30, 0.05,
             "the socket to go with its supervisor")


def test_without_a_socket_the_wake_file_rings(make_server: Callable[..., Server],
                                              data_dir: Path) -> None:
    long_dir = data_dir / ("x" * 120)  # too long for a socket address
    server = make_server(env={**NO_MODEL, "OFFLOAD_DATA_DIR": str(long_dir)})
    _run_one(server)
    assert (long_dir / WAKE_FILE).exists() and not (long_dir / SOCKET_FILE).exists()


def test_a_ring_from_a_stranger_is_only_a_look(short_data_dir: Path, tmp_path: Path) -> None:
    """Rings that name no job, a job that does not exist, or garbage change nothing."""
    import socket

    server = Server(short_data_dir, tmp_path / "server.log", NO_MODEL).start()
    try:
        sock_path = short_data_dir / SOCKET_FILE
        wait_for(lambda: sock_path.exists(), 60, 0.05, "the leader's doorbell")
        sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        for ring in (b"", b"0" * 32, b"../../etc/passwd", b"\xff" * 64):
            sender.sendto(ring, str(sock_path))
        sender.close()
        _run_one(server)  # the supervisor still serves
        assert not list((short_data_dir / "jobs").glob("0000*"))
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_ring_launches_its_job_without_looking_at_the_others(
        strace: str, short_data_dir: Path, tmp_path: Path) -> None:
    """The supervisor's thread, between reading a ring and claiming its job, neither lists
    the job folder nor opens another job's file (strace on the real server)."""
    trace = tmp_path / "strace.txt"
    jobs = short_data_dir / "jobs"
    server = TracedServer(strace, trace,
                          "getdents64,openat,recvfrom,rename,renameat,renameat2,link,linkat",
                          short_data_dir, tmp_path / "server.log", NO_MODEL)
    ids = []
    try:
        server.start(timeout=120)
        wait_for(lambda: (short_data_dir / SOCKET_FILE).exists(), 60, 0.05, "the doorbell")
        for _ in range(10):  # jobs that are there already, finished
            _run_one(server)
        with server.client() as client:
            for _ in range(5):
                ids.append(client.post("/api/jobs", json={"kind": "sleep"}).json()["id"])
                wait_for(lambda: client.get(f"/api/jobs/{ids[-1]}").json()["state"]
                         == p.JobState.COMPLETED, 60, 0.05, "the job to complete")
    finally:
        server.stop()
    calls = parse(trace.read_text())
    quiet = 0
    for job_id in ids:
        claim = next(c for c in calls if c.name in PUT_IN_PLACE and c.text.rstrip().endswith("= 0")
                     and f'"{jobs / job_id / p.RUN_FILE}"' in c.text)
        # The doorbell's read: the id alone is the datagram (an HTTP read holds more).
        rings = [c.start for c in calls[:calls.index(claim)] if c.name == "recvfrom"
                 and f'"{job_id}", {RING_READ}' in c.text]
        if not rings:
            continue  # a full pass found it before its ring was read
        ring = max(rings)
        between = [c for c in calls if ring < c.start < claim.start and c.tid == claim.tid]
        listed = [c for c in between if c.name == "getdents64"]
        others = [c for c in between if c.name == "openat" and p.JOB_FILE in c.text
                  and job_id not in c.text]
        quiet += not listed and not others
    # A full pass every SUPERVISOR_INTERVAL_S may fall in between now and then.
    assert quiet >= 3, f"only {quiet} of {len(ids)} jobs were launched from their ring alone"
