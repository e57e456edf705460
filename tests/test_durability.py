"""Nothing acknowledged is lost on power loss: a job file at creation (before the 202),
every final state reach the disk before they count, and every claim before its runner
runs anything of the job; the supervisor hears of a new job as soon as its file is in
place.

The witness is strace on a real server (uvicorn, its supervisor process, the fork
server and the runners): for each of those writes the temp file is fsync'd before the
rename, and the folder after it, in the same thread; a progress write is not fsync'd.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from jobs import protocol as p
from tests.conftest import wait_for
from tests.tracing import PUT_IN_PLACE, Call, TracedServer, parse

pytestmark = [pytest.mark.slow, pytest.mark.faults]
SYSCALLS = ("openat,fsync,fdatasync,rename,renameat,renameat2,link,linkat,sendto,sendmsg,"
            "write,writev")
FSYNCS = ("fsync", "fdatasync")


def _renames_to(calls: list[Call], target: Path) -> list[tuple[Call, str]]:
    """Temp files put in place at `target` (renamed onto it, or linked), each with its
    call."""
    found = []
    for call in calls:
        if call.name in PUT_IN_PLACE and call.text.rstrip().endswith("= 0"):
            paths = re.findall(r'"([^"]+)"', call.text)
            if len(paths) >= 2 and paths[1] == str(target):
                found.append((call, paths[0]))
    return found


def _fsync_of(calls: list[Call], path: str, tid: int) -> list[Call]:
    return [c for c in calls if c.name in FSYNCS and c.tid == tid
            and f"<{path}>" in c.text and c.text.rstrip().endswith("= 0")]


def assert_durable(calls: list[Call], rename: Call, tmp: str, folder: Path) -> Call:
    """The temp file fsync'd before the rename and its folder after, in that thread;
    returns the folder's fsync."""
    before = [c for c in _fsync_of(calls, tmp, rename.tid) if c.end < rename.start]
    assert before, f"{tmp} was renamed without an fsync first:\n{rename.text}"
    after = [c for c in _fsync_of(calls, str(folder), rename.tid) if c.start > rename.end]
    assert after, f"no fsync of {folder} after the rename:\n{rename.text}"
    return after[0]


def _running(client: httpx.Client, job_id: str) -> dict[str, Any] | None:
    job: dict[str, Any] = client.get(f"/api/jobs/{job_id}").json()
    return job if job["state"] == "running" else None


def _final(client: httpx.Client, job_id: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        job = client.get(f"/api/jobs/{job_id}").json()
        return job if job["state"] in p.FINAL_STATES else None

    return wait_for(check, 90, 0.1, f"job {job_id} to finish")


@pytest.mark.timeout(300)
def test_creation_final_states_and_launch_records_are_fsynced(
        strace: str, data_dir: Path, tmp_path: Path) -> None:
    trace = tmp_path / "strace.txt"
    env = {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}  # no embedded model to trace
    server = TracedServer(strace, trace, SYSCALLS, data_dir, tmp_path / "server.log", env)
    try:
        server.start(timeout=120)
        with server.client() as client:
            done = client.post("/api/jobs", json={"kind": "sleep", "input": {
                "seconds": 1, "steps": 10}})
            assert done.status_code == 202, done.text
            lost = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 60}})
            running = wait_for(lambda: _running(client, lost.json()["id"]), 60, what="a runner")
            os.kill(running["pid"], signal.SIGKILL)  # the supervisor writes its final state
            assert _final(client, done.json()["id"])["state"] == "completed"
            assert _final(client, running["id"])["error"]["type"] == "lost"
            # After a quiet spell: the fork server has a child waiting, which its claim
            # names before it is asked for, and whose runner hears that it is on disk.
            told = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0}})
            assert _final(client, told.json()["id"])["state"] == "completed"
    finally:
        server.stop()
    calls = parse(trace.read_text())
    jobs = data_dir / "jobs"
    for job_id in (done.json()["id"], running["id"], told.json()["id"]):
        folder = jobs / job_id
        writes = _renames_to(calls, folder / p.JOB_FILE)
        # Created: on disk, folder and all, before the 202 leaves.
        created, tmp = writes[0]
        synced = assert_durable(calls, created, tmp, folder)
        parent = [c for c in _fsync_of(calls, str(jobs), created.tid) if c.start > created.end]
        assert parent, "the new job's folder was not made durable in the jobs folder"
        answer = next(c for c in calls if "HTTP/1.1 202" in c.text and job_id in c.text)
        assert max(synced.end, parent[0].end) < answer.start, "the 202 left before the fsync"
        # The supervisor is rung once the file is in place: it claims the job while the
        # folders are synced.
        ring = next(c for c in calls if c.name in ("sendto", "sendmsg") and c.tid == created.tid
                    and f'"{job_id}"' in c.text)
        assert created.end < ring.start < synced.start, "not rung between the file and its folders"
        # Final: the last write, durable whoever wrote it (the runner, the supervisor).
        final, tmp = writes[-1]
        assert_durable(calls, final, tmp, folder)
        # The launch claim is on disk, its name in the folder, before the runner runs
        # anything of the job (its first write of the job file is `running`): synced by
        # the supervisor while the runner starts, and by the runner unless told so.
        records = _renames_to(calls, folder / p.RUN_FILE)
        assert 1 <= len(records) <= 2, records
        started, _ = writes[1]
        claim = [c for c in calls if c.name in FSYNCS and f"<{folder / p.RUN_FILE}>" in c.text
                 and c.text.rstrip().endswith("= 0")
                 and records[-1][0].end < c.start and c.end < started.start]
        assert claim, "the runner wrote `running` before the claim was fsync'd"
        named = [c for each in claim for c in _fsync_of(calls, str(folder), each.tid)
                 if each.end < c.start and c.end < started.start]
        assert named, "the runner wrote `running` before the claim's folder was fsync'd"
        if job_id == told.json()["id"]:
            assert len(records) == 1, "the claim did not name the child forked ahead"
            assert all(c.tid != started.tid for c in claim), "the runner synced it again"
    # Progress is written often and not fsync'd: only the creation and the final state.
    writes = _renames_to(calls, jobs / done.json()["id"] / p.JOB_FILE)
    synced_writes = [w for w in writes if _fsync_of(calls, w[1], w[0].tid)]
    assert len(writes) >= 4 and len(synced_writes) == 2, (len(writes), len(synced_writes))


def _traced_by(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    return 0


def test_a_job_in_place_whose_folder_sync_fails_is_answered_as_stored(
        strace: str, make_server: Any, tmp_path: Path) -> None:
    """The disk fails the fsync of the new job's folder (EIO, injected into the real API
    by strace): its file was in place and the supervisor rung, so it ran, yet the answer
    was a 503 that said it was not stored, and a client's retry ran it twice."""
    server = make_server()
    with server.client() as client:
        first = client.post("/api/jobs", json={"kind": "sleep", "input": {}}).json()
        _final(client, first["id"])  # started up: a submission's only fsyncs are its own
        assert server.proc is not None
        tracer = subprocess.Popen(  # the 2nd fsync: the job's folder, after its file's
            [strace, "-qq", "-f", "-p", str(server.proc.pid), "-e", "trace=fsync",
             "-e", "inject=fsync:error=EIO:when=2", "-o", str(tmp_path / "strace.txt")])
        try:
            wait_for(lambda: _traced_by(server.proc.pid) != 0, 30, 0.05, "strace to attach")
            answer = client.post("/api/jobs", json={"kind": "sleep", "input": {}})
        finally:
            tracer.terminate()
            tracer.wait(30)
        assert "EIO" in (tmp_path / "strace.txt").read_text(), "the fault was not injected"
        assert answer.status_code == 202, answer.text
        assert _final(client, answer.json()["id"])["state"] == "completed"
        assert len(client.get("/api/jobs").json()["jobs"]) == 2
    assert "could not be synced" in server.log.read_text()
