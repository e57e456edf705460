"""The `offload` command line as a user runs it: a subprocess (the installed console script
or `python -m jobs`) against a real server."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from jobs import protocol as p
from jobs.cli.follow import RECONNECT_S
from tests.conftest import ROOT, free_port, small_disk, wait_for, wait_job
from tests.fake_llm import FakeLLM
from tests.server import Server

if sys.platform == "win32":  # the servers' process groups and Ctrl-C by signal are POSIX's
    pytest.skip("POSIX signals", allow_module_level=True)

MakeServer = Callable[..., Server]
TOKEN = "a-token-of-more-than-16-characters"
# The console script pip installed beside this interpreter (`offload.exe` on Windows).
OFFLOAD = shutil.which("offload", path=str(Path(sys.executable).parent))
OWN_VARIABLES = ("OFFLOAD_URL", "OFFLOAD_API_TOKEN", "OFFLOAD_HOST", "OFFLOAD_PORT",
                 "OFFLOAD_ENV_FILE")  # the .env of the folder it runs in
REMOVED_SAID = "removed after it ended, before it was read"  # of a job gone unread


def cli_env(url: str | None, token: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in OWN_VARIABLES}
    # This checkout's `jobs`, not the one the environment installed (run from tests/).
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    if url is not None:
        env["OFFLOAD_URL"] = url
    if token is not None:
        env["OFFLOAD_API_TOKEN"] = token
    return env


def cli(url: str | None, *args: str, token: str | None = None, script: bool = False,
        stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`offload ARGS` run to its end, in a folder without a .env unless `cwd` has one."""
    if script:
        assert OFFLOAD is not None, "no `offload` script: run `python launch.py --reinstall`"
    command = [OFFLOAD] if script and OFFLOAD else [sys.executable, "-m", "jobs"]
    done = subprocess.run([*command, *args], env=cli_env(url, token), cwd=cwd or ROOT / "tests",
                          input=stdin, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def start_cli(url: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "jobs", *args], env=cli_env(url),
                            cwd=ROOT / "tests", stdout=subprocess.PIPE, stderr=subprocess.PIPE)


class Reader:
    """What a process has written to a pipe so far, read as it comes (not by line)."""

    def __init__(self, pipe: Any) -> None:
        self.chunks: list[bytes] = []
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe: Any) -> None:
        while chunk := os.read(pipe.fileno(), 4096):
            self.chunks.append(chunk)

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode()

    def done(self) -> str:
        self._thread.join(30)
        return self.text


@pytest.fixture
def server(make_server: MakeServer) -> Server:
    return make_server(env={"OFFLOAD_MAX_CONCURRENT": "4"})


def test_status_submit_wait_list_show_and_log(server: Server) -> None:
    url = server.url
    status = cli(url, "status", script=True)
    assert status.returncode == 0, status.stderr
    assert f"at {url}: ok" in status.stdout and "0 running of 4" in status.stdout
    health = json.loads(cli(url, "status", "--json").stdout)
    assert health["health"]["status"] == "ok" and health["counts"]["queued"] == 0
    assert cli(url).stdout.startswith("offload "), "no command: the status"

    done = cli(url, "submit", "sleep", "--input", '{"seconds": 0.2}', "--wait", script=True)
    assert done.returncode == 0, done.stderr
    assert "state:          completed" in done.stdout
    # Its id first: a Ctrl-C while it waits left a running job that no one could name.
    assert done.stderr.split()[1:3] == ["submitted;", "waiting"], done.stderr
    assert p.is_valid_id(done.stderr.split()[0])
    failed = cli(url, "submit", "probe", "--input", '{"fail": "bad luck"}', "--wait")
    assert failed.returncode == 1
    assert failed.stderr.strip().endswith("failed: bad luck")
    failed_job = json.loads(cli(url, "submit", "probe", "--input", '{"fail": "again"}', "--wait",
                                "--json").stdout)
    assert failed_job["state"] == "failed" and failed_job["error"]["message"] == "again"
    queued = cli(url, "submit", "sleep", "--timeout", "30", "--input", "-",
                 stdin='{"seconds": 0}')
    job_id = queued.stdout.strip()
    assert queued.returncode == 0 and p.is_valid_id(job_id), queued

    probes = json.loads(cli(url, "list", "--kind", "probe", "--json").stdout)
    assert [job["input"]["fail"] for job in probes] == ["again", "bad luck"], "newest first"
    assert len(json.loads(cli(url, "list", "--limit", "1", "--json").stdout)) == 1
    failures = cli(url, "list", "--state", "failed")
    assert failures.stdout.splitlines()[0].split() == ["ID", "KIND", "STATE", "CREATED", "(UTC)",
                                                       "TOOK", "NOTE"]
    assert len(failures.stdout.splitlines()) == 3 and "runner: bad luck" in failures.stdout
    assert cli(url, "list", "--kind", "train").stdout == "no jobs\n"
    # Any of several states or kinds (the server took the last one given, quietly).
    listed = json.loads(cli(url, "list", "--json").stdout)
    either = json.loads(cli(url, "list", "--state", "failed", "--state", "completed",
                            "--kind", "probe", "--kind", "sleep", "--json").stdout)
    assert [job["id"] for job in either] == [
        job["id"] for job in listed if job["state"] in ("failed", "completed")], either
    assert {job["state"] for job in either} == {"failed", "completed"}, either
    older = json.loads(cli(url, "list", "--before", probes[0]["id"][:8], "--json").stdout)
    assert older == listed[[job["id"] for job in listed].index(probes[0]["id"]) + 1:]
    # A table asks for the jobs without their input, output and result; --json, in full.
    asked = [line.split('"')[1] for line in server.log.read_text().splitlines()
             if '"GET /api/jobs?' in line]
    assert "GET /api/jobs?state=failed&fields=summary HTTP/1.1" in asked, asked
    assert "GET /api/jobs?state=running&limit=1000&fields=summary HTTP/1.1" in asked, asked
    assert "GET /api/jobs?kind=probe HTTP/1.1" in asked, asked
    assert "GET /api/jobs?state=running&limit=1000 HTTP/1.1" in asked, asked

    shown = json.loads(cli(url, "show", failed_job["id"], "--json").stdout)
    assert shown["id"] == failed_job["id"] and shown["input"] == {"fail": "again"}
    assert "error:          runner: again" in cli(url, "show", failed_job["id"]).stdout
    assert "error: again" in cli(url, "log", failed_job["id"]).stdout
    assert "error: again" in json.loads(cli(url, "log", failed_job["id"], "--json").stdout)["log"]
    for name in ("rerun", "restart"):  # retry, as the API and Pueue name it (exit 2 before)
        again = cli(url, name, failed_job["id"], "--json")
        assert again.returncode == 0, again
        assert json.loads(again.stdout)["rerun_of"] == failed_job["id"], again
    wait_for(lambda: json.loads(cli(url, "show", job_id, "--json").stdout)["state"]
             == "completed", 60, 0.2)
    # Groups of states, as cancel and remove take them (it was a usage error).
    later = cli(url, "submit", "sleep", "--delay", "1h").stdout.strip()  # as Pueue's --delay
    live = json.loads(cli(url, "list", "--state", "live", "--json").stdout)
    job = next(job for job in live if job["id"] == later)
    assert 3590 < p.parse_iso(job["run_at"]) - p.parse_iso(job["created_at"]) <= 3600, job
    finished = json.loads(cli(url, "list", "--state", "finished", "--json").stdout)
    assert later in [job["id"] for job in live] and {job["state"] for job in live} <= {
        "queued", "running"}, live
    assert failed_job["id"] in [job["id"] for job in finished], finished
    assert {job["state"] for job in finished} == {"completed", "failed"}, finished


def test_submit_several_jobs_in_one_request(server: Server, tmp_path: Path) -> None:
    """`--inputs FILE`: one input a line (as RQ's enqueue_many): the ids in the file's order,
    the same ones again with the same --key; --wait shows them all when they have ended."""
    url = server.url
    sweep = tmp_path / "sweep.jsonl"
    sweep.write_text('{"seconds": 0.3}\n\n{"seconds": 0}\n{"seconds": 0.1, "steps": 2}\n')
    submitted = cli(url, "submit", "sleep", "--inputs", str(sweep), "--key", "sweep-1",
                    "--priority", "5")
    assert submitted.returncode == 0, submitted
    ids = submitted.stdout.split()
    assert len(ids) == 3 and all(p.is_valid_id(each) for each in ids)
    jobs = [json.loads(cli(url, "show", each, "--json").stdout) for each in ids]
    assert [(job["input"]["seconds"], job["priority"]) for job in jobs] == [(0.3, 5), (0, 5),
                                                                            (0.1, 5)]
    again = cli(url, "submit", "sleep", "--inputs", str(sweep), "--key", "sweep-1",
                "--priority", "5", "--wait")
    assert again.returncode == 0, again
    assert again.stderr.startswith(f"3 jobs submitted ({' '.join(ids)}); waiting for them")
    assert [line.split()[:3] for line in again.stdout.splitlines()[1:]] == [
        [each, "sleep", "completed"] for each in ids]
    mixed = cli(url, "submit", "probe", "--inputs", "-", "--wait", "--json",
                stdin='{"seconds": 0}\n{"fail": "bad luck"}\n')
    assert mixed.returncode == 1 and mixed.stderr.strip().endswith("failed: bad luck"), mixed
    assert [job["state"] for job in json.loads(mixed.stdout)] == ["completed", "failed"]
    kept = len(json.loads(cli(url, "list", "--json").stdout))
    for given, said in (('{"seconds": 0}\n[1]\n', "line 2 of stdin is no JSON object"),
                        ('{"seconds": 0}\n\n{"seconds": -1}\n',
                         "line 3 of stdin: invalid input for a 'sleep' job"),
                        ('{"seconds": 0}\n{"seconds": 0, "steps": "x"}\n',
                         "line 2 of stdin: invalid input for a 'sleep' job: input.steps"),
                        ("\n", "--inputs stdin holds no input")):
        refused = cli(url, "submit", "sleep", "--inputs", "-", stdin=given)
        assert refused.returncode == 2 and said in refused.stderr, refused
    assert len(json.loads(cli(url, "list", "--json").stdout)) == kept, "none was stored"
    # An option's error is the option's, said once, not each line's.
    options = cli(url, "submit", "sleep", "--inputs", str(sweep), "--priority", "99999")
    assert options.returncode == 2 and options.stderr == (
        "offload: invalid request: --priority: Input should be less than or equal to 1000\n")
    # A BOM (as Notepad writes) is no input; U+2028 in a string ends no line.
    sweep.write_text('\ufeff{"seconds": 0}\n{"seconds": 0, "note": "a\u2028b"}\n',
                     encoding="utf-8")
    odd = cli(url, "submit", "probe", "--inputs", str(sweep), "--json")
    assert odd.returncode == 0, odd
    assert [job["input"] for job in json.loads(odd.stdout)] == [
        {"seconds": 0}, {"seconds": 0, "note": "a\u2028b"}]


def test_a_batch_the_disk_fills_partway_prints_what_was_stored_and_how_to_go_on(
        make_server: MakeServer, tmp_path: Path) -> None:
    """The ids stored before the line that failed, and the key that stores the rest once
    the disk has room: without --key, the one the command made (sent again without it,
    the first jobs would be stored twice)."""
    sweep = tmp_path / "sweep.jsonl"
    sweep.write_text("".join(json.dumps({"fail": str(n) * 150_000}) + "\n" for n in range(6)))
    refused = cli(free_url(), "submit", "probe", "--inputs", str(sweep))
    assert refused.returncode == 3 and "cannot reach Offload at" in refused.stderr
    assert "--key" not in refused.stderr, "a batch never sent: nothing may be stored"
    with small_disk(tmp_path, "512k") as disk:
        server = make_server(env={"OFFLOAD_DATA_DIR": str(disk / "var")})
        assert cli(server.url, "pause").returncode == 0
        full = cli(server.url, "submit", "probe", "--inputs", str(sweep))
        assert full.returncode == 7, full
        stored = full.stdout.split()
        assert stored and all(p.is_valid_id(each) for each in stored), full
        said, key = full.stderr.rsplit("--key ", 1)
        assert said.startswith(f"offload: line {len(stored) + 1} of {sweep}: cannot store "), said
        assert said.endswith(f"The {len(stored)} before it were stored (their ids above): once "
                             "it can be, run the same command again with "), said
        assert key.split(maxsplit=1)[1] == "to store the rest.\n", key
        again = cli(server.url, "submit", "probe", "--inputs", str(sweep), "--key",
                    key.split()[0])  # the disk still full: no job stored twice
        assert again.returncode == 7 and again.stdout.split() == stored, again
        assert len(list((disk / "var" / "jobs").iterdir())) == len(stored)


def free_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def test_log_follow_prints_a_chat_reply_as_it_streams(make_server: MakeServer) -> None:
    with FakeLLM(pieces=["The ", "CPU ", "is ", "fine."], gated="gated") as llm:
        server = make_server(env={"OPENAI_BASE_URL": llm.base_url})
        try:
            body = json.dumps({"messages": [{"role": "user", "content": "gated question"}]})
            job_id = cli(server.url, "submit", "chat", "--input", body).stdout.strip()
            with start_cli(server.url, "log", job_id, "--follow") as follower:
                out, err = Reader(follower.stdout), Reader(follower.stderr)
                # The first piece is printed while the model holds back the rest.
                wait_for(lambda: out.text == "The ", 60, 0.05, "the reply's first piece")
                shown = json.loads(cli(server.url, "show", job_id, "--json").stdout)
                assert shown["state"] == "running"
                llm.gate.set()
                assert follower.wait(60) == 0
                assert out.done() == "The CPU is fine.\n" and err.done() == ""

            events = cli(server.url, "log", job_id, "--follow", "--json")
            fields = [json.loads(line) for line in events.stdout.splitlines()]
            assert events.returncode == 0
            assert fields[0]["output"] == "The CPU is fine." and fields[-1]["state"] == "completed"
        finally:
            llm.gate.set()


def test_log_follow_marks_where_a_retry_starts_its_output_again(
        make_server: MakeServer) -> None:
    """Each attempt's stream is cut after two pieces: both partial replies are printed,
    each on its own line, with the retry said on stderr, and the job's failure at the end."""
    with FakeLLM(pieces=["The ", "CPU ", "is ", "fine."], cut_after=2, delay_s=1.0) as llm:
        server = make_server(env={"OPENAI_BASE_URL": llm.base_url,
                                  "OFFLOAD_RETRY_BASE_S": "0.5"})
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
        job_id = cli(server.url, "submit", "chat", "--input", body).stdout.strip()
        followed = cli(server.url, "log", job_id, "--follow")
    assert followed.returncode == 1, followed.stderr
    attempts = [line for line in followed.stdout.splitlines() if line]
    assert attempts[-2:] == ["The CPU ", "The CPU "], followed.stdout
    assert "attempt 2 of 2]" in followed.stderr and f"job {job_id} failed" in followed.stderr
    shown = cli(server.url, "show", job_id).stdout
    assert "attempt 1:" in shown, shown


def test_a_retry_waiting_its_turn_says_when_it_starts_not_a_count_down_of_its_start(
        make_server: MakeServer) -> None:
    """`list` showed "retrying in 600 s" for the ten minutes of the wait: the line the
    supervisor wrote when it queued the retry. It says the retry's start now, and why."""
    server = make_server(env={"OFFLOAD_RETRY_BASE_S": "600", "OFFLOAD_RETRY_MAX_S": "600"})
    job_id = cli(server.url, "submit", "probe", "--input", '{"exit_code": 9}',
                 "--max-attempts", "2").stdout.strip()
    with server.client() as client:
        wait_for(lambda: client.get(f"/api/jobs/{job_id}").json()["attempt"] == 2, 60, 0.1,
                 "the retry queued")
        run_at = client.get(f"/api/jobs/{job_id}").json()["run_at"][:19].replace("T", " ")
    listed = cli(server.url, "list").stdout
    line = next(line for line in listed.splitlines() if line.startswith(job_id[:8]))
    assert f"retrying: starts {run_at} UTC (after " in line, listed
    assert "retrying in" not in listed, listed
    shown = cli(server.url, "show", job_id).stdout
    assert "retrying in" not in shown and f"run at:         {run_at} UTC" in shown, shown
    assert "attempt 1:" in shown, shown


def test_log_follow_resumes_across_an_api_restart(make_server: MakeServer, data_dir: Path,
                                                  tmp_path: Path) -> None:
    """The stream drops with the API; the follower comes back with Last-Event-ID and
    prints the rest of the reply, and nothing twice."""
    with FakeLLM(pieces=["The ", "CPU ", "is ", "fine."], gated="gated") as llm:
        env = {"OPENAI_BASE_URL": llm.base_url}
        first = make_server(env=env)
        second = Server(data_dir, tmp_path / "second.log", env)
        second.port, second.url = first.port, first.url
        try:
            body = json.dumps({"messages": [{"role": "user", "content": "gated question"}]})
            job_id = cli(first.url, "submit", "chat", "--input", body).stdout.strip()
            with start_cli(first.url, "log", job_id, "--follow") as follower:
                out = Reader(follower.stdout)
                wait_for(lambda: out.text == "The ", 60, 0.05, "the reply's first piece")
                first.stop(signal.SIGKILL)  # at once: an open stream delays a graceful stop
                second.start()
                llm.gate.set()
                assert follower.wait(90) == 0
                assert out.done() == "The CPU is fine.\n"
        finally:
            llm.gate.set()
            second.stop()


class StartedAsUsersDo(Server):
    """The API as `python api_entry.py` starts it: a stop gives requests 5 s."""

    def command(self) -> list[str]:
        return [sys.executable, str(ROOT / "api_entry.py"), "--port", str(self.port)]


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_wait_goes_on_across_an_api_restart(data_dir: Path, tmp_path: Path,
                                              stop: signal.Signals) -> None:
    """A SIGTERM, or a closed terminal's SIGHUP, stops the API with a long poll and an
    event stream open: as the stop begins, the wait is answered 503, the server is
    stopping, and the stream ends (they held the stop for its 5 s grace, then were
    cancelled: an error and a traceback in the log, and a 500 that made the CLI give up;
    a SIGHUP cut them on the spot); `offload wait` and `offload log --follow` go on with
    the restarted server until the job ends."""
    # Room for the follower's stream and the waiter's long poll only: once both are held,
    # a HEAD of the job's events (which takes no room) is refused.
    env = {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "OFFLOAD_MAX_EVENT_STREAMS": "2"}
    first = StartedAsUsersDo(data_dir, tmp_path / "first.log", env).start()
    second = StartedAsUsersDo(data_dir, tmp_path / "second.log", env)
    second.port, second.url = first.port, first.url
    try:
        job_id = cli(first.url, "submit", "sleep",
                     "--input", '{"seconds": 20, "steps": 20}').stdout.strip()
        with start_cli(first.url, "wait", job_id) as waiter, \
                start_cli(first.url, "log", job_id, "--follow") as follower:
            out, err = Reader(waiter.stdout), Reader(waiter.stderr)
            progress = Reader(follower.stderr)
            wait_for(lambda: "step 1/20]" in progress.text, 60, 0.05, "a progress line")
            # Started beside the follower, the waiter may not have asked yet on a busy host.
            wait_for(lambda: httpx.head(f"{first.url}/api/jobs/{job_id}/events", timeout=30)
                     .status_code == 503, 60, 0.1, "the waiter's long poll under way")
            first.stop(stop)
            log = first.log.read_text()
            assert f"GET /api/jobs/{job_id}?wait_s=25 HTTP/1.1\" 503" in log, log[-2000:]
            assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
            second.start()
            assert waiter.wait(90) == 0, err.done()
            assert "completed" in out.done(), out.text
            assert follower.wait(30) == 0, progress.done()
            assert "step 20/20]" in progress.done(), progress.text
    finally:
        first.stop()
        second.stop()


def test_a_wait_gives_up_a_minute_after_the_api_stopped_not_two(data_dir: Path,
                                                                  tmp_path: Path) -> None:
    """Its long poll answered 503 as the API stops, `offload wait` followed the job's
    reads, which rode out a minute without an answer; then the wait rode out a minute
    of its own: exit 3 two minutes after the stop, where a minute was said."""
    # Room for the waiter's long poll only: once it is held, a HEAD of the job's events
    # (which takes no room) is refused.
    env = {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "OFFLOAD_MAX_EVENT_STREAMS": "1"}
    api = StartedAsUsersDo(data_dir, tmp_path / "api.log", env).start()
    job_id = cli(api.url, "submit", "sleep", "--input", '{"seconds": 300}').stdout.strip()
    try:
        with start_cli(api.url, "wait", job_id) as waiter:
            err = Reader(waiter.stderr)
            wait_for(lambda: httpx.head(f"{api.url}/api/jobs/{job_id}/events", timeout=30)
                     .status_code == 503, 60, 0.1, "the waiter's long poll under way")
            api.stop()
            assert f"GET /api/jobs/{job_id}?wait_s=25 HTTP/1.1\" 503" in api.log.read_text()
            stopped = time.monotonic()
            try:
                assert waiter.wait(RECONNECT_S + 40) == 3, err.done()
            finally:
                waiter.kill()
            # A minute ridden out, not less (nor two: the wait above would have ended it).
            assert time.monotonic() - stopped >= RECONNECT_S - 5
            assert err.done().startswith("offload: cannot reach Offload at"), err.text
    finally:
        api.start()  # its runner goes on without the API: stopped with it
        cli(api.url, "cancel", job_id)
        api.stop()


def test_a_second_ctrl_c_stops_the_api_without_a_traceback(data_dir: Path,
                                                           tmp_path: Path) -> None:
    """Ctrl+C twice: uvicorn stops at once, without the app's shutdown, and the app's
    lifespan, cancelled at the end, was logged as an ERROR with a traceback."""
    api = StartedAsUsersDo(data_dir, tmp_path / "api.log",
                           {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}).start()
    try:
        assert api.proc is not None
        api.proc.send_signal(signal.SIGINT)
        time.sleep(0.05)  # within the stop's first 0.1 s, before the app's shutdown
        api.proc.send_signal(signal.SIGINT)
        assert api.proc.wait(30) == 0
        log = api.log.read_text()
        assert "Shutting down" in log and "Application shutdown complete" not in log, log
        assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
    finally:
        api.stop()


def test_log_follow_shows_progress_and_ctrl_c_exits_130(server: Server) -> None:
    job_id = cli(server.url, "submit", "sleep", "--input",
                 '{"seconds": 120, "steps": 120}').stdout.strip()
    with start_cli(server.url, "log", job_id, "--follow") as follower:
        err = Reader(follower.stderr)
        wait_for(lambda: "step 1/120]" in err.text, 60, 0.05, "a progress line")
        follower.send_signal(signal.SIGINT)
        assert follower.wait(30) == 130
        assert err.done().startswith("[") and "Traceback" not in err.text
    assert cli(server.url, "cancel", job_id).returncode == 0


def test_ctrl_c_while_a_cancel_waits_exits_130_at_once(make_server: MakeServer,
                                                      data_dir: Path) -> None:
    # Its requests ran in a pool, whose threads Python waits for at exit: Ctrl-C ended the
    # command only once the server's wait for the runner did (the stop's grace, then 10 s).
    server = make_server(env={"OFFLOAD_STOP_GRACE_S": "60"})
    job_id = cli(server.url, "submit", "probe", "--input",
                 '{"ignore_sigterm": true, "seconds": 300}').stdout.strip()
    with server.client() as client:
        wait_job(client, job_id, "running")
    with start_cli(server.url, "cancel", job_id) as canceller:
        err = Reader(canceller.stderr)
        wait_for(lambda: (data_dir / "jobs" / job_id / p.STOP_FILE).exists(), 30, 0.05,
                 "the stop asked")
        canceller.send_signal(signal.SIGINT)
        asked = time.monotonic()
        assert canceller.wait(30) == 130
        assert time.monotonic() - asked < 20, "ended with the server's wait, not at Ctrl-C"
        assert "Traceback" not in err.done()


def test_a_wait_is_a_request_the_server_answers_when_the_job_ends(server: Server) -> None:
    """`offload wait` and `--wait` long-poll (`GET /api/jobs/{id}?wait_s=`): a request or
    two a job, neither its output streamed nor a read every half second."""
    url = server.url
    first = cli(url, "submit", "sleep", "--input", '{"seconds": 2}').stdout.strip()
    assert cli(url, "wait", first).returncode == 0
    submitted = cli(url, "submit", "sleep", "--input", '{"seconds": 2}', "--wait")
    assert submitted.returncode == 0 and "completed" in submitted.stdout, submitted
    second = submitted.stderr.split()[0]
    log = server.log.read_text().splitlines()
    for job_id in (first, second):
        asked = [line for line in log if f"GET /api/jobs/{job_id}" in line]
        assert any("?wait_s=" in line for line in asked), asked
        assert len(asked) <= 3 and not any("/events" in line for line in asked), asked


def test_a_wait_reads_the_job_when_every_event_stream_is_taken(make_server: MakeServer) -> None:
    # It exited 7 with the server's "too many open event streams; poll instead".
    server = make_server(env={"OFFLOAD_MAX_EVENT_STREAMS": "1"})
    url = server.url
    slow = cli(url, "submit", "sleep", "--input", '{"seconds": 60}').stdout.strip()
    held = threading.Event()

    def hold() -> None:
        with contextlib.suppress(httpx.HTTPError), \
                httpx.stream("GET", f"{url}/api/jobs/{slow}/events", timeout=90) as stream:
            for _ in stream.iter_lines():
                held.set()

    threading.Thread(target=hold, daemon=True).start()
    assert held.wait(30)
    job = cli(url, "submit", "probe", "--input", '{"emit": 200000}').stdout.strip()
    assert httpx.get(f"{url}/api/jobs/{job}/events").status_code == 503
    waited = cli(url, "wait", job)
    assert waited.returncode == 0, waited
    assert waited.stdout.splitlines()[1].split()[1:3] == ["probe", "completed"], waited
    followed = cli(url, "log", job, "--follow")
    assert (followed.returncode, followed.stdout) == (0, "0123456789" * 20_000 + "\n"), followed
    submitted = cli(url, "submit", "sleep", "--input", '{"seconds": 1, "steps": 3}', "--wait")
    assert submitted.returncode == 0 and "completed" in submitted.stdout, submitted
    cli(url, "cancel", slow)


def test_a_job_its_kinds_cap_holds_back_says_so(make_server: MakeServer) -> None:
    # Its queue position is null then: `list` and `show` said nothing, as if it were stuck.
    url = make_server(env={"OFFLOAD_KIND_CAPS": "sleep=1"}).url
    running = cli(url, "submit", "sleep", "--input", '{"seconds": 120}').stdout.strip()
    held = cli(url, "submit", "sleep", "--input", '{"seconds": 0}').stdout.strip()
    wait_for(lambda: json.loads(cli(url, "show", running, "--json").stdout)["state"]
             == "running", 30, 0.1, "the first job to run")
    listed = cli(url, "list").stdout.splitlines()
    assert [" ".join(line.split()[6:]) for line in listed if line.startswith(held)] == [
        "held: kind sleep at its cap 1"], listed
    details = [" ".join(line.split()) for line in cli(url, "show", held).stdout.splitlines()]
    assert "held: kind sleep at its cap 1 (starts when one of them ends; offload parallel N " \
           "--kind sleep)" in details, details
    waiter = start_cli(url, "wait", held)  # as `--wait` on a paused queue, said: not stuck
    waiter_said = Reader(waiter.stderr)
    wait_for(lambda: f"job {held} is held: kind sleep at its cap 1" in waiter_said.text, 30,
             0.1, "the hold said by wait")
    # A cap set while running holds so too; raised, the job starts and says no more of it.
    assert cli(url, "parallel", "1", "--kind", "chat").returncode == 0
    chats = [cli(url, "submit", "chat", "--input", json.dumps(
        {"messages": [{"role": "user", "content": "Hi"}]})).stdout.strip() for _ in range(2)]
    notes = {line.split()[0]: " ".join(line.split()[6:])
             for line in cli(url, "list", "--kind", "chat").stdout.splitlines()[1:]}
    assert any(note.startswith("held: kind chat") for note in notes.values()), notes
    cli(url, "cancel", *chats)
    assert cli(url, "parallel", "2", "--kind", "sleep").returncode == 0
    with waiter:
        assert waiter.wait(60) == 0, waiter_said.done()
    assert "held" not in cli(url, "show", held).stdout
    cli(url, "cancel", running)


def test_a_chat_cap_below_the_models_slots_is_the_one_said(make_server: MakeServer) -> None:
    # `offload parallel 1 --kind chat` said "chat at once: at most 4, the embedded model's
    # slots ...; more wait queued" and then "chat at once: 1": two caps, the first not holding.
    url = make_server(env={"OFFLOAD_MAX_CONCURRENT": "8"}).url
    slots = httpx.get(f"{url}/api/queue").json()["model_slots"]
    if slots < 2:
        pytest.skip("llama-cpp-python's server runs one chat at a time: no cap below it")
    chat_set = "chat at once: {} (set while running, kept across restarts; without it, no " \
               "cap of its own)"
    lowered = cli(url, "parallel", "1", "--kind", "chat")
    assert (lowered.returncode, lowered.stdout) == (0, "runners at once: 8 "
            f"(OFFLOAD_MAX_CONCURRENT)\n{chat_set.format(1)}\ntrain at once: 1 "
            "(OFFLOAD_KIND_CAPS)\n"), lowered
    status = [" ".join(line.split()) for line in cli(url, "status").stdout.splitlines()]
    assert [line for line in status if line.startswith("chat at")] == [chat_set.format(1)]
    # Above the slots, they hold the chats back again, and say so.
    raised = cli(url, "parallel", str(slots + 1), "--kind", "chat").stdout.splitlines()
    assert [line.split(",")[0] for line in raised if line.startswith("chat at")] == [
        f"chat at once: at most {slots}", chat_set.format(slots + 1).split(",")[0]], raised


def test_why_a_queued_job_waits_is_the_servers_word(make_server: MakeServer) -> None:
    # The CLI guessed it from a null queue position: a job whose dependency had completed,
    # held by its kind's cap, read "after <that job>"; the second of two jobs of a kind
    # capped at 1, with none running, read "at its cap".
    server = make_server(env={"OFFLOAD_KIND_CAPS": "sleep=1"})
    url = server.url

    def notes() -> dict[str, str]:
        return {line.split()[0]: " ".join(line.split()[6:])
                for line in cli(url, "list", "--state", "queued").stdout.splitlines()[1:]}

    assert cli(url, "pause").returncode == 0
    first, second = (cli(url, "submit", "sleep", "--input", '{"seconds": 120}').stdout.strip()
                     for _ in range(2))
    assert notes() == {first: "0 ahead in the queue",
                       second: "held: kind sleep's cap 1 (1 queued before it)"}
    # `list` said so of a paused queue, `show` not.
    assert cli(url, "show", first).stderr == ("the queue is paused: it starts once resumed "
                                              "(offload resume)\n")
    summary = httpx.get(f"{url}/api/jobs", params={"fields": "summary"}).json()["jobs"]
    assert {job["id"]: job["waits_for"] for job in summary} == {
        first: {"reason": "queue_position", "jobs": None, "kind_cap": None, "model_slots": None,
                "running": None},
        second: {"reason": "kind_cap", "jobs": None, "kind_cap": 1, "model_slots": None,
                 "running": 0}}
    assert cli(url, "resume").returncode == 0
    wait_for(lambda: httpx.get(f"{url}/api/jobs/{first}").json()["state"] == "running", 30, 0.1,
             "the first job to run")
    done = json.loads(cli(url, "submit", "probe", "--wait", "--json").stdout)["id"]
    capped = cli(url, "submit", "sleep", "--after", done, "--input", '{"seconds": 0}').stdout
    waiting = cli(url, "submit", "sleep", "--after", f"{done},{first}").stdout.strip()
    capped = capped.strip()
    wait_for(lambda: notes().get(capped) == "held: kind sleep at its cap 1", 30, 0.1,
             f"the hold said: {notes()}")
    assert notes()[waiting] == f"after {first[:8]}"  # the one not ended, of the two
    shown = [" ".join(line.split()) for line in cli(url, "show", waiting).stdout.splitlines()]
    assert f"waits for: {first}" in shown, shown
    assert "held: kind sleep at its cap 1 (starts when one of them ends; offload parallel N " \
           "--kind sleep)" in [" ".join(line.split())
                               for line in cli(url, "show", capped).stdout.splitlines()]
    job = httpx.get(f"{url}/api/jobs/{waiting}").json()
    assert job["waits_for"]["reason"] == "depends_on" and job["waits_for"]["jobs"] == [first]
    cli(url, "cancel", first, second, capped, waiting)


def test_wait_without_ids_waits_for_every_job_queued_or_running(server: Server) -> None:
    # As Pueue's `wait`; it was a usage error.
    url = server.url
    nothing = cli(url, "wait")
    assert (nothing.returncode, nothing.stdout, nothing.stderr) == (
        0, "", "no queued or running jobs: nothing to wait for\n"), nothing
    assert json.loads(cli(url, "wait", "--json").stdout) == []
    ended = json.loads(cli(url, "submit", "sleep", "--wait", "--json").stdout)["id"]
    # Long enough to be queued or running still once `wait` lists, on a slow machine.
    running = cli(url, "submit", "sleep", "--input", '{"seconds": 8}').stdout.strip()
    later = cli(url, "submit", "sleep", "--delay", "8").stdout.strip()
    stopped = cli(url, "submit", "sleep", "--input", '{"seconds": 60}', "--timeout",
                  "8").stdout.strip()
    waited = cli(url, "wait", "--json")
    assert waited.returncode == 1, waited  # one did not complete
    assert [(job["id"], job["state"]) for job in json.loads(waited.stdout)] == [
        (running, "completed"), (later, "completed"), (stopped, "timeout")], waited
    assert f"job {stopped} timeout" in waited.stderr and ended not in waited.stdout
    assert f"job {later} starts" in waited.stderr  # why it waits, said as for ids


def test_wait_without_ids_rides_out_a_restart_of_the_server(server: Server) -> None:
    # Its listings were plain requests: the API restarting between two of its rounds (or
    # before its first) ended it with exit 3, where a wait for ids rides one out.
    server.stop()
    waiting = start_cli(server.url, "wait", "--json")
    try:
        time.sleep(3)  # its first listings refused
        assert waiting.poll() is None, waiting.communicate()
        server.start()
        out, err = waiting.communicate(timeout=120)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 0, err
    assert json.loads(out) == []


@pytest.mark.slow
def test_wait_without_ids_asks_a_few_times_however_many_jobs_wait(server: Server) -> None:
    # It asked for each job, then waited for each in turn: 2 requests a job, 400 here.
    with server.client() as client:
        assert client.post("/api/queue/pause").status_code == 200
        stored = client.post("/api/jobs/batch", json={"jobs": [
            {"kind": "sleep", "input": {"seconds": 0}}] * 200}, timeout=60)
        assert stored.status_code == 202, stored.text
        ids = [job["id"] for job in stored.json()["jobs"]]
        asked_before = server.log.read_text().count('"GET /api/')
        waiting = start_cli(server.url, "wait", "--json")
        try:
            # Once it has listed them, it asks whether the queue is paused.
            wait_for(lambda: '"GET /api/queue ' in server.log.read_text(), 60, 0.1,
                     "the wait to list the jobs")
            assert client.post("/api/queue/resume").status_code == 200
            out, err = waiting.communicate(timeout=300)
        finally:
            if waiting.poll() is None:
                waiting.kill()
    asked = server.log.read_text().count('"GET /api/') - asked_before
    assert waiting.returncode == 0, err
    assert sorted((job["id"], job["state"]) for job in json.loads(out)) == sorted(
        (job_id, "completed") for job_id in ids)
    assert asked <= 40, f"{asked} requests to wait for 200 jobs"


@contextlib.contextmanager
def relay_to(url: str, before_get: Callable[[str], None] = lambda path: None,
             before_delete: Callable[[str], None] = lambda path: None) -> Iterator[str]:
    """The address of a proxy that passes each request on to `url`, after
    `before_get(path)` for a GET (`before_delete` for a DELETE): what another user does
    at that very moment, or a slow network."""
    from http.server import ThreadingHTTPServer

    from tests.http_fake import JSONHandler, ScriptedServer

    class Relay(JSONHandler):
        def do_GET(self) -> None:
            before_get(self.path)
            self._pass("GET")

        def do_POST(self) -> None:
            self._pass("POST")

        def do_DELETE(self) -> None:
            before_delete(self.path)
            self._pass("DELETE")

        def _pass(self, method: str) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            answer = httpx.request(method, f"{url}{self.path}", content=body or None,
                                   headers={"Content-Type": "application/json"}, timeout=120)
            self._json(answer.status_code, answer.content)

    with ScriptedServer(ThreadingHTTPServer(("127.0.0.1", 0), Relay)) as relay:
        yield f"http://127.0.0.1:{relay.port}"


def removing_a_cursor(url: str) -> tuple[Callable[[str], None], list[str]]:
    """For `relay_to`: the job a listing's page is asked from, removed just before, once,
    as another user's `offload rm` would be; and the ids it removed."""
    from urllib.parse import parse_qs, urlsplit

    removed: list[str] = []

    def before_get(path: str) -> None:
        before = parse_qs(urlsplit(path).query).get("before")
        if urlsplit(path).path == "/api/jobs" and before and not removed:
            removed.append(before[0])
            assert httpx.post(f"{url}/api/jobs/{before[0]}/remove").status_code == 200

    return before_get, removed


def test_wait_without_ids_reads_past_a_removed_cursor_and_no_other_job_in_full(
        make_server: MakeServer, data_dir: Path) -> None:
    # The job a listing's page ended at, removed (or pruned) before the next page was asked
    # for, made that page a 400: the wait ended with it, exit 2, though nothing was wrong.
    # And --json read every job listed before those it waited for in full, 1000 here.
    from jobs.protocol.control import set_queue_paused
    from jobs.store.job_store import JobStore

    store, ended = JobStore(data_dir / "jobs"), {p.F_STATE: "completed",
                                                 p.F_STARTED_AT: p.iso(time.time()),
                                                 p.F_FINISHED_AT: p.iso(time.time())}
    oldest = store.create("sleep", {"seconds": 0}, 30)["id"]  # on the listing's second page
    set_queue_paused(data_dir, True)
    for _ in range(1000):
        store.create("sleep", {"seconds": 0}, 30, fields=ended)
    server = make_server()
    newest = cli(server.url, "submit", "sleep").stdout.strip()
    before_get, removed = removing_a_cursor(server.url)

    with relay_to(server.url, before_get) as relayed:
        waiting = start_cli(relayed, "wait", "--json")
        try:
            wait_for(lambda: '"GET /api/queue ' in server.log.read_text(), 60, 0.1,
                     "the wait to list the jobs")
            assert httpx.post(f"{server.url}/api/queue/resume").status_code == 200
            out, err = waiting.communicate(timeout=120)
        finally:
            if waiting.poll() is None:
                waiting.kill()
    assert removed, "no second page was asked for"
    assert waiting.returncode == 0, err
    assert [(job["id"], job["state"]) for job in json.loads(out)] == [
        (oldest, "completed"), (newest, "completed")]
    assert json.loads(out)[0]["input"] == {"seconds": 0}  # in full, as `show --json` gives it
    in_full = [line for line in server.log.read_text().splitlines()
               if '"GET /api/jobs?' in line and "fields=summary" not in line]
    assert in_full and all("limit=1&" in line for line in in_full), in_full


@pytest.mark.parametrize("how", ["table", "json"])
def test_list_all_reads_past_a_removed_cursor(make_server: MakeServer, data_dir: Path,
                                              how: str) -> None:
    # The job a page of `list --all` ended at, removed (or pruned) before the next page
    # was asked for, ended the listing with exit 7, "the listing changed as it was read:
    # run it again", though nothing was wrong.
    from jobs.store.job_store import JobStore

    store, ended = JobStore(data_dir / "jobs"), {p.F_STATE: "completed",
                                                 p.F_STARTED_AT: p.iso(time.time()),
                                                 p.F_FINISHED_AT: p.iso(time.time())}
    made = [store.create("sleep", {"seconds": 0}, 30, fields=ended)["id"] for _ in range(1200)]
    server = make_server()
    before_get, removed = removing_a_cursor(server.url)

    with relay_to(server.url, before_get) as relayed:
        listed = cli(relayed, "list", "--all", *(["--json"] if how == "json" else []))
    assert removed, "no second page was asked for"
    assert listed.returncode == 0 and listed.stderr == "", listed.stderr
    ids = ([job["id"] for job in json.loads(listed.stdout)] if how == "json"
           else [line.split()[0] for line in listed.stdout.splitlines()[1:]])
    # Each once; the removed one as its first page had it.
    assert len(ids) == len(set(ids)) and set(ids) == set(made), (len(ids), len(set(ids)))


@pytest.mark.parametrize("how", ["ids", "no ids", "json"])
def test_wait_shows_a_job_removed_after_it_ended_in_its_row_and_the_others(
        server: Server, how: str) -> None:
    # A job that ended while the wait long-polled another, removed before it was read,
    # ended the wait with exit 5, "no job with id ...", and no table of the others.
    url = server.url
    assert httpx.post(f"{url}/api/queue/pause").status_code == 200
    short = cli(url, "submit", "sleep", "--input", '{"seconds": 0}').stdout.strip()
    long = cli(url, "submit", "sleep", "--input", '{"seconds": 60}').stdout.strip()
    removed: list[str] = []

    def before_get(path: str) -> None:
        """At the long job's long poll: the short one run to its end and removed, as
        another user's `offload rm` would, then the long one cancelled."""
        if path.startswith(f"/api/jobs/{long}?wait_s=") and not removed:
            removed.append(short)
            with httpx.Client(base_url=url, timeout=30) as client:
                assert client.post("/api/queue/resume").status_code == 200
                wait_job(client, short)
                assert client.post(f"/api/jobs/{short}/remove").status_code == 200
                assert client.delete(f"/api/jobs/{long}").status_code == 200

    with relay_to(url, before_get) as relayed:
        waited = cli(relayed, "wait", *{"ids": [long, short], "json": ["--json"]}.get(how, []))
    assert removed, "the long job was not long-polled"
    assert waited.returncode == 5, waited  # the exit code of a job that is not there
    assert (f"offload: job {short} was removed after it ended, before it was read: how it "
            "ended is unknown\n") in waited.stderr, waited.stderr
    if how == "json":
        jobs = json.loads(waited.stdout)
        assert [(job["id"], job["state"]) for job in jobs] == [
            (short, None), (long, "cancelled")], jobs
        assert jobs[0] == {"id": short, "state": None, "removed": True}
        return
    rows = {line.split()[0]: " ".join(line.split()[1:])
            for line in waited.stdout.splitlines()[1:]}
    assert rows.keys() == {long, short}, waited.stdout
    assert rows[short] == "- unknown - - removed after it ended, before it was read", rows
    assert rows[long].startswith("sleep cancelled "), rows


@pytest.mark.parametrize("how", ["submit", "retry", "submit --json"])
def test_submit_and_retry_wait_say_a_job_removed_after_it_ended(server: Server,
                                                                 how: str) -> None:
    # `submit --wait` and `retry --wait` of a job that ended and was removed before they
    # read its end said "no job with id ...", not what `offload wait` says of it.
    url = server.url
    assert httpx.post(f"{url}/api/queue/pause").status_code == 200
    earlier = httpx.post(f"{url}/api/jobs", json={"kind": "sleep", "input": {"seconds": 0}})
    removed: list[str] = []

    def before_get(path: str) -> None:
        """At the job's long poll: the job run to its end and removed, as another user's
        `offload rm` would."""
        job_id = path.partition("?wait_s=")[0].removeprefix("/api/jobs/")
        if "?wait_s=" in path and job_id != earlier.json()["id"] and not removed:
            removed.append(job_id)
            with httpx.Client(base_url=url, timeout=30) as client:
                assert client.post("/api/queue/resume").status_code == 200
                wait_job(client, job_id)
                assert client.post(f"/api/jobs/{job_id}/remove").status_code == 200
                assert client.post("/api/queue/pause").status_code == 200

    if how == "retry":  # of the earlier job, once it has ended
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.post("/api/queue/resume").status_code == 200
            wait_job(client, earlier.json()["id"])
            assert client.post("/api/queue/pause").status_code == 200
    command = (["retry", earlier.json()["id"]] if how == "retry"
               else ["submit", "sleep", "--input", '{"seconds": 0}'])
    with relay_to(url, before_get) as relayed:
        waited = cli(relayed, *command, "--wait", *how.split()[1:])
    assert removed, "the job was not long-polled"
    assert waited.returncode == 5, waited  # as `offload wait` exits for it
    assert waited.stderr.endswith(f"offload: job {removed[0]} was {REMOVED_SAID}: how it "
                                  "ended is unknown\n"), waited
    if how == "submit --json":
        assert json.loads(waited.stdout) == {"id": removed[0], "state": None, "removed": True}
    else:  # its row, as `offload wait` shows it
        assert waited.stdout.splitlines()[1].split() == [
            removed[0], "-", "unknown", "-", "-", *REMOVED_SAID.split()], waited.stdout


@pytest.mark.parametrize("how", ["submit", "retry", "a batch"])
def test_submit_wait_says_a_job_removed_before_it_first_read_it(server: Server,
                                                                 how: str) -> None:
    # Removed once ended before `--wait` first read it (to say why it waits; a batch's
    # jobs as they are), it was "no job with id ...", and a batch's others not waited for.
    url = server.url
    earlier = httpx.post(f"{url}/api/jobs", json={"kind": "sleep", "input": {"seconds": 0}})
    with httpx.Client(base_url=url, timeout=30) as client:
        wait_job(client, earlier.json()["id"])
        assert client.post("/api/queue/pause").status_code == 200  # each is queued when sent
    removed: list[str] = []

    def before_get(path: str) -> None:
        """At its first read (not a long poll): it runs to its end and is removed."""
        job_id = path.removeprefix("/api/jobs/")
        if path.startswith("/api/jobs/") and p.is_valid_id(job_id) and not removed:
            removed.append(job_id)
            with httpx.Client(base_url=url, timeout=30) as client:
                assert client.post("/api/queue/resume").status_code == 200
                wait_job(client, job_id)
                assert client.post(f"/api/jobs/{job_id}/remove").status_code == 200

    command = {"submit": ["submit", "sleep", "--input", '{"seconds": 0}'],
               "retry": ["retry", earlier.json()["id"]],
               "a batch": ["submit", "sleep", "--inputs", "-"]}[how]
    with relay_to(url, before_get) as relayed:
        waited = cli(relayed, *command, "--wait", stdin='{"seconds": 0}\n{"seconds": 0}\n')
    assert removed, "no job was read"
    assert waited.returncode == 5, waited  # as `offload wait` exits for it
    assert waited.stderr.endswith(f"offload: job {removed[0]} was {REMOVED_SAID}: how it "
                                  "ended is unknown\n"), waited
    rows = {line.split()[0]: line.split()[1:] for line in waited.stdout.splitlines()[1:]}
    assert rows[removed[0]] == ["-", "unknown", "-", "-", *REMOVED_SAID.split()], rows
    if how == "a batch":  # the other, waited for all the same
        assert [row[1] for job_id, row in rows.items() if job_id != removed[0]] == [
            "completed"], rows


def test_wait_json_gives_a_job_whole_though_another_was_submitted_as_it_read_it(
        server: Server) -> None:
    # The whole read of the jobs at the top of the listing was asked from the top again: a
    # job submitted since their summaries took the place of one, which was given as its
    # summary (its input and output left out).
    url = server.url
    last = cli(url, "submit", "sleep", "--delay", "3").stdout.strip()  # waited for last
    first = cli(url, "submit", "sleep", "--input", '{"seconds": 1}').stdout.strip()
    submitted: list[str] = []

    def before_get(path: str) -> None:
        if "fields=full" in path and "before=" not in path and not submitted:
            submitted.append(httpx.post(f"{url}/api/jobs", json={
                "kind": "sleep", "input": {"seconds": 0}}).json()["id"])

    with relay_to(url, before_get) as relayed:
        waited = cli(relayed, "wait", "--json")
    assert submitted, "the jobs were not read whole from the top of the listing"
    assert waited.returncode == 0, waited
    jobs = {job["id"]: job for job in json.loads(waited.stdout)}
    assert jobs.keys() == {first, last}, jobs.keys()
    assert jobs[first]["input"] == {"seconds": 1} and jobs[first]["state"] == "completed"


def test_wait_without_ids_keeps_a_job_read_as_ended_though_removed_later(
        server: Server) -> None:
    # It read the jobs that had ended only once none was left to wait for: one that ended
    # early and was removed during a long wait for another was gone by then (exit 5).
    url = server.url
    assert httpx.post(f"{url}/api/queue/pause").status_code == 200
    first = cli(url, "submit", "sleep", "--input", '{"seconds": 0}').stdout.strip()
    long = cli(url, "submit", "sleep", "--input", '{"seconds": 60}').stdout.strip()
    # Queued last, it is waited for first, and ends after the first one.
    last = cli(url, "submit", "sleep", "--after", first, "--input", '{"seconds": 0}'
               ).stdout.strip()
    removed: list[str] = []

    def before_get(path: str) -> None:
        if path.startswith(f"/api/jobs/{last}?wait_s="):
            assert httpx.post(f"{url}/api/queue/resume").status_code == 200
        elif path.startswith(f"/api/jobs/{long}?wait_s=") and not removed:
            removed.append(first)  # once the last has ended: the first was read by now
            assert httpx.post(f"{url}/api/jobs/{first}/remove").status_code == 200
            assert httpx.delete(f"{url}/api/jobs/{long}", timeout=30).status_code == 200

    with relay_to(url, before_get) as relayed:
        waited = cli(relayed, "wait", "--json")
    assert removed, "the long job was not long-polled"
    assert waited.returncode == 1, waited  # the long job was cancelled
    assert [(job["id"], job["state"]) for job in json.loads(waited.stdout)] == [
        (first, "completed"), (long, "cancelled"), (last, "completed")], waited.stdout
    assert json.loads(waited.stdout)[0]["input"] == {"seconds": 0}  # in full


def test_a_key_used_before_for_other_jobs_names_them(server: Server) -> None:
    # A batch sent again with a changed first line said that no job of it was stored,
    # though the first send's were: the key was spent, and on what was not said.
    url = server.url
    naps = '{"seconds": 0}\n{"seconds": 0}\n'
    made = cli(url, "submit", "sleep", "--inputs", "-", "--key", "my naps", stdin=naps).stdout
    assert cli(url, "submit", "sleep", "--inputs", "-", "--key", "my naps",
               stdin=naps).stdout == made  # the same batch again: the same jobs
    first, second = made.split()
    for changed, line, same in (('{"seconds": 1}\n{"seconds": 0}\n', 1, ""),
                                ('{"seconds": 0}\n{"seconds": 2}\n', 2, f"{first}\n")):
        again = cli(url, "submit", "sleep", "--inputs", "-", "--key", "my naps", stdin=changed)
        assert (again.returncode, again.stdout) == (2, same), again
        assert again.stderr == (
            f"offload: line {line} of stdin: --key 'my naps' was already used by another "
            f"batch, which made 2 job(s) ({first}, {second}), with another job at this place: "
            "a batch sent again holds the same jobs in the same order; give another --key for "
            "a new batch. This command stored no job." + (
                " The job before it was sent with that batch too (their ids above)."
                if same else "") + "\n"), again.stderr
    one = cli(url, "submit", "sleep", "--key", "nap").stdout.strip()
    other = cli(url, "submit", "sleep", "--key", "nap", "--input", '{"seconds": 1}')
    assert (other.returncode, other.stderr) == (2, (
        "offload: --key nap was already used with a different request body, for job "
        f"{one}; give another --key for a new job\n")), other
    assert len(json.loads(cli(url, "list", "--json").stdout)) == 3


def test_a_job_is_named_by_the_start_of_its_id(make_server: MakeServer,
                                               data_dir: Path) -> None:
    # The notes name jobs by their first 8 characters ("after 1a2b3c4d"), and `show 1a2b3c4d`
    # was a usage error: "is no job's id".
    from jobs.store.job_store import JobStore

    store, later = JobStore(data_dir / "jobs"), p.iso(time.time() + 3600)
    twins = [store.create("sleep", {}, 30, job_id=f"abcdef{n}{'0' * 25}",
                          fields={p.F_RUN_AT: later})["id"] for n in (1, 2)]
    url = make_server().url
    assert json.loads(cli(url, "show", " ABCDEF1 ", "--json").stdout)["id"] == twins[0]
    both = cli(url, "cancel", "abcdef")
    assert both.returncode == 2 and "'abcdef' starts the ids of 2 jobs (" in both.stderr, both
    assert all(twin in both.stderr for twin in twins) and both.stdout == ""
    unknown = cli(url, "wait", "abcdef3")
    assert (unknown.returncode, unknown.stderr) == (
        5, "offload: no job's id starts with 'abcdef3' (offload list shows them)\n"), unknown
    assert cli(url, "show", "abcde").returncode == 2  # too short to be taken for one
    after = cli(url, "submit", "sleep", "--after", "abcdef1, ABCDEF2", "--json")
    assert json.loads(after.stdout)["depends_on"] == twins, after
    cancelled = cli(url, "cancel", "abcdef2", twins[0])
    assert sorted(cancelled.stdout.splitlines()) == [f"{twin} cancelled" for twin in twins]


def test_cancel_names_the_jobs_that_fail_with_it(server: Server) -> None:
    # They failed unstarted (error type dependency), and the cancel said nothing of them.
    url = server.url
    first = cli(url, "submit", "sleep", "--input", '{"seconds": 120}').stdout.strip()
    second = cli(url, "submit", "sleep", "--after", first).stdout.strip()
    third = cli(url, "submit", "sleep", "--after", second).stdout.strip()
    cancelled_too = cli(url, "submit", "sleep", "--after", first).stdout.strip()
    other = cli(url, "submit", "sleep", "--input", '{"seconds": 120}').stdout.strip()
    done = cli(url, "cancel", first, cancelled_too)
    assert done.returncode == 0, done
    assert sorted(done.stdout.splitlines()) == sorted([f"{first} cancelled",
                                                       f"{cancelled_too} cancelled"])
    assert done.stderr == (f"offload: {first} cancelled: 2 job(s) that depend on it fail with "
                           f"it (dependency): {second[:8]}, {third[:8]}\n"), done.stderr
    with server.client() as client:
        for job_id in (second, third):
            assert wait_job(client, job_id)["error"]["type"] == "dependency"
    alone = cli(url, "cancel", other)
    assert (alone.returncode, alone.stdout, alone.stderr) == (0, f"{other} cancelled\n", "")


def test_a_job_cancelled_with_one_it_depends_on_is_cancelled_not_failed(
        server: Server) -> None:
    # Both cancels went at once: the first one's could fail the other (dependency) before
    # its own came, and the command ended with exit 6, "has already finished (failed)".
    first = cli(server.url, "submit", "sleep", "--input", '{"seconds": 120}').stdout.strip()
    dependant = cli(server.url, "submit", "sleep", "--after", first).stdout.strip()

    def late(path: str) -> None:
        """The dependant's cancel, as a slow network delivers it: after its job ended
        (cancelled with the first), or 3 s."""
        if dependant in path:
            with contextlib.suppress(AssertionError), server.client() as client:
                wait_job(client, dependant, timeout=3)

    with relay_to(server.url, before_delete=late) as relayed:
        done = cli(relayed, "cancel", first, dependant)
    assert done.returncode == 0, done
    assert done.stdout.splitlines() == [f"{first} cancelled", f"{dependant} cancelled"]
    with server.client() as client:
        assert wait_job(client, dependant)["state"] == "cancelled"


def test_every_queued_job_cancelled_by_state_reads_cancelled_not_failed(
        server: Server) -> None:
    # `cancel --state queued` sent every cancel at once: the one a job depends on could
    # fail that job (dependency) first, and it said "had finished" (a third of a chain).
    first = cli(server.url, "submit", "sleep", "--delay", "600").stdout.strip()
    dependant = cli(server.url, "submit", "sleep", "--after", first).stdout.strip()
    first_asked = threading.Event()

    def late(path: str) -> None:
        """The dependant's cancel, as a slow network delivers it: when the first's cancel
        came meanwhile (within 3 s), once its job has ended (failed with the first)."""
        if first in path:
            first_asked.set()
        elif dependant in path and first_asked.wait(3):
            with server.client() as client:
                wait_job(client, dependant)

    with relay_to(server.url, before_delete=late) as relayed:
        done = cli(relayed, "cancel", "--state", "queued")
    assert done.returncode == 0, done
    assert done.stdout.splitlines() == [f"{dependant} cancelled", f"{first} cancelled"]
    with server.client() as client:
        assert wait_job(client, dependant)["state"] == "cancelled"


def test_a_wait_for_a_later_turn_of_a_chat_says_it_waits_for_the_earlier(
        server: Server) -> None:
    # Its note is its progress ("waits for the previous answer ..."): `offload wait` said
    # nothing of why it waited, and looked stuck.
    with server.client() as client:
        client.post("/api/queue/pause")
        turns = [client.post("/api/ai_chat_async", headers={"Idempotency-Key": key}, json={
            "messages": [{"role": "user", "content": "How is the CPU?"}],
            "session_id": "a-conversation"}).json()["job_id"] for key in ("one", "two")]
    waiting = start_cli(server.url, "wait", turns[1])
    said = Reader(waiting.stderr)
    waits = (f"offload: job {turns[1]} waits for job {turns[0]} to end (the earlier turn of "
             "its conversation)")
    wait_for(lambda: waits in said.text, 30, 0.1, "the turn waited for said by wait")
    assert cli(server.url, "cancel", *turns).returncode == 0
    with waiting:
        assert waiting.wait(60) == 1, said.done()


def test_a_wait_for_a_long_chain_says_why_the_first_few_wait(server: Server) -> None:
    # A line (and a GET) for each of a chain's queued jobs, each naming the one before.
    with server.client() as client:
        client.post("/api/queue/pause")
        chain = [client.post("/api/jobs", json={"kind": "sleep"}).json()["id"]]
        for _ in range(8):
            chain.append(client.post("/api/jobs", json={"kind": "sleep",
                                                        "depends_on": chain[-1]}).json()["id"])
    waiting = start_cli(server.url, "wait", *chain)
    said = Reader(waiting.stderr)
    more = ("offload: 3 more queued, not looked at here: offload list --state queued says why "
            "each waits")
    wait_for(lambda: more in said.text, 30, 0.1, "the rest of the chain counted")
    assert said.text.splitlines()[1:6] == [
        f"offload: job {chain[n]} waits for job {chain[n - 1]} to complete (--after)"
        for n in range(1, 6)], said.text
    assert cli(server.url, "cancel", *chain).returncode == 0
    with waiting:
        assert waiting.wait(60) == 1, said.done()


def test_a_chain_of_hundreds_of_jobs_is_cancelled_oldest_first_given(
        make_server: MakeServer, data_dir: Path) -> None:
    # The order of the cancels was worked out recursively, as deep as the chain: from 333
    # jobs on, "not shaped as Offload's (RecursionError ...)", exit 7, none cancelled.
    from jobs.protocol.control import set_queue_paused
    from jobs.store.job_store import JobStore

    store = JobStore(data_dir / "jobs")
    chain = [store.create("sleep", {"seconds": 0}, 30)["id"]]
    set_queue_paused(data_dir, True)
    for _ in range(349):
        chain.append(store.create("sleep", {"seconds": 0}, 30,
                                  fields={p.F_DEPENDS_ON: [chain[-1]]})["id"])
    server = make_server()
    done = cli(server.url, "cancel", *chain)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [f"{job_id} cancelled" for job_id in chain]


@pytest.mark.slow
@pytest.mark.timeout(300)  # 1001 jobs created and cancelled
def test_a_chain_longer_than_a_request_is_cancelled_not_failed(
        make_server: MakeServer, data_dir: Path) -> None:
    # The ids went 1000 a request in the order given: the first request's cancel of the
    # link before the last failed the last (dependency), and the command exited 6.
    from jobs.cli.client import LIST_MAX
    from jobs.protocol.control import set_queue_paused
    from jobs.store.job_store import JobStore

    store = JobStore(data_dir / "jobs")
    chain = [store.create("sleep", {"seconds": 0}, 30)["id"]]
    set_queue_paused(data_dir, True)
    for _ in range(LIST_MAX):  # one more than a request takes
        chain.append(store.create("sleep", {"seconds": 0}, 30,
                                  fields={p.F_DEPENDS_ON: [chain[-1]]})["id"])
    server = make_server(env={"OFFLOAD_MAX_QUEUED": "5000"})
    done = cli(server.url, "cancel", *chain)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr[-2000:]
    assert done.stdout.splitlines() == [f"{job_id} cancelled" for job_id in chain]


def test_cancel_several_and_retry(server: Server) -> None:
    url = server.url
    ids = [cli(url, "submit", "sleep", "--input", '{"seconds": 120}').stdout.strip()
           for _ in range(3)]
    cancelled = cli(url, "cancel", *ids, script=True)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.splitlines() == [f"{job_id} cancelled" for job_id in ids]
    again = cli(url, "cancel", ids[0], "f" * 32)
    assert again.returncode == 6, "the first failure's code: already finished"
    assert f"job {ids[0]} has already finished (cancelled)" in again.stderr
    assert f"no job with id '{'f' * 32}'" in again.stderr
    # --json lists the jobs it cancelled: one that had finished was listed as if it were.
    finished = cli(url, "cancel", ids[0], "--json")
    assert (finished.returncode, json.loads(finished.stdout)) == (6, []), finished

    rerun = cli(url, "retry", ids[0], script=True)
    assert rerun.returncode == 0 and p.is_valid_id(rerun.stdout.strip()), rerun
    new = json.loads(cli(url, "show", rerun.stdout.strip(), "--json").stdout)
    assert new["rerun_of"] == ids[0] and new["input"] == {"seconds": 120}
    busy = cli(url, "retry", new["id"])
    assert busy.returncode == 6 and "cancel it first" in busy.stderr
    damaged = p.job_path(server.data_dir / "jobs", ids[2])
    whole = Path(damaged).read_bytes()
    Path(damaged).write_text('{"id": "damaged')
    corrupt = cli(url, "retry", ids[2])  # the API's words were said: "with POST /api/jobs"
    Path(damaged).write_bytes(whole)
    assert corrupt.returncode == 6 and corrupt.stderr.endswith(
        "holds no job to run again; submit a new one with offload submit\n"), corrupt
    edited = cli(url, "retry", ids[1], "--input", '{"seconds": 0}', "--wait", "--json")
    assert edited.returncode == 0
    assert json.loads(edited.stdout)["rerun_of"] == ids[1]
    scripted = cli(url, "cancel", new["id"], "--json")
    assert [job["state"] for job in json.loads(scripted.stdout)] == ["cancelled"]

    # Every queued job of a kind at once, as `pueue kill --all` or `celery purge`.
    later = [cli(url, "submit", "sleep", "--delay", "600").stdout.strip() for _ in range(3)]
    swept = cli(url, "cancel", "--state", "queued", "--kind", "sleep")
    assert swept.returncode == 0, swept.stderr
    assert sorted(swept.stdout.split()[::2]) == sorted(later)
    assert {json.loads(cli(url, "show", job_id, "--json").stdout)["state"]
            for job_id in later} == {"cancelled"}
    for args in ([], [later[0], "--state", "queued"], ["--kind", "sleep"]):
        assert cli(url, "cancel", *args).returncode == 2, args
    none = cli(url, "cancel", "--state", "queued", "--kind", "sleep")  # it said nothing
    assert (none.returncode, none.stdout, none.stderr) == (
        0, "", "no queued jobs of kind sleep: nothing to cancel\n"), none
    # --kind again: of any of them (it took the last alone, quietly).
    kinds = {kind: cli(url, "submit", kind, "--delay", "600").stdout.strip()
             for kind in ("sleep", "probe", "train")}
    both = cli(url, "cancel", "--state", "queued", "--kind", "sleep", "--kind", "probe")
    assert both.returncode == 0, both
    assert sorted(both.stdout.split()[::2]) == sorted([kinds["sleep"], kinds["probe"]]), both
    assert json.loads(cli(url, "show", kinds["train"], "--json").stdout)["state"] == "queued"
    none = cli(url, "cancel", "--state", "queued", "--kind", "sleep", "--kind", "probe")
    assert none.stderr == "no queued jobs of kind sleep or probe: nothing to cancel\n", none
    assert cli(url, "cancel", kinds["train"]).returncode == 0

    # Finished jobs removed now, as `pueue remove ID` and `pueue clean`.
    busy = cli(url, "remove", new["id"], edited_id := json.loads(edited.stdout)["id"])
    assert busy.returncode == 0 and busy.stdout.split() == [new["id"], "removed", edited_id,
                                                            "removed"], busy
    live = cli(url, "submit", "sleep", "--input", '{"seconds": 120}').stdout.strip()
    kept = cli(url, "remove", live)
    assert kept.returncode == 6 and "cancel it first" in kept.stderr, kept
    cleaned = cli(url, "remove", "--state", "cancelled", "--kind", "sleep", "--kind", "probe",
                  "--kind", "train", "--json")
    assert cleaned.returncode == 0, cleaned
    assert sorted(job["id"] for job in json.loads(cleaned.stdout)) == sorted(
        [*ids, *later, *kinds.values()])
    left = json.loads(cli(url, "list", "--json").stdout)
    assert [job["id"] for job in left] == [live], left
    assert cli(url, "remove", ids[0]).returncode == 5
    for args in ([], [live, "--state", "finished"], ["--kind", "sleep"],
                 ["--state", "running"]):
        assert cli(url, "remove", *args).returncode == 2, args
    cli(url, "cancel", live)


def test_every_failed_job_retried_once_however_often_asked(server: Server) -> None:
    # As `pueue restart --all-failed` or `rq requeue --all`: a job at a time, by its id.
    url = server.url
    failed = [cli(url, "submit", "probe", "--input", json.dumps({"fail": f"no {n}"})
                  ).stdout.strip() for n in range(3)]
    assert cli(url, "wait", *failed).returncode == 1
    assert cli(url, "submit", "sleep", "--wait").returncode == 0  # completed: not retried
    retried = cli(url, "retry", "--state", "failed", "--kind", "probe", "--input", "{}",
                  "--wait")
    assert retried.returncode == 0, retried
    said = [line.split() for line in retried.stderr.splitlines()]
    assert [(line[0], line[1:4]) for line in said] == [
        (job_id, ["run", "again", "as"]) for job_id in failed], retried.stderr  # oldest first
    table = retried.stdout.splitlines()
    assert [line.split()[0] for line in table[1:]] == [line[4] for line in said], table
    assert all(" completed " in line for line in table[1:]), table
    news = [json.loads(cli(url, "show", line[4], "--json").stdout) for line in said]
    assert [job["rerun_of"] for job in news] == failed
    created = [job["created_at"] for job in news]  # queued in that order: one at a time
    assert created == sorted(created), news
    again = cli(url, "retry", "--state", "failed")  # each is run again already
    assert (again.returncode, again.stdout, again.stderr) == (
        0, "", "no failed jobs not run again already: nothing to retry\n"), again
    assert json.loads(cli(url, "retry", "--state", "failed", "--json").stdout) == []
    for args in ([], [failed[0], "--state", "failed"], ["--kind", "probe"]):
        assert cli(url, "retry", *args).returncode == 2, args
    typo = cli(url, "retry", "--state", "failed", "--kind", "prob")  # said nothing to do
    assert typo.returncode == 2 and "unknown job kind 'prob'" in typo.stderr, typo
    # None run again, each refused: said so (exit 6), not a wait for no job (exit 7).
    busy = [cli(url, "submit", "sleep", "--input", '{"seconds": 60}').stdout.strip()
            for _ in range(2)]
    refused = cli(url, "retry", *busy, "--wait")
    assert refused.returncode == 6 and refused.stderr.count("cancel it first") == 2, refused
    assert cli(url, "cancel", *busy).returncode == 0
    # --kind again: of any of them (it took the last alone, quietly).
    probe = cli(url, "submit", "probe", "--delay", "600").stdout.strip()
    assert cli(url, "cancel", probe).returncode == 0
    both = cli(url, "retry", "--state", "cancelled", "--kind", "sleep", "--kind", "probe",
               "--json")
    assert both.returncode == 0, both
    reruns = json.loads(both.stdout)
    assert [job["rerun_of"] for job in reruns] == [*busy, probe], both
    assert cli(url, "cancel", *(job["id"] for job in reruns[:2])).returncode == 0  # sleeps


def test_the_queue_and_schedules_steered_and_a_submission_timed(make_server: MakeServer,
                                                               tmp_path: Path) -> None:
    # As `pueue pause`/`start` and RQ's scheduling: from a terminal, without curl.
    schedules = tmp_path / "schedules.toml"
    schedules.write_text('[nightly]\nkind = "sleep"\nevery = "1d"\ninput = {seconds = 0}\n')
    server = make_server(env={"OFFLOAD_SCHEDULES_FILE": str(schedules)})
    url = server.url
    paused = cli(url, "pause", script=True)
    assert (paused.returncode, paused.stdout) == (0, "queue paused: queued jobs wait\n")
    assert "queue       paused" in cli(url, "status").stdout
    for on_hold in (cli(url, "schedules"), cli(url, "schedules", "--json")):
        # Its next run said, as if the queue ran.
        assert "the queue is paused: a schedule's job waits in it" in on_hold.stderr, on_hold
    timed = cli(url, "submit", "sleep", "--input", '{"seconds": 0}', "--delay", "3600",
                "--max-attempts", "2", "--key", "nightly-report", "--json")
    job = json.loads(timed.stdout)
    assert job["state"] == "queued" and job["max_attempts"] == 2 and job["run_at"]
    again = cli(url, "submit", "sleep", "--input", '{"seconds": 0}', "--delay", "3600",
                "--max-attempts", "2", "--key", "nightly-report")
    assert again.stdout.strip() == job["id"], "the same key: the same job"
    # A start to come is said (it read "0 ahead in the queue", as if next).
    # Its own line: the schedule's first job may be newer.
    note = next(" ".join(line.split()) for line in cli(url, "list").stdout.splitlines()
                if line.startswith(job["id"]))
    assert "starts 20" in note and " UTC" in note and "ahead" not in note, note
    in_full = cli(url, "show", job["id"]).stdout  # as its other times (it read ...T...Z)
    assert f"run at:         {job['run_at'][:19].replace('T', ' ')} UTC\n" in in_full, in_full
    assert f"created:        {job['created_at'][:19].replace('T', ' ')} UTC\n" in in_full
    # A job submitted with --wait on a paused queue says why it waits.
    waiting = start_cli(url, "submit", "sleep", "--input", '{"seconds": 0}', "--delay", "0",
                        "--wait")
    waiting_said = Reader(waiting.stderr)
    wait_for(lambda: "the queue is paused" in waiting_said.text, 30, 0.1, "the paused queue said")
    # And so do `log --follow` and `wait` on it (they said nothing, as if stuck).
    waiting_id = waiting_said.text.split()[0]
    followers = [start_cli(url, "log", waiting_id, "--follow"), start_cli(url, "wait", waiting_id)]
    followers_said = [Reader(follower.stderr) for follower in followers]
    paused_said = "offload: the queue is paused: it starts once resumed (offload resume)"
    wait_for(lambda: all(paused_said in said.text for said in followers_said), 30, 0.1,
             "the paused queue said by log --follow and wait")
    empty = cli(url, "submit", "sleep", "--after", " ")  # a script's unset "$PREV"
    assert empty.returncode == 2 and "--after is empty" in empty.stderr, empty
    for typo in (cli(url, "list", "--kind", "slep"), cli(url, "list", "--kind", "sleep",
                                                        "--kind", "slep"),
                 cli(url, "cancel", "--state", "queued", "--kind", "slep")):
        assert (typo.returncode, typo.stdout, typo.stderr) == (
            2, "", "offload: unknown job kind 'slep'; known kinds: chat, probe, sleep, train\n")
    with_a_path = cli(url, "--url", f"{url}/api", "status")
    assert with_a_path.returncode == 7 and "without /api" in with_a_path.stderr, with_a_path
    at = cli(url, "submit", "sleep", "--at", "2099-01-01T00:00:00Z")
    assert at.returncode == 2 and "--at: more than 30 days ahead" in at.stderr
    assert cli(url, "submit", "sleep", "--delay", "5", "--at", "x").returncode == 2
    queued = cli(url, "list", "--state", "queued")  # "0 ahead in the queue", and no more
    assert "the queue is paused: queued jobs start once resumed" in queued.stderr, queued
    resumed = cli(url, "resume")
    assert (resumed.returncode, resumed.stdout) == (0, "queue running\n")
    with waiting:  # its pipes closed
        assert waiting.wait(60) == 0 and waiting_said.done().count("\n") == 2, waiting_said.text
    for follower, said in zip(followers, followers_said, strict=True):
        with follower:
            assert follower.wait(60) == 0 and said.done().count("queue is paused") == 1, said.text

    shown = cli(url, "schedules")
    assert shown.stderr == "", shown
    listed = shown.stdout.splitlines()
    assert listed[0].split() == ["NAME", "KIND", "WHEN", "NEXT", "RUN", "(UTC)", "LAST", "JOB"]
    assert listed[1].split()[:4] == ["nightly", "sleep", "every", "1d"]
    assert cli(url, "pause", "nightly").stdout == "schedule nightly paused\n"
    assert cli(url, "schedules").stdout.splitlines()[1].split()[4] == "paused"
    assert cli(url, "resume", "nightly").stdout == "schedule nightly running\n"
    unknown = cli(url, "pause", "nope")
    assert unknown.returncode == 5 and "nope" in unknown.stderr
    for name in ("a/b", ""):  # "no API route ... is that Offload's address?", exit 7
        unknown = cli(url, "resume", name)
        assert unknown.returncode == 5, unknown
        assert f"no schedule is named {name!r}" in unknown.stderr, unknown
    # A schedules file edited into one that cannot be used: said, and not with exit 0.
    schedules.write_text('[nightly]\nkind = "sleep"\nevery = "0s"\n')
    def told() -> subprocess.CompletedProcess[str] | None:
        done = cli(url, "schedules")
        return done if done.returncode == 7 else None

    broken = wait_for(told, 30, 0.5, "the schedules file's error to be told")
    assert "the schedules file cannot be used" in broken.stderr and "nightly" in broken.stdout
    scripted = cli(url, "schedules", "--json")  # exit 7 said nothing on stderr of why
    assert scripted.returncode == 7 and json.loads(scripted.stdout)["error"], scripted
    assert "the schedules file cannot be used" in scripted.stderr, scripted
    # A wait for a job given a later start says when (it said nothing, as if stuck).
    delayed = start_cli(url, "wait", job["id"])
    delayed_said = Reader(delayed.stderr)
    starts = f"offload: job {job['id']} starts {job['run_at'][:19].replace('T', ' ')} UTC"
    wait_for(lambda: starts in delayed_said.text, 30, 0.1, "the start time said by wait")
    # A wait for a job after another says for which (it said nothing, as if stuck).
    behind = cli(url, "submit", "sleep", "--after", job["id"], "--delay", "7200",
                 "--json").stdout
    behind, its_start = json.loads(behind)["id"], json.loads(behind)["run_at"]
    following = start_cli(url, "wait", behind)
    following_said = Reader(following.stderr)
    waits = (f"offload: job {behind} waits for job {job['id']} to complete (--after), then "
             f"starts no sooner than {its_start[:19].replace('T', ' ')} UTC")  # both said
    wait_for(lambda: waits in following_said.text, 30, 0.1, "the job waited for said by wait")
    unstarted = cli(url, "log", job["id"])  # it said "has logged nothing", as of a job run
    assert (unstarted.returncode, unstarted.stdout) == (0, ""), unstarted
    assert "has not started yet" in unstarted.stderr, unstarted
    # When it was to start is said of a queued job only (a finished one showed it).
    assert "run at" in cli(url, "show", job["id"]).stdout
    assert cli(url, "cancel", job["id"]).returncode == 0
    with delayed, following:
        assert delayed.wait(60) == 1, delayed_said.done()
        assert following.wait(60) == 1, following_said.done()
    assert "run at" not in cli(url, "show", job["id"]).stdout
    # As `pueue add --after`: a job after another's success; this one was cancelled.
    after = cli(url, "submit", "sleep", "--after", f" {job['id'].upper()} ", "--wait")
    assert after.returncode == 1, after
    assert f"the job it depends on, {job['id']}, ended cancelled" in after.stderr
    dependent = after.stderr.split()[0]
    not_an_id = cli(url, "submit", "sleep", "--after", "nope")
    assert not_an_id.returncode == 2 and "--after wants a job's id" in not_an_id.stderr
    details = cli(url, "show", dependent).stdout.splitlines()
    assert [line.split()[-1] for line in details if line.startswith("depends on:")] == [job["id"]]
    # On several, as `pueue add --after 1 2`: --after again, or ids joined by commas.
    first_id = cli(url, "submit", "sleep", "--input", '{"seconds": 0}').stdout.strip()
    several = cli(url, "submit", "sleep", "--after", first_id, "--after",
                  f"{first_id},{job['id']}", "--wait")
    assert several.returncode == 1 and "ended cancelled" in several.stderr, several
    details = cli(url, "show", several.stderr.split()[0]).stdout.splitlines()
    assert [" ".join(line.split()) for line in details if line.startswith("depends on:")] == [
        f"depends on: {first_id}, {job['id']}"], details
    # As `pueue wait ID...`: until each has ended; 1 unless they all completed.
    slow = cli(url, "submit", "sleep", "--input", '{"seconds": 1.5}').stdout.strip()
    waited = cli(url, "wait", slow, first_id)
    assert waited.returncode == 0, waited
    assert [line.split()[:3] for line in waited.stdout.splitlines()[1:]] == [
        [slow, "sleep", "completed"], [first_id, "sleep", "completed"]]
    failed = cli(url, "wait", first_id, several.stderr.split()[0], "--json")
    assert failed.returncode == 1 and "ended cancelled" in failed.stderr, failed
    assert [each["state"] for each in json.loads(failed.stdout)] == ["completed", "failed"]
    twice = cli(url, "wait", first_id, f" {first_id} ")
    assert twice.returncode == 0 and len(twice.stdout.splitlines()) == 2, twice
    unknown = cli(url, "wait", first_id, "0" * 32)
    assert unknown.returncode == 5 and unknown.stdout == "", unknown
    # As `pueue parallel`: how many jobs run at once, shown and changed while it runs.
    queue = httpx.get(f"{url}/api/queue").json()
    default, slots = queue["max_concurrent_default"], queue["model_slots"]
    shown = cli(url, "parallel", script=True)
    assert slots < default  # the chats the embedded model decodes at once, fewer
    why = ("llama-cpp-python's server runs one chat at a time"  # where llama-server is not built
           if queue["model_engine"] == "llama-cpp-python"
           else "the embedded model's slots (OFFLOAD_LLM_SLOTS)")
    caps_shown = (f"runners at once: {default} (OFFLOAD_MAX_CONCURRENT)\n"
                  f"chat at once: at most {slots}, {why}; more wait queued\n"
                  "train at once: 1 (OFFLOAD_KIND_CAPS)\n")
    assert (shown.returncode, shown.stdout) == (0, caps_shown)
    raised = cli(url, "parallel", "3")
    assert (raised.returncode, raised.stdout.splitlines()[0]) == (
        0, "runners at once: 3 (set while running, kept across restarts; "
           f"OFFLOAD_MAX_CONCURRENT is {default})")
    # One kind's, as Pueue's `parallel N --group G`.
    kinds = cli(url, "parallel", "2", "--kind", "sleep").stdout.splitlines()
    assert kinds[1:] == ["sleep at once: 2 (set while running, kept across restarts; "
                         "without it, no cap of its own)", "train at once: 1 (OFFLOAD_KIND_CAPS)"]
    train = cli(url, "parallel", "3", "--kind", "train").stdout.splitlines()
    assert train[2] == ("train at once: 3 (set while running, kept across restarts; "
                        "OFFLOAD_KIND_CAPS says 1)")
    status = [" ".join(line.split()) for line in cli(url, "status").stdout.splitlines()]
    assert [line for line in status if line.startswith(("sleep at", "train at"))] == [
        "sleep at once: 2 (set while running, kept across restarts; without it, no cap of its "
        "own)", "train at once: 3 (set while running, kept across restarts; OFFLOAD_KIND_CAPS "
        "says 1)"], status
    for kind in ("sleep", "train"):
        assert cli(url, "parallel", "default", "--kind", kind).returncode == 0
    for runners in ("2", "default", None):  # a typo's `default` or caps printed all, exit 0
        unknown = cli(url, "parallel", *([runners] if runners else []), "--kind", "nope")
        assert unknown.returncode == 2 and "unknown job kind 'nope'" in unknown.stderr, unknown
    # An empty --kind (a script's unset variable) changed the cap on all runners.
    empty = cli(url, "parallel", "3", "--kind", "")
    assert empty.returncode == 2 and "--kind is empty" in empty.stderr, empty
    assert "0 running of 3" in cli(url, "status").stdout
    assert json.loads(cli(url, "parallel", "--json").stdout)["max_concurrent"] == 3
    for wrong in ("0", "-1", "1025", "two", "2.5", "٣", "9" * 5000):
        refused = cli(url, "parallel", wrong)
        assert refused.returncode == 2 and "from 1 to 1024, or default" in refused.stderr, wrong
    assert cli(url, "parallel", "default").stdout == caps_shown
    assert httpx.get(f"{url}/api/queue").json()["max_concurrent"] == default


def test_the_token_from_the_environment_or_dotenv(make_server: MakeServer,
                                                  tmp_path: Path) -> None:
    server = make_server(env={"OFFLOAD_API_TOKEN": TOKEN})
    wrong = cli(server.url, "status", token="not-the-token-at-all")
    assert wrong.returncode == 4 and wrong.stderr.startswith("offload: ")
    # It spoke of a header to send, not of the setting that sends it.
    assert wrong.stderr.endswith(" (OFFLOAD_API_TOKEN, from the environment or .env, is not "
                                 "the server's token)\n"), wrong.stderr
    missing = cli(server.url, "list")
    assert missing.returncode == 4 and "set OFFLOAD_API_TOKEN" in missing.stderr
    assert cli(server.url, "status", token=TOKEN).returncode == 0
    # Beside the server's .env, nothing to give: its port and token are read from there.
    (tmp_path / ".env").write_text(f"OFFLOAD_PORT={server.port}\nOFFLOAD_API_TOKEN={TOKEN}\n")
    assert cli(None, "status", cwd=tmp_path).returncode == 0


def test_the_token_goes_nowhere_a_redirect_points() -> None:
    from http.server import ThreadingHTTPServer

    from tests.http_fake import JSONHandler, ScriptedServer

    seen: list[str] = []

    class Elsewhere(JSONHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization", ""))
            self._json(200, {"jobs": []})

    class Redirect(JSONHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{elsewhere.port}/api/jobs")
            self.send_header("Content-Length", "0")
            self.end_headers()

    with ScriptedServer(ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere)) as elsewhere, \
            ScriptedServer(ThreadingHTTPServer(("127.0.0.1", 0), Redirect)) as redirect:
        done = cli(f"http://127.0.0.1:{redirect.port}", "list", token=TOKEN)
    assert seen == [], "the token went where the redirect pointed"
    assert done.returncode == 2 and "redirected to http://localhost:" in done.stderr
    assert "--url" in done.stderr and TOKEN not in done.stderr


def test_errors_are_one_line_with_a_meaningful_exit_code(server: Server) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    down = cli(nobody, "status", script=True)
    assert down.returncode == 3
    assert down.stderr.startswith(f"offload: cannot reach Offload at {nobody}")
    assert len(down.stderr.splitlines()) == 1
    assert cli(None, "list", "--url", nobody).returncode == 3, "--url over OFFLOAD_URL"

    bad = cli(server.url, "submit", "sleep", "--input", "{seconds: 2}")
    assert bad.returncode == 2 and bad.stderr.startswith("offload: --input is not JSON")
    assert cli(server.url, "submit", "sleep", "--input", "[2]").returncode == 2
    unknown = cli(server.url, "submit", "nope")
    assert unknown.returncode == 2 and "known kinds: chat, probe, sleep" in unknown.stderr
    missing = cli(server.url, "show", "0" * 32)
    assert missing.returncode == 5 and "no job with id" in missing.stderr
    gone = cli(server.url, "submit", "chat", "--input", json.dumps({  # 410: not a retry's 7
        "messages": [{"role": "user", "content": "And then?"}], "session_id": "s-gone",
        "follows": "0" * 32}))
    assert gone.returncode == 6 and "0" * 32 in gone.stderr, gone
    assert cli(server.url, "list", "--state", "done").returncode == 2
    assert cli(server.url, "list", "--url", "ftp://x").returncode == 2
    for address in ("http://[::1", "http://127.0.0.1:port", "http://"):  # no traceback
        wrong = cli(server.url, "status", "--url", address)
        assert wrong.returncode == 2 and "like http://127.0.0.1:8001" in wrong.stderr
    assert cli(server.url, "show").returncode == 2


def test_a_removed_job_is_said_gone_not_its_id_mistyped(server: Server) -> None:
    # A removed or pruned job's well-formed id was answered "job ids are 32 lowercase hex
    # characters, as returned when the job was submitted": as if the user had mistyped it.
    job_id = cli(server.url, "submit", "sleep", "--input", '{"seconds": 0}').stdout.strip()
    assert cli(server.url, "wait", job_id).returncode == 0
    assert cli(server.url, "remove", job_id).returncode == 0
    gone = f"offload: no job with id '{job_id}' (removed, pruned, or never submitted here)\n"
    for command in (["show"], ["log"], ["log", "--follow"], ["wait"], ["cancel"], ["retry"]):
        done = cli(server.url, *command, job_id)
        assert (done.returncode, done.stderr) == (5, gone), (command, done)
    with server.client() as client:  # an id of another shape: how ids look
        assert "32 lowercase hex" in client.get("/api/jobs/A-JOB").json()["detail"]


def test_it_starts_without_loading_the_server(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("OFFLOAD_HOST=0.0.0.0\nOFFLOAD_PORT=8123\n")
    code = ("import sys; from jobs.cli import command_line, client; "
            "print(client.configured(None)[0]); print(*sorted(sys.modules))")
    shown = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                           text=True, check=True, env={**cli_env(None), "PYTHONPATH": str(ROOT)},
                           timeout=60).stdout.split()
    assert shown[0] == "http://127.0.0.1:8123"
    heavy = {"fastapi", "pydantic", "pydantic_settings", "uvicorn", "httpx", "psutil", "numpy"}
    assert heavy.isdisjoint(shown[1:])


# A Ctrl+C at a moment of the command's start: as the first of its modules starts loading
# (an audit hook), or once `jobs.cli` has loaded, before the console script (or
# `python -m jobs`) calls its main (a profile hook). The hook sends the SIGINT a terminal
# would, at that instant rather than at a guessed time.
CTRL_C_AT = """
import os, runpy, signal, sys
moment, sys.argv[1:2] = sys.argv[1], []
sent = []
def ctrl_c():
    sent.append(True)
    os.kill(os.getpid(), signal.SIGINT)
def as_it_loads(event, args):
    if event == "import" and args[0].startswith("jobs.cli.") and not sent:
        ctrl_c()
def once_loaded(frame, event, arg):
    if (event == "return" and frame.f_code.co_name == "<module>"
            and frame.f_globals.get("__name__") == "jobs.cli"):
        sys.setprofile(None)
        ctrl_c()
if moment == "as it loads":
    sys.addaudithook(as_it_loads)
else:
    sys.setprofile(once_loaded)
if sys.argv[1] == "-m":
    sys.argv[1:2] = []
    runpy.run_module("jobs", run_name="__main__", alter_sys=True)
else:
    sys.argv[:2] = [sys.argv[1]]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("moment", ["as it loads", "once loaded"])
@pytest.mark.parametrize("how", ["script", "-m"])
def test_ctrl_c_as_it_starts_exits_130_without_a_traceback(how: str, moment: str) -> None:
    # The console script imports jobs.cli before calling main: Ctrl+C in the first
    # tenth of a second of a command was a KeyboardInterrupt traceback; and once jobs.cli
    # had loaded, before main ran, it still was.
    assert OFFLOAD is not None, "no `offload` script: run `python launch.py --reinstall`"
    started = subprocess.run([sys.executable, "-c", CTRL_C_AT, moment,
                              OFFLOAD if how == "script" else "-m", "status"],
                             env=cli_env(free_url()), cwd=ROOT / "tests", capture_output=True,
                             text=True, timeout=60)
    # 130 from main; before it, the process ends by SIGINT, which a shell says as 130.
    assert started.returncode == (130 if moment == "as it loads" else -signal.SIGINT), \
        started.stderr
    assert started.stderr == "" and started.stdout == "", started.stderr


def test_odd_arguments_and_settings_are_usage_errors(server: Server, tmp_path: Path) -> None:
    """Each of these showed a Python traceback (exit 1), or was taken silently."""
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    for args, said in [
            (["submit", "sleep", "--input", f"@{deep}"], "nested too deeply"),
            (["submit", "sleep", "--key", "ключ"], "Idempotency-Key holds characters"),
            (["submit", "sleep", "--key", "a\nb"], "Idempotency-Key holds characters"),
            (["submit", "sleep", "--key", ""], "--key is empty"),
            # Said as the header's name, `header.Idempotency-Key`, not as the option.
            (["submit", "sleep", "--key", "k" * 256], "request: --key: String should have"),
            # `--url "$UNSET"` went to OFFLOAD_URL's server, or the default one, unsaid.
            (["status", "--url", ""], "--url is empty: give the server's address"),
            (["cancel", "--state", "live", "--url", " "], "--url is empty"),
            (["show", os.fsdecode(b"\xff")], "is no job's id"),  # bytes a terminal sent
            # Sent as a path: "this server is older", or "is that Offload's address?"
            (["show", ""], "'' is no job's id"), (["remove", "a/b"], "'a/b' is no job's id"),
            (["wait", "0" * 32, "0123"], "'0123' is no job's id"),
            (["cancel", "--kind", "sleep"], "--kind goes with --state"),  # said "not both"
            # A start of an id looked up first: "no job's id starts with 'abcdef'", exit 5.
            *(([command, "--state", state, "abcdef"], "not both")
              for command, state in (("cancel", "live"), ("remove", "failed"),
                                     ("retry", "failed"))),
            # The server's names for the fields were said: max_attempts, query.limit.
            (["submit", "sleep", "--max-attempts", "0"], "--max-attempts: Input should be"),
            (["list", "--limit", "0"], "request: --limit: Input should be greater"),
            (["submit", "sleep", "--at", "2020-01-01T00:00:00Z"], "in the past; leave --at out"),
            # Taken as POSIX seconds: "499059.9 h in the past; give a time zone".
            (["submit", "sleep", "--at", "3600"], "--at: not a number but a time in ISO "
                                                 "8601, such as 2026-12-24T18:00:00Z; to start "
                                                 "in a number of seconds, give --delay"),
            # "Input should be a valid datetime or date, input is too short"
            (["submit", "sleep", "--at", "23:59"], "--at: not a time: give it in ISO 8601"),
            (["submit", "sleep", "--priority", "99999"], "request: --priority: Input should"),
            (["list", "--before", "0" * 32], "list again without --before"),
            (["list", "--kind", os.fsdecode(b"\xfe")], "cannot be sent"),
            (["status", "--url", f"http://{'a' * 70}.com"], "cannot be used"),
            (["status", "--url", f"{server.url}?x=1"], "(from --url) has a query or fragment"),
            # "cannot reach Offload at http://user:pw@...: Name or service not known", exit 3
            *((["status", "--url", server.url.replace("//", f"//user:{pw}@")],
               "the server's address (from --url) holds a user or password")
              for pw in ("pw", "p/w", "p#w", "12/3")),
            # Taken as host `me`, port 8080, where the token went.
            (["status", "--url", "http://me:8080/s3cret@127.0.0.1"],
             "the server's address (from --url) holds a user or password"),
            # Said as no URL, the password shown with it.
            *((["status", "--url", url], "(from --url) holds a user or password")
              for url in ("user:pw@127.0.0.1:8001", "http:/user:pw@127.0.0.1",
                          "//user:pw@127.0.0.1", "http:\\\\user:pw@127.0.0.1")),
            # "cannot reach Offload ... URL can't contain control characters", exit 3
            (["status", "--url", "http://exa mple"], "holds a space or a control character"),
            # "cannot reach Offload ...: [SSL: WRONG_VERSION_NUMBER] wrong version number", 3
            (["status", "--url", server.url.replace("http:", "https:")],
             "answers plain HTTP, not HTTPS: give its address with http://")]:
        done = cli(server.url, *args)
        assert done.returncode == 2, (args, done.returncode, done.stdout, done.stderr)
        assert said in done.stderr and len(done.stderr.splitlines()) == 1, (args, done.stderr)
        assert "w@" not in done.stderr and "user:" not in done.stderr, done.stderr
        assert "--at: --at" not in done.stderr, done.stderr  # the field's name said twice
        assert "s3cret" not in done.stderr, done.stderr
    token = cli(server.url, "status", token="tökén€" * 4)
    assert token.returncode == 2 and "OFFLOAD_API_TOKEN holds characters" in token.stderr
    (tmp_path / ".env").write_bytes(b"OFFLOAD_PORT=8001\nX=caf\xe9\n")
    env_file = cli(None, "status", cwd=tmp_path)
    assert env_file.returncode == 2, env_file
    assert f"cannot read {tmp_path / '.env'}: it is not UTF-8 text" in env_file.stderr
    # python-dotenv's warning naming no file, the line left out: the default server asked.
    (tmp_path / ".env").write_text('OFFLOAD_PORT="8001\n')
    env_file = cli(None, "status", cwd=tmp_path)
    assert env_file.returncode == 2, env_file
    assert env_file.stderr == (f"offload: cannot read {tmp_path / '.env'}: line 1 "
                               "(OFFLOAD_PORT=...) cannot be read as NAME=value: close a quote "
                               "it opens, or remove the line\n"), env_file.stderr
    # "cannot read .env ([Errno 21] Is a directory: 3); it must be UTF-8 text"
    (tmp_path / ".env").unlink()
    (tmp_path / ".env").mkdir()
    env_file = cli(None, "status", cwd=tmp_path)
    assert env_file.returncode == 2, env_file
    assert env_file.stderr.startswith(f"offload: cannot read {tmp_path / '.env'}: ")
    assert env_file.stderr.endswith("; make it a file of settings, or set OFFLOAD_ENV_FILE "
                                    "to one\n"), env_file.stderr  # Windows: access denied
    assert cli(server.url, "list").returncode == 0  # and nothing was submitted meanwhile
    assert json.loads(cli(server.url, "list", "--json").stdout) == []


def test_a_number_option_that_is_none_and_a_schedule_no_route_takes_are_said(
        server: Server) -> None:
    # "argument --delay: invalid _seconds value: ''": the name of a function of the parser.
    for option in ("--delay", "--timeout"):
        for value in ("", "soon"):
            done = cli(server.url, "submit", "sleep", option, value)
            said = done.stderr.splitlines()[-1]
            assert done.returncode == 2, done
            assert said.endswith(f"argument {option}: must be a number of seconds, "
                                 f"{'0 or more' if option == '--delay' else 'above 0'}, or "
                                 f"a length such as 90s, 30m, 6h or 1d, not {value!r}"), said
    # A name with a line break was refused by the server as a path: exit 2, "the path holds
    # a control character"; no schedule is so named (a name is [a-z0-9_-]).
    for command in ("pause", "resume"):
        done = cli(server.url, command, "night\nly")
        assert (done.returncode, done.stderr) == (
            5, "offload: no schedule is named 'night\\nly'; see them with: offload schedules\n")
    assert json.loads(cli(server.url, "list", "--json").stdout) == []


def test_closed_and_full_streams_notepad_files_and_large_bodies_are_said(
        server: Server, tmp_path: Path) -> None:
    """Each showed a traceback, or blamed the server; a body over the limit was heard as
    "cannot reach Offload" about one time in two (the server cut it off unread)."""
    def run(*args: str, stdin: Any = None, stdout: Any = subprocess.PIPE,
            closing: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
        def close() -> None:  # in the child, before it runs: `>&-`, `<&-`, `2>&-`
            for fd in closing:
                os.close(fd)

        done = subprocess.run(
            [sys.executable, "-m", "jobs", *args], env=cli_env(server.url), cwd=ROOT / "tests",
            stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120,
            preexec_fn=close)
        assert "Traceback" not in done.stderr, done.stderr
        return done

    closed_out = run("submit", "sleep", closing=(1,))  # `offload submit sleep >&-`
    assert closed_out.returncode == 2, closed_out
    assert "standard output is closed: give it one" in closed_out.stderr
    with open("/dev/full", "w") as full:
        lost = run("list", stdout=full)
    assert lost.returncode == 2 and "cannot write its output (No space left" in lost.stderr
    for option in ("--input", "--inputs"):  # `... --input - <&-`
        closed_in = run("submit", "sleep", option, "-", closing=(0,))
        assert closed_in.returncode == 2, closed_in
        assert f"{option} - reads stdin, which is closed" in closed_in.stderr
    assert json.loads(cli(server.url, "list", "--json").stdout) == []  # none was submitted
    # Neither stdout nor stderr, as under Windows' pythonw (a scheduled task): it runs.
    assert run("submit", "sleep", "--delay", "3600", closing=(1, 2)).returncode == 0
    assert cli(server.url, "pause").returncode == 0  # a note on stderr beside queued jobs
    assert run("list", closing=(2,)).returncode == 0  # `2>&-`: the note unheard
    assert len(json.loads(cli(server.url, "list", "--json").stdout)) == 1
    notepad = tmp_path / "input.json"
    notepad.write_bytes(b'\xef\xbb\xbf{"seconds": 0}\r\n')  # as Notepad saves it
    for args, stdin in ((["--input", f"@{notepad}"], None), (["--input", "-"], notepad),
                        (["--inputs", f"@{notepad}"], None)):  # `@` as --input takes it
        with open(stdin or os.devnull, "rb") as given:
            taken = run("submit", "sleep", *args, stdin=given)
        assert taken.returncode == 0 and p.is_valid_id(taken.stdout.strip()), (args, taken)
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"prompt": "x" * 1_500_000}))
    lines = tmp_path / "big.jsonl"
    lines.write_text("".join(json.dumps({"prompt": "y" * 90_000}) + "\n" for _ in range(15)))
    for _ in range(10):
        for args, said in ((["--input", f"@{big}"], "send a smaller input"),
                           (["--inputs", str(lines)], f"split {lines} into files of fewer")):
            refused = run("submit", "chat", *args)
            assert refused.returncode == 2 and "request body too large" in refused.stderr, (
                args, refused.stderr)
            assert said in refused.stderr, refused.stderr
    # Read whole, an endless input filled the memory, and ended in a MemoryError's traceback.
    for args in (["--input", "@/dev/zero"], ["--inputs", "/dev/zero"], ["--inputs", "-"]):
        with open("/dev/zero", "rb") as endless:
            refused = run("submit", "sleep", *args, stdin=endless)
        assert refused.returncode == 2 and "is over 16 MB, and a request takes at most 1 MB" in (
            refused.stderr), (args, refused.stderr)


def test_another_program_at_the_address_is_named_not_crashed_on() -> None:
    """A web server of another kind on Offload's port: JSON of other shapes, a page where
    an event stream goes. Before: tracebacks, and `--follow` reconnected for ever."""
    from http.server import ThreadingHTTPServer

    from tests.http_fake import JSONHandler, ScriptedServer

    class Other(JSONHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/elsewhere/"):  # as `python -m http.server` has it
                self.send_error(404, "File not found")
            elif self.path.startswith("/plain/"):  # its answer to a POST
                self.send_error(501, f"Unsupported method ('{self.command}')")
            elif self.path.endswith("/events"):
                self._html("<html>hello</html>")
            else:
                self._json(200, self.server.fake.answer)  # type: ignore[attr-defined]

        do_POST = do_PUT = do_DELETE = do_GET

    job_id = "0" * 32
    with ScriptedServer(ThreadingHTTPServer(("127.0.0.1", 0), Other)) as other:
        url = f"http://127.0.0.1:{other.port}"
        for answer in ({}, [1, 2], {"jobs": [{"id": 1, "created_at": "not a time"}]}):
            other.answer = answer  # type: ignore[attr-defined]
            for args in (["status"], ["list"], ["show", job_id], ["submit", "sleep"],
                         ["cancel", job_id], ["schedules"], ["pause"], ["parallel"],
                         ["parallel", "2"], ["list", "--all"]):
                done = cli(url, *args)  # was 0 for some: `pause` said "queue running"
                assert done.returncode == 7, (answer, args, done.stdout, done.stderr)
                # another program, or an older Offload
                assert ("is it Offload?" in done.stderr
                        or "this server is older" in done.stderr), done
        other.answer = {"id": job_id, "state": "running"}  # type: ignore[attr-defined]
        for args in (["log", job_id, "--follow"], ["submit", "sleep", "--wait"]):
            done = cli(url, *args)
            assert done.returncode == 7 and "answered no event stream" in done.stderr, done
        for args in (["status"], ["show", job_id], ["pause", "nightly"]):  # was "no such job"
            done = cli(f"{url}/elsewhere", *args)
            assert done.returncode == 7, done
            assert done.stderr == (f"offload: HTTP 404 File not found at {url}/elsewhere: is "
                                   "that Offload's address (as http://HOST:PORT, without "
                                   "/api)?\n"), done
        for args in (["submit", "sleep"], ["pause"]):  # was "HTTP 501 ...", no more
            done = cli(f"{url}/plain", *args)
            assert (done.returncode, done.stderr) == (7, (
                "offload: HTTP 501 Unsupported method ('POST') from "
                f"{url}/plain: is it Offload?\n")), done


def test_a_program_that_speaks_no_http_at_the_address_is_named() -> None:
    # An SSH server on the port given: "cannot reach Offload at ...: SSH-2.0-OpenSSH_9.2",
    # its line break and carriage return in the message, exit 3, "Is it running?".
    import socket

    over = threading.Event()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        # Ended before the listener closes: a thread left in accept() can take the number
        # of a later test's socket.
        listener.settimeout(0.2)

        def greet() -> None:
            while not over.is_set():
                try:
                    connection, _ = listener.accept()
                except TimeoutError:
                    continue
                with connection:
                    connection.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
                    connection.settimeout(30)
                    with contextlib.suppress(OSError):  # as sshd: reads until the client leaves
                        while connection.recv(65536):
                            pass

        greeter = threading.Thread(target=greet, daemon=True)
        greeter.start()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        try:
            said = [cli(url, *args) for args in (["status"], ["wait", "0" * 32],
                                                 ["submit", "sleep"])]
        finally:
            over.set()
            greeter.join(60)
    for done in said:
        assert (done.returncode, done.stderr) == (7, (
            f"offload: what answers at {url} does not speak HTTP (it said "
            "'SSH-2.0-OpenSSH_9.2'): is that Offload's address?\n")), done


def test_a_server_before_next_before_is_listed_whole_when_one_page_holds_it() -> None:
    """A 0.9 server gives no `next_before` and ignores `before`: `list --all` refused it
    (exit 7) though one page held every job. It lists them; where a page is full, or
    `--before` is given, it still says the server is older."""
    from http.server import ThreadingHTTPServer

    from tests.http_fake import JSONHandler, ScriptedServer

    job = {"id": "a" * 32, "kind": "sleep", "state": "completed"}

    class Older(JSONHandler):
        def do_GET(self) -> None:
            self._json(200, {"jobs": [job] * self.server.fake.jobs})  # type: ignore[attr-defined]

    with ScriptedServer(ThreadingHTTPServer(("127.0.0.1", 0), Older)) as older:
        url = f"http://127.0.0.1:{older.port}"
        older.jobs = 1  # type: ignore[attr-defined]
        listed = cli(url, "list", "--all", "--json")
        assert (listed.returncode, json.loads(listed.stdout)) == (0, [job]), listed
        for args in (["--before", job["id"]], ["--all"]):
            older.jobs = 1000 if args == ["--all"] else 1  # type: ignore[attr-defined]
            refused = cli(url, "list", *args)
            assert refused.returncode == 7, refused
            assert refused.stderr.startswith("offload: this server is older: it lists no "
                                             "further than its newest 1000 jobs"), refused


def test_a_server_before_next_before_is_not_asked_for_several_states_or_kinds() -> None:
    """A 0.9 server takes the last `state` (or `kind`) given alone: `list --state queued
    --state running` listed the running jobs, exit 0, as if none were queued."""
    from http.server import ThreadingHTTPServer

    from tests.http_fake import JSONHandler, ScriptedServer

    jobs = [{"id": "a" * 32, "kind": "sleep", "state": "queued"},
            {"id": "b" * 32, "kind": "chat", "state": "running"}]

    class Older(JSONHandler):
        def do_GET(self) -> None:
            asked = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            last = {name: values[-1] for name, values in asked.items()}
            self._json(200, {"jobs": [job for job in jobs if all(
                last.get(name, job[name]) == job[name] for name in ("state", "kind"))]})

    with ScriptedServer(ThreadingHTTPServer(("127.0.0.1", 0), Older)) as older:
        url = f"http://127.0.0.1:{older.port}"
        for args in (["--state", "queued", "--state", "running"],
                     ["--kind", "sleep", "--kind", "chat", "--all"]):
            refused = cli(url, "list", *args, "--json")
            assert (refused.returncode, refused.stdout) == (7, ""), refused
            assert refused.stderr.startswith("offload: this server is older: it lists the "
                                             "jobs of one state and one kind at a time"), refused
        once = cli(url, "list", "--state", "queued", "--state", "queued", "--json")
        assert json.loads(once.stdout) == jobs[:1], once
        # Nor those that act on what it lists: `cancel --state queued --kind sleep --kind
        # chat` found no queued chat and said nothing was to be cancelled, exit 0.
        for command, state in (("cancel", "queued"), ("remove", "finished"),
                               ("retry", "failed")):
            refused = cli(url, command, "--state", state, "--kind", "sleep", "--kind", "chat")
            assert refused.returncode == 7, refused
            assert refused.stderr.startswith("offload: this server is older"), refused


def test_another_programs_ok_to_everything_is_no_job_nor_queue_nor_log() -> None:
    """A server that answers 200 and the same thing to every request: JSON that is no job
    (`{"id": 5, ...}`), or a page. Before: `submit` and `retry` printed 5, `show` junk,
    `pause` and `resume` "queue running", `schedules` "no schedules", `log` the page; all
    exit 0."""
    from http.server import ThreadingHTTPServer

    from tests.http_fake import JSONHandler, ScriptedServer

    class OkToAll(JSONHandler):
        def do_GET(self) -> None:
            body, kind = self.server.fake.answer  # type: ignore[attr-defined]
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_PUT = do_DELETE = do_GET

    job_id = "0123456789abcdef" * 2
    page = (b"<!doctype html><html><body>It works!</body></html>", "text/html; charset=utf-8")
    on_jobs = [["submit", "sleep"], ["submit", "sleep", "--wait"], ["retry", job_id],
               ["show", job_id], ["wait", job_id], ["list"], ["cancel", job_id]]
    on_queue = [["pause"], ["resume"], ["pause", "nightly"], ["resume", "nightly"],
                ["schedules"]]
    every = [*on_jobs, *on_queue, ["log", job_id], ["status"]]
    with ScriptedServer(ThreadingHTTPServer(("127.0.0.1", 0), OkToAll)) as other:
        url = f"http://127.0.0.1:{other.port}"
        for answer, commands in (
                ((b'{"id": 5, "status": "ok"}', "application/json"),
                 every + [[*args, "--json"] for args in every]),
                (page, every),
                ((json.dumps({"id": job_id, "status": "ok"}).encode(), "application/json"),
                 on_jobs),  # an id, no state
                ((b'{"id": "Job-5", "state": "queued"}', "application/json"), on_jobs),
                ((b'{"paused": "no", "name": 5, "schedules": [5]}', "application/json"),
                 on_queue)):
            other.answer = answer  # type: ignore[attr-defined]
            with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
                runs = list(pool.map(lambda args: cli(url, *args), commands))
            for args, done in zip(commands, runs, strict=True):
                said = (answer[0][:30], args, done.stdout, done.stderr)
                assert done.returncode == 7, said
                # cancel's --json: the jobs cancelled, none (each failure on stderr)
                assert done.stdout == ("[]\n" if args[0] == "cancel" and "--json" in args
                                       else ""), said
                assert done.stderr.startswith("offload: "), said
                assert done.stderr.endswith(": is it Offload?\n"), said
                assert done.stderr.count("\n") == 1, said
                assert "Error" not in done.stderr, said  # what is wrong, not an exception
        other.answer = (b'{"id": 5}', "application/json")  # type: ignore[attr-defined]
        done = cli(url, "submit", "sleep")
        assert done.stderr == (f"offload: the answer from {url} is not shaped as Offload's "
                               "(a job expected, its 'id' is 5): is it Offload?\n"), done
        other.answer = (b"a log line\n", "application/json")  # type: ignore[attr-defined]
        done = cli(url, "log", job_id)
        assert (done.returncode, done.stdout) == (7, ""), done
        assert done.stderr == (f"offload: the answer from {url} is not shaped as Offload's "
                               "(application/json where a log is text/plain): is it "
                               "Offload?\n"), done


@pytest.mark.skipif(sys.platform == "win32", reason="SIGSTOP")
def test_a_cancel_that_has_not_taken_yet_is_said_so(make_server: MakeServer) -> None:
    # With the supervisor stopped, the job stayed queued and `cancel` printed "ID queued",
    # exit 0 (and the job, in --json's list, as if cancelled; then, left out of it).
    server = make_server(env={"OFFLOAD_STOP_GRACE_S": "0.5"})
    assert server.proc is not None
    job_id = cli(server.url, "submit", "sleep", "--delay", "600").stdout.strip()
    supervisor = next(each for each in psutil.Process(server.proc.pid).children()
                      if "jobs.supervisor" in each.cmdline())
    supervisor.suspend()
    try:
        held = cli(server.url, "cancel", job_id, "--json")
        assert held.returncode == 7, held
        assert f"{job_id}: cancel asked, but the job is still queued" in held.stderr
        assert "is the supervisor running (offload status)?" in held.stderr
        assert [(job["id"], job["state"]) for job in json.loads(held.stdout)] == [
            (job_id, "queued")], held  # as it is
    finally:
        supervisor.resume()
    done = cli(server.url, "wait", job_id, "--json")
    assert [job["state"] for job in json.loads(done.stdout)] == ["cancelled"], done


@pytest.mark.slow
@pytest.mark.timeout(300)  # 1100 jobs listed, cancelled and removed, a request each
def test_cancel_by_state_goes_past_a_listings_length(make_server: MakeServer,
                                                     data_dir: Path) -> None:
    """A listing holds the newest 1000: the older queued jobs, the next to start, were
    left, and nothing said so."""
    from jobs.store.job_store import JobStore

    store, later = JobStore(data_dir / "jobs"), p.iso(time.time() + 3600)
    # A running job, and the oldest queued one, which depends on it: on the last page.
    running = store.create("sleep", {"seconds": 3600}, 3600)["id"]
    dependant = store.create("sleep", {"seconds": 0}, 30,
                             fields={p.F_DEPENDS_ON: [running]})["id"]
    waiting = {store.create("sleep", {"seconds": 0}, 30, fields={p.F_RUN_AT: later})["id"]
               for _ in range(1100)}
    queued = waiting | {dependant}
    server = make_server(env={"OFFLOAD_MAX_QUEUED": "5000"})
    with server.client() as client:
        wait_job(client, running, "running")
    # Listed past 1000 too, page after page, each job once.
    listed = cli(server.url, "list", "--state", "queued", "--all", "--json")
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert sorted(job["id"] for job in json.loads(listed.stdout)) == sorted(queued)
    first = cli(None, "list", "--url", server.url, "--state", "queued", "--limit", "1000")
    hint = first.stderr.split()
    assert hint[:10] == ["older", "ones:", "offload", "list", "--url", server.url, "--state",
                         "queued", "--limit", "1000"], first.stderr  # the same listing's next
    older = cli(server.url, "list", "--state", "queued", "--before", hint[11], "--limit", "200")
    assert len(older.stdout.splitlines()) == 1 + 101 and older.stderr == ""
    # Every queued job before the running one it depends on, on a page of its own (that
    # one was cancelled with the first page, and the dependant failed).
    swept = cli(server.url, "cancel", "--state", "live", "--json")
    assert swept.returncode == 0, swept.stderr[-2000:]
    assert {job["id"]: job["state"] for job in json.loads(swept.stdout)} == {  # one array
        job_id: "cancelled" for job_id in queued | {running}}
    for state in ("queued", "running"):
        assert json.loads(cli(server.url, "list", "--state", state, "--json").stdout) == []
    # Removed past 1000 too, though one on the first page cannot be (its folder made
    # immutable): the pages after it were listed and left as they were.
    newest = max(waiting, key=lambda job_id: store.read(job_id)[p.F_CREATED_AT])
    folder = data_dir / "jobs" / newest
    subprocess.run(["chattr", "+i", str(folder)], check=True)
    try:
        cleaned = cli(server.url, "remove", "--state", "finished")
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    assert cleaned.returncode == 7 and f"job {newest} could not be removed" in cleaned.stderr
    assert len(cleaned.stdout.splitlines()) == len(queued) + 1 - 1
    left = json.loads(cli(server.url, "list", "--json").stdout)
    assert [job["id"] for job in left] == [newest], len(left)


def _on_a_terminal(url: str, *args: str) -> str:
    """What `offload ARGS` writes to a terminal (a pseudo-terminal here)."""
    import pty  # POSIX only

    master, slave = pty.openpty()
    try:
        subprocess.run([sys.executable, "-m", "jobs", *args], env=cli_env(url),
                       cwd=ROOT / "tests", stdout=slave, stderr=subprocess.DEVNULL, timeout=120)
        os.close(slave)
        slave = -1
        out = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: all read, and the other end closed
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
        if slave != -1:
            os.close(slave)
    return out.decode(errors="replace")


@pytest.mark.skipif(os.name != "posix", reason="a pseudo-terminal")
def test_a_jobs_escape_sequences_are_not_played_on_a_terminal(make_server: MakeServer) -> None:
    # A model's reply (or any job's error or log) held sequences that retitled the
    # terminal and cleared it: `offload show` and `offload log` wrote them out raw.
    # A carriage return wrote over what the line showed, and U+202E turned the text around.
    url = make_server().url
    attack = "\x1b]0;PWNED\x07\x1b[2J\x1b[31mred FAILED\rOK \u202eevil"
    job = json.loads(cli(url, "submit", "probe", "--input", json.dumps({"fail": attack}),
                         "--wait", "--json").stdout)
    assert job["error"]["message"] == attack
    assert "\x1b" not in _on_a_terminal(url, "list")  # its NOTE: the error
    for command in ("show", "log"):
        shown = _on_a_terminal(url, command, job["id"])
        assert "\x1b" not in shown and "\x07" not in shown and "\u202e" not in shown, shown
        assert "\\x1b]0;PWNED\\x07\\x1b[2J\\x1b[31mred FAILED" in shown, shown
        assert "OK \\u202eevil" in shown, shown
        # A runner's own log keeps its carriage returns: they redraw its progress bars.
        assert ("FAILED\\x0dOK" in shown) is (command == "show"), shown
        # Into a pipe as it is (read here as text: its carriage return as a newline).
        assert attack.replace("\r", "\n") in cli(url, command, job["id"]).stdout


def test_a_line_end_split_between_two_pieces_of_a_reply_is_followed_as_one(
        make_server: MakeServer) -> None:
    # A CRLF whose CR ended one piece streamed, and whose LF began the next, was shown as
    # a lone carriage return: `\x0d`.
    url = make_server().url
    pieces = ["start\r\n", "line one\r", "\nline two\r", "\n"]
    job_id = cli(url, "submit", "probe", "--input", json.dumps(
        {"pieces": pieces, "piece_gap_s": 1})).stdout.strip()
    shown = _on_a_terminal(url, "log", "--follow", job_id)
    # The terminal turns each LF into CR LF.
    assert "start\r\r\nline one\r\r\nline two\r\r\n" in shown, repr(shown)
    assert "\\x0d" not in shown, repr(shown)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGSTOP")
@pytest.mark.timeout(120)  # the health calls a supervisor stalled after 15 s of silence
def test_a_wait_for_a_job_a_stalled_supervisor_holds_says_so(make_server: MakeServer) -> None:
    # The wait said nothing: a queued job that no supervisor starts looked like a long queue.
    server = make_server()
    assert server.proc is not None
    supervisor = next(each for each in psutil.Process(server.proc.pid).children()
                      if "jobs.supervisor" in each.cmdline())
    with server.client() as client:
        def until_supervisor(said: str) -> None:
            deadline = time.monotonic() + 60
            while (health := client.get("/api/health").json())["supervisor"] != said:
                assert time.monotonic() < deadline, (said, health["supervisor"])
                time.sleep(0.5)

        until_supervisor("running")  # it leads: stopped before, it would be "starting"
        samples = server.data_dir / "history" / "metrics.jsonl"
        deadline = time.monotonic() + 30
        while not samples.exists():  # stalled is said of a leader silent since its last
            assert time.monotonic() < deadline, "the supervisor recorded no sample"
            time.sleep(0.2)
        supervisor.suspend()
        try:
            until_supervisor("stalled")
            # A monitor that reads the status alone saw "ok"; and the way on is said.
            health = client.get("/api/health").json()
            assert health["status"] == "degraded", health
            assert health["problems"] == [
                f"the supervisor leading this data folder (pid {supervisor.pid}) has shown "
                "no sign of life for 15 s (stopped or hung): no job starts or ends; end its "
                "process and another takes the lead within seconds, or restart the server"]
            status = cli(server.url, "status")
            assert status.returncode == 7 and health["problems"][0] in status.stderr, status
            with start_cli(server.url, "submit", "sleep", "--wait") as waiter:
                said = Reader(waiter.stderr)
                deadline = time.monotonic() + 60
                while "stalled" not in said.text:
                    assert time.monotonic() < deadline and waiter.poll() is None, said.text
                    time.sleep(0.1)
                assert ("offload: the supervisor is stalled (stopped or hung): it starts once "
                        "it runs again; see offload status\n") in said.text
                supervisor.resume()
                assert waiter.wait(60) == 0, said.done()
        finally:
            supervisor.resume()


@pytest.mark.skipif(sys.platform == "win32", reason="a working folder in use is not deleted")
def test_a_gone_working_folder_a_gone_reader_and_an_untrusted_server_are_said(
        server: Server, tmp_path: Path) -> None:
    """A deleted working folder was said as "cannot write its output"; the ids of jobs
    just stored, written to a pipe whose reader had left, were lost with exit 0; a server
    whose certificate is not trusted was "cannot reach Offload ... Is it running?"."""
    gone = subprocess.run(  # a shell's `cd d; rmdir ../d; offload list`
        ["sh", "-c", 'mkdir gone && cd gone && rmdir ../gone && exec "$0" -m jobs list',
         sys.executable], env=cli_env(server.url), cwd=tmp_path, capture_output=True,
        text=True, timeout=120)
    assert (gone.returncode, gone.stderr) == (0, ""), gone
    # A job waited for that failed, its reader gone (`offload wait ID | true`): exit 0,
    # unsaid, where a script tells a failure by the exit code.
    for args, code in ((["submit", "sleep", "--delay", "3600"], 2), (["list"], 0),
                       (["submit", "sleep", "--input", '{"seconds": 30}', "--timeout", "0.5",
                         "--wait"], 1)):
        read, write = os.pipe()
        os.close(read)  # `offload submit ... | (exec 0<&-; ...)`: the reader has left
        try:
            done = subprocess.run([sys.executable, "-m", "jobs", *args], env=cli_env(server.url),
                                  cwd=ROOT / "tests", stdout=write, stderr=subprocess.PIPE,
                                  text=True, timeout=120)
        finally:
            os.close(write)
        assert "Traceback" not in done.stderr, done.stderr
        assert done.returncode == code, (args, done)
        if code == 1:
            assert "timeout" in done.stderr, done.stderr
        elif code:
            assert done.stderr == ("offload: its output was not read (the reader left); the "
                                   "jobs are stored: offload list shows them\n"), done.stderr
    read, write = os.pipe()
    os.close(read)
    try:  # `2>&1 | head`: nowhere to say it either; a traceback, exit 1
        both = subprocess.run([sys.executable, "-m", "jobs", "submit", "sleep", "--delay",
                               "3600"], env=cli_env(server.url), cwd=ROOT / "tests",
                              stdout=write, stderr=write, timeout=120)
    finally:
        os.close(write)
    assert both.returncode == 2, both
    assert len(json.loads(cli(server.url, "list", "--json").stdout)) == 3
    openssl = shutil.which("openssl")
    assert openssl, "openssl makes the test's certificate (Debian's openssl package)"
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def answer() -> None:  # a handshake the client gives up on
            with contextlib.suppress(OSError):  # the listener closed, the handshake failed
                conn, _ = listener.accept()
                with conn, tls.wrap_socket(conn, server_side=True):
                    pass

        # Ended before the listener closes: a thread left in accept() took the number of
        # a later test's socket.
        listener.settimeout(60)
        handshake = threading.Thread(target=answer, daemon=True)
        handshake.start()
        url = f"https://127.0.0.1:{listener.getsockname()[1]}"
        untrusted = cli(url, "status")
        handshake.join(60)
    assert untrusted.returncode == 2, untrusted
    assert f"offload: no secure connection to {url}: " in untrusted.stderr, untrusted.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr, untrusted.stderr
    assert "Give the server a certificate this machine trusts" in untrusted.stderr


def test_a_submission_whose_answer_is_lost_is_sent_again_without_a_second_job(
        server: Server) -> None:
    """It said "cannot reach Offload ... Is it running?" while the job was stored, and
    sent again as said, the job was stored twice."""
    def answer_lost(listener: socket.socket) -> None:  # the submission passed on to the
        with contextlib.suppress(OSError):             # server, its answer dropped
            conn, _ = listener.accept()
            with conn, socket.create_connection(("127.0.0.1", server.port)) as upstream:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length:")))
                while len(body) < length:
                    body += conn.recv(65536)
                upstream.sendall(head + b"\r\n\r\n" + body)
                upstream.recv(65536)  # the 202, never passed on

    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(60)  # ended before the listener closes, as in the test above
        proxy = threading.Thread(target=answer_lost, args=(listener,), daemon=True)
        proxy.start()
        lost = cli(f"http://127.0.0.1:{listener.getsockname()[1]}", "submit", "sleep",
                   "--delay", "3600")
        proxy.join(60)
    assert lost.returncode == 3, lost
    assert "; the job may be stored: the same command again with --key " in lost.stderr
    key = lost.stderr.split("--key ")[1].split()[0]
    stored = json.loads(cli(server.url, "list", "--json").stdout)
    assert len(stored) == 1, "the request reached the server"
    again = cli(server.url, "submit", "sleep", "--delay", "3600", "--key", key)
    assert (again.returncode, again.stdout.strip()) == (0, stored[0]["id"]), again
    assert len(json.loads(cli(server.url, "list", "--json").stdout)) == 1
