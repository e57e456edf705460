"""Chats, logs and results are their owner's only: every process Offload starts creates
folders 0700 and files 0600, and an open data folder is tightened at start.

Each test sets the umask of this process (which the server inherits) to the usual 022
first, so that only Offload's own umask can make the files private.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from jobs import protocol as p
from jobs.protocol.counters import COUNTERS_FILE
from tests.conftest import free_port, start_process, stop_process, wait_for
from tests.server import Server
from tests.test_launch import start_dashboard_pyw

pytestmark = pytest.mark.skipif(os.name != "posix",
                                reason="POSIX modes; on Windows the profile's ACLs decide")
MakeServer = Callable[..., Server]
NO_MODEL = {"OFFLOAD_LOCAL_MODEL": "/nonexistent/model.gguf"}  # llm.json, no model to load
TIGHTENED = "was open to other accounts"


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _open_to_others(top: Path) -> list[str]:
    """Everything under `top` (and `top`) that is not 0700 / 0600."""
    wrong = []
    for path in [top, *top.rglob("*")]:
        if path.is_symlink():
            continue
        want = 0o700 if path.is_dir() else 0o600
        if _mode(path) != want:
            wrong.append(f"{path.relative_to(top.parent)}: {_mode(path):04o}")
    return wrong


def _final(client: httpx.Client, job_id: str, timeout: float = 60) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        job = client.get(f"/api/jobs/{job_id}").json()
        return job if job["state"] in p.FINAL_STATES else None

    return wait_for(check, timeout, 0.05, f"job {job_id} to finish")


def _umask(pid: int) -> str:
    with open(f"/proc/{pid}/status") as f:
        return next(line.split()[1] for line in f if line.startswith("Umask:"))


def _umasks(api_pid: int) -> dict[str, str]:
    """The umask of the API and of what it started, by role (from their command lines);
    a process that ends meanwhile (a runner that is a zombie until reaped) left out."""
    found = {"api": _umask(api_pid)}
    for child in psutil.Process(api_pid).children(recursive=True):
        try:
            line = " ".join(child.cmdline())
            for role in ("jobs.supervisor", "jobs.launch.forkserver", "runners.sleep"):
                if role in line:
                    found[role] = _umask(child.pid)
        except (psutil.Error, OSError):
            continue
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/status")
def test_every_file_and_folder_offload_creates_is_private(make_server: MakeServer,
                                                          tmp_path: Path) -> None:
    schedules = tmp_path / "schedules.toml"
    schedules.write_text("[nightly]\nkind = 'sleep'\nevery = '1d'\n")
    server = make_server(env={**NO_MODEL, "OFFLOAD_SCHEDULES_FILE": str(schedules)})
    data = server.data_dir
    with server.client() as client:
        done = client.post("/api/jobs", json={"kind": "sleep", "input": {
            "seconds": 0.3, "steps": 3}}, headers={"Idempotency-Key": "k-1"}).json()
        long = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 60}}).json()
        wait_for(lambda: client.get(f"/api/jobs/{long['id']}").json()["state"] == "running",
                 what="the long job to run")
        assert server.proc is not None
        umasks = _umasks(server.proc.pid)
        assert client.delete(f"/api/jobs/{long['id']}").json()["state"] == "cancelled"
        assert _final(client, done["id"])["state"] == "completed"
        wait_for(lambda: (data / "history" / "metrics.jsonl").exists() and
                 (data / "llm.json").exists() and (data / COUNTERS_FILE).exists(),
                 what="the metrics, the LLM status and the job counters")
        wait_for(lambda: client.get("/api/schedules").json()["schedules"][0]["last_job_id"],
                 what="the schedule's job")
        assert client.post("/api/schedules/nightly/pause").status_code == 200
        assert client.post("/api/queue/pause").status_code == 200
    # API, supervisor, fork server (Linux) and a runner: each sets it
    assert set(umasks) >= {"api", "jobs.supervisor", "runners.sleep"}, umasks
    assert set(umasks.values()) == {"0077"}, umasks
    expected = [data / "jobs" / done["id"] / name for name in (p.JOB_FILE, p.LOG_FILE,
                                                                 p.RUN_FILE)]
    expected += [data / "jobs" / long["id"] / p.STOP_FILE, data / "supervisor.log",
                 data / "history" / "metrics.jsonl", data / "llm.json", data / "queue.paused",
                 data / "schedules" / "nightly.paused", data / "schedules" / "nightly.json",
                 data / COUNTERS_FILE]
    missing = [str(path) for path in expected if not path.is_file()]
    assert not missing, missing
    assert list((data / "idempotency").glob("*.json")), "no Idempotency-Key was recorded"
    assert not _open_to_others(data)


def _old_data_folder(data: Path, outside: Path) -> list[Path]:
    """A data folder as an earlier version left it: folders 0755, files 0644; and a
    link to a file outside it, which must not be touched."""
    job_id = p.new_id()
    job = p.new_job(job_id, "sleep", {"seconds": 0}, 30)
    job.update({p.F_STATE: p.JobState.COMPLETED, p.F_FINISHED_AT: p.now_iso(), p.F_RESULT: {}})
    files = {data / "jobs" / job_id / p.JOB_FILE: job,
             data / "idempotency" / f"{'0' * 64}.json": {"job_id": job_id},
             data / "llm.json": {"ready": False}}
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        p.write_json(path, content)
    (data / "jobs" / job_id / p.LOG_FILE).write_text("a secret chat\n")
    (data / "history").mkdir()
    (data / "history" / "metrics.jsonl").write_text("")
    outside.write_text("not Offload's\n")
    (data / "elsewhere").symlink_to(outside)
    for path in [data, *data.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
    return list(files)


@pytest.mark.parametrize("first", ["api", "supervisor"])
def test_an_open_data_folder_is_tightened_at_start(first: str, make_server: MakeServer,
                                                   data_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    _old_data_folder(data_dir, outside)
    assert _open_to_others(data_dir)
    if first == "api":
        server = make_server(env=NO_MODEL)
        log = server.log
    else:  # the supervisor started by hand, before any API
        log = data_dir / "supervisor.log"  # where the daemon logs
        proc = start_process(["-m", "jobs.supervisor"], env=NO_MODEL, log=tmp_path / "daemon.out")
    try:
        wait_for(lambda: log.exists() and TIGHTENED in log.read_text(), 60, 0.1,
                 "the log to say so")
    finally:
        if first != "api":
            stop_process(proc)
    assert not _open_to_others(data_dir)
    assert _mode(outside) == 0o644  # the link was neither followed nor changed
    assert f"the data folder {data_dir} {TIGHTENED} (mode 755)" in log.read_text()


# -- another account on this machine ---------------------------------------------------


@pytest.fixture
def other_account() -> Iterator[str]:
    """A throwaway local account (needs root, useradd and runuser; removed afterwards)."""
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("needs root to add a throwaway account")
    if not (shutil.which("useradd") and shutil.which("userdel") and shutil.which("runuser")):
        pytest.skip("needs useradd, userdel and runuser")
    name = f"offload-t{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


def _refused_start(first: str, data_dir: Path, tmp_path: Path) -> Path:
    """Start the API or the supervisor (by hand) on `data_dir`, which must stop it; what
    it said."""
    out = tmp_path / f"{first}.out"
    if first == "api":
        server = Server(data_dir, out, NO_MODEL)
        try:
            with pytest.raises(AssertionError, match="server did not start"):
                server.start()
        finally:
            server.stop()
    else:  # the supervisor started by hand
        proc = start_process(["-m", "jobs.supervisor"], env=NO_MODEL, log=out)
        try:
            assert proc.wait(60) != 0
        finally:
            stop_process(proc)
    return out


@pytest.mark.parametrize("first", ["api", "supervisor"])
def test_a_data_folder_of_another_account_is_refused(first: str, other_account: str,
                                                     data_dir: Path, tmp_path: Path) -> None:
    # Made beforehand by another account (in /tmp, say), with a link to a file of ours
    # where Offload writes its log.
    mine = tmp_path / "mine.txt"
    mine.write_text("mine\n")
    data_dir.mkdir()
    (data_dir / "supervisor.log").symlink_to(mine)
    shutil.chown(data_dir, other_account)
    said = _refused_start(first, data_dir, tmp_path).read_text()
    assert f"cannot start: the data folder {data_dir} belongs to another account" in said
    assert "Traceback" not in said, said  # a line that says what to do, as for a setting
    assert mine.read_text() == "mine\n"
    assert sorted(each.name for each in data_dir.iterdir()) == ["supervisor.log"]


HEALTH_OK = """
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'{"status": "ok"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def test_launch_py_does_not_take_another_accounts_server_for_offload(
        other_account: str) -> None:
    # Its page answered /api/health as Offload does: launch.py opened the browser there and
    # started nothing; the page left a service worker that read every chat once Offload
    # served that port.
    import launch
    from launcher import serve

    port = free_port()
    python = system_python()
    theirs = subprocess.Popen(["runuser", "-u", other_account, "--", python, "-c",
                               HEALTH_OK, str(port)])
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: not serve.port_free("127.0.0.1", port), 30,
                 what="their server listening")
        assert not serve.offload_answers(url)
        options, _ = launch.parse_args(["--no-browser"])
        assert not serve.opened_if_running(url, options)
    finally:
        theirs.terminate()
        theirs.wait(30)
    ours = subprocess.Popen([sys.executable, "-c", HEALTH_OK, str(port)])  # as if Offload
    try:
        wait_for(lambda: serve.offload_answers(f"http://127.0.0.1:{port}"), 30,
                 what="our own answering")
        assert not serve.others_listen(port)
    finally:
        ours.terminate()
        ours.wait(30)


def test_a_build_cache_of_another_account_is_not_installed_from(other_account: str,
                                                                tmp_path: Path) -> None:
    # OFFLOAD_CACHE_DIR in a folder another account made (a cache shared to save the
    # build): launch.py installed the newest wheel it found there, that account's code.
    where = subprocess.run([sys.executable, "-c", "from launcher.llama import wheel_cache; "
                            "print(wheel_cache())"], cwd=p.ROOT, capture_output=True,
                           text=True, check=True,
                           env={**os.environ, "OFFLOAD_CACHE_DIR": str(tmp_path)})
    wheels = Path(where.stdout.strip()).relative_to(tmp_path)
    public = Path(tempfile.mkdtemp(prefix="offload-public-"))
    try:
        public.chmod(0o1777)  # as /tmp: any account may make a folder in it
        cache = public / "cache"
        theirs = cache / wheels / "llama_cpp_python-9.9.9-cp311-cp311-linux_x86_64.whl"
        for step in (["mkdir", "-p", str(theirs.parent)], ["touch", str(theirs)]):
            subprocess.run(["runuser", "-u", other_account, "--", *step], check=True)
        done = subprocess.run([sys.executable, "-c", "from launcher.llama import "
                               "cached_wheel; print(cached_wheel())"], cwd=p.ROOT,
                              env={**os.environ, "OFFLOAD_CACHE_DIR": str(cache)},
                              capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(public)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "9.9.9" not in done.stdout
    assert (f"[offload] refusing the build cache {cache}: the folder {cache} on the way "
            "belongs to another account") in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_start_dashboard_pyw_writes_through_no_link_of_another_account(
        other_account: str) -> None:
    # In a `var` open to it, another account's link in place of launch.log had the .pyw
    # append launch.py's output to a file of its choosing (an authorized_keys), and make
    # that file 0600.
    public = Path(tempfile.mkdtemp(prefix="offload-public-"))
    try:
        public.chmod(0o755)
        var, victim = public / "var", public / "authorized_keys"
        var.mkdir(mode=0o777)
        var.chmod(0o777)
        victim.write_bytes(b"the owner's key\n")
        victim.chmod(0o644)
        subprocess.run(["runuser", "-u", other_account, "--", "ln", "-s", str(victim),
                        str(var / "launch.log")], check=True)
        log_fd = start_dashboard_pyw().open_log(var)
        os.write(log_fd, b"what launch.py said\n")
        os.close(log_fd)
        assert victim.read_bytes() == b"the owner's key\n"
        assert stat.S_IMODE(victim.stat().st_mode) == 0o644
        log = var / "launch.log"
        assert not log.is_symlink() and log.read_bytes() == b"what launch.py said\n"
        assert log.stat().st_uid == os.geteuid() and stat.S_IMODE(log.stat().st_mode) == 0o600
    finally:
        shutil.rmtree(public)


# Takes a file's lock as another account, and holds it: flock needs no right to write.
HOLD = ("import fcntl, sys, time; f = open(sys.argv[1], 'rb'); "
        "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)")


def test_another_account_cannot_hold_up_launch_py(other_account: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # launch.py's start lock was open to every account: one that held it made each start
    # in that folder wait for good ("another start of Offload ... waiting for it").
    from launcher import start_lock

    python = system_python()
    public = Path(tempfile.mkdtemp(prefix="offload-public-"))  # a checkout all may enter
    try:
        public.chmod(0o755)
        lock = public / ".launch.lock"
        monkeypatch.setattr(start_lock, "START_LOCK", lock)
        lock.touch()
        lock.chmod(0o644)  # as an earlier version left it
        theirs = subprocess.Popen(["runuser", "-u", other_account, "--", python, "-c", HOLD,
                                   str(lock)], stdout=subprocess.PIPE, text=True,
                                  start_new_session=True)
        try:
            assert theirs.stdout is not None and theirs.stdout.readline() == "held\n"
            started = threading.Event()

            def start() -> None:
                with start_lock.one_start_at_a_time():
                    started.set()

            threading.Thread(target=start, daemon=True).start()
            assert started.wait(10), "launch.py waited on another account's hold of its lock"
        finally:
            os.killpg(theirs.pid, signal.SIGKILL)
            theirs.communicate(timeout=30)
        attempt = _read_as(other_account, lock)  # the lock now: no other account opens it
        assert attempt.returncode != 0 and "Permission denied" in attempt.stderr, attempt
        assert sorted(each.name for each in public.iterdir()) == [".launch.lock"]
    finally:
        shutil.rmtree(public, ignore_errors=True)


def test_a_settings_file_put_there_after_the_look_is_refused(
        other_account: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Not there at the look, so "safe"; another account's, put in a shared folder (/tmp) a
    # moment later, before the opening, was read: its schedule ran as the owner, its
    # OFFLOAD_URL had the CLI send the token there. The moment is scripted.
    from jobs import schedules

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    path = shared / "schedules.toml"
    real_open = os.open

    def put_first(file: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if os.fspath(file) == str(path) and not path.exists():
            path.write_text('[pwn]\nkind = "sleep"\nevery = "1m"\n')
            shutil.chown(path, other_account)
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", put_first)
    with pytest.raises(schedules.ScheduleError) as refused:
        schedules.load(path)
    assert f"refusing to read the schedules file {path}: it belongs to another account" in str(
        refused.value)


@pytest.mark.parametrize("where", ["data", "above"])
def test_a_data_folder_another_account_makes_first_is_refused(
        where: str, other_account: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Not there at the look: taken as to be ours. Another account made it (or a folder on
    # its way) a moment later, before Offload's own mkdir, with an ACL that let it read
    # every chat; the API went on in it. The moment is scripted: no race is won on demand.
    from jobs.store import private

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # as /tmp
    data = shared / "above" / "data" if where == "above" else shared / "data"
    theirs = data.parent if where == "above" else data
    real_mkdir = Path.mkdir

    def made_first(self: Path, *args: Any, **kwargs: Any) -> None:
        if not theirs.exists():
            real_mkdir(theirs, mode=0o777)
            shutil.chown(theirs, other_account)
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", made_first)
    with pytest.raises(private.UnsafeDataFolder) as refused:
        private.refuse_foreign(data)
    said = str(refused.value)
    assert (f"the data folder {data} belongs to another account" in said if where == "data"
            else f"the folder {theirs} on the way belongs to another account" in said), said


@pytest.mark.parametrize("way", ["their link", "our link to theirs", "their folder",
                                 "back from a folder not there", "a loop"])
def test_a_data_folder_another_account_can_redirect_or_swap_is_refused(
        way: str, other_account: str, tmp_path: Path) -> None:
    # Their link in a shared folder sent the data folder to a folder of ours, whose files
    # were tightened and filled with jobs; from a folder above it that they could change,
    # they swapped the data folder for their own, with a job and a log linked to our file.
    import pwd  # POSIX only

    uid = pwd.getpwnam(other_account).pw_uid
    ours = tmp_path / "ours"
    ours.mkdir(mode=0o755)
    (ours / "notes.txt").write_text("mine\n")
    (ours / "notes.txt").chmod(0o644)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # as /tmp: each one's entries are its own
    theirs = shared / "offload-data"
    if way == "a loop":  # a traceback at start, from Path.resolve
        (tmp_path / "one").symlink_to(tmp_path / "two")
        (tmp_path / "two").symlink_to(tmp_path / "one")
        data = tmp_path / "one" / "data"
        said = f"{tmp_path / 'one'} leads through links that do not end (a loop)"
    elif way != "their folder":
        theirs.symlink_to(ours)
        os.lchown(theirs, uid, -1)
        said = f"{theirs} is a link of another account (uid {uid})"
        data = theirs
        if way == "our link to theirs":  # followed as the system would
            data = tmp_path / "my-data"
            data.symlink_to(theirs)
        elif way == "back from a folder not there":  # Path.resolve takes `..` as text
            data = tmp_path / "not-there" / ".." / "shared" / "offload-data"
    else:  # they could put a data folder of theirs in its place
        (shared / "theirs").mkdir()
        shutil.chown(shared / "theirs", other_account)
        data = shared / "theirs" / "data"
        said = f"the folder {shared / 'theirs'} on the way belongs to another account (uid {uid})"
    out = tmp_path / "api.out"
    server = Server(data, out, NO_MODEL)
    try:
        with pytest.raises(AssertionError, match="server did not start"):
            server.start()
    finally:
        server.stop()
    assert said in out.read_text(), out.read_text()[-2000:]
    assert "Traceback" not in out.read_text()
    assert sorted(each.name for each in ours.iterdir()) == ["notes.txt"]
    assert (_mode(ours), _mode(ours / "notes.txt")) == (0o755, 0o644)
    assert not (shared / "theirs" / "data").exists()


def test_a_link_in_place_of_a_log_is_not_written_through(make_server: MakeServer,
                                                          data_dir: Path, tmp_path: Path) -> None:
    # A runner's output was appended (and capped) through whatever stood at job.log.
    server = make_server(env=NO_MODEL)
    mine = tmp_path / "mine.txt"
    mine.write_text("mine\n")
    with server.client() as client:
        job = client.post("/api/jobs", json={"kind": "probe", "delay_s": 2, "input": {
            "spew": True, "seconds": 0.2}}).json()
        (data_dir / "jobs" / job["id"] / p.LOG_FILE).symlink_to(mine)
        ended = _final(client, job["id"])
    assert ended["state"] == "failed" and "symbolic links" in ended["error"]["message"], ended
    assert mine.read_text() == "mine\n"


# One request, run as another account by the system's Python: prints status and body.
REQUEST = ("import sys, urllib.request, urllib.error\n"
           "req = urllib.request.Request(sys.argv[1], method=sys.argv[2])\n"
           "try:\n"
           "    r = urllib.request.urlopen(req, timeout=20); print(r.status, r.read().decode())\n"
           "except urllib.error.HTTPError as e:\n"
           "    print(e.code, e.read().decode())\n")


def _request_as(user: str, url: str, method: str = "GET") -> tuple[int, str]:
    python = system_python()
    done = subprocess.run(["runuser", "-u", user, "--", python, "-c", REQUEST, url, method],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    status, _, body = done.stdout.partition(" ")
    return int(status), body


@pytest.mark.skipif(sys.platform != "linux", reason="the caller's account is known on Linux")
def test_another_account_cannot_use_the_api_of_a_server_without_a_token(
        other_account: str, make_server: MakeServer) -> None:
    server = make_server(env=NO_MODEL)
    with server.client() as client:
        secret = "the owner's question"
        job = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0}}).json()
        chat = client.post("/api/ai_chat_async", json={
            "messages": [{"role": "user", "content": secret}], "session_id": "s1"}).json()
        for method, path in [("GET", f"/api/jobs/{job['id']}"), ("GET", "/api/jobs"),
                             ("GET", "/api/history"), ("GET", f"/api/jobs/{chat['job_id']}"),
                             ("POST", "/api/queue/pause"), ("DELETE", f"/api/jobs/{job['id']}"),
                             ("GET", "/")]:
            status, body = _request_as(other_account, server.url + path, method)
            assert status == 403, (method, path, status, body)
            assert "answers only the account that runs it" in body
            assert secret not in body and job["id"] not in body
        # The owner's own requests are answered as before, and nothing was changed.
        assert client.get("/api/queue").json()["paused"] is False
        assert client.get(f"/api/jobs/{job['id']}").status_code == 200
        assert secret in client.get(f"/api/jobs/{chat['job_id']}").text


# A request with a header and a body of its choosing, then a reset or a close at once (or
# its answer read), run as another account by the system's Python.
ATTACK = ("import socket, struct, sys\n"
          "port, method, path, header, body, times, end = sys.argv[1:]\n"
          "head = f'{method} {path} HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\nConnection: close\\r\\n'\n"
          "head += f'Content-Type: application/json\\r\\nContent-Length: {len(body)}\\r\\n'\n"
          "head += header + '\\r\\n' if header else ''\n"
          "for _ in range(int(times)):\n"
          "    s = socket.socket()\n"
          "    if end in ('bound', 'listener'):  # to the loopback device, as any may\n"
          "        s.setsockopt(socket.SOL_SOCKET, getattr(socket, 'SO_BINDTODEVICE', 25), b'lo')\n"
          "    if end == 'listener':  # and a listener of its own port, for a lookup to find\n"
          "        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n"
          "        lst = socket.socket()\n"
          "        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n"
          "        lst.bind(('127.0.0.1', 0)); lst.listen()\n"
          "        s.bind(lst.getsockname())\n"
          "    s.connect(('127.0.0.1', int(port)))\n"
          "    if end == 'reset':\n"
          "        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))\n"
          "    s.sendall((head + '\\r\\n' + body).encode())\n"
          "    if end in ('answer', 'bound', 'listener'):\n"
          "        print(s.makefile('rb').read().decode())\n"
          "    s.close()\n")


def _attack_as(user: str, port: int, method: str, path: str, header: str = "",
               body: str = "", times: int = 1, end: str = "answer") -> str:
    python = system_python()
    done = subprocess.run(["runuser", "-u", user, "--", python, "-c", ATTACK, str(port),
                           method, path, header, body, str(times), end],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(sys.platform != "linux", reason="the caller's account is known on Linux")
def test_another_account_cannot_pass_as_the_owner(other_account: str,
                                                 make_server: MakeServer) -> None:
    server = make_server(env=NO_MODEL)
    port = int(server.url.rsplit(":", 1)[1])
    with server.client() as client:
        assert client.get("/api/queue").json()["paused"] is False  # a connection kept open
        # uvicorn takes the client's address from X-Forwarded-For on a loopback connection:
        # naming the owner's open connection once passed for the owner.
        owners = [f"127.0.0.1:{conn.laddr.port}" for conn in psutil.Process().net_connections()
                  if conn.raddr and conn.raddr.port == port]
        assert owners
        answer = _attack_as(other_account, port, "POST", "/api/queue/pause",
                            f"X-Forwarded-For: {owners[0]}")
        assert answer.startswith("HTTP/1.1 403"), answer
        assert "not requests through a proxy (X-Forwarded-For)" in answer
        # A socket bound to the loopback device was not found by its addresses alone, and
        # was let through as one whose account could not be told.
        for end in ("bound", "listener"):  # a listener of its port answered the lookup too
            bound = _attack_as(other_account, port, "POST", "/api/queue/pause", end=end)
            assert bound.startswith("HTTP/1.1 403"), (end, bound)
            assert "answers only the account that runs it" in bound
        # A request whose connection is reset at once was looked up after the reset, found
        # no socket, and was answered as one that could not be told.
        _attack_as(other_account, port, "POST", "/api/queue/pause", times=20, end="reset")
        _attack_as(other_account, port, "POST", "/api/jobs",
                   body='{"kind": "sleep", "input": {"seconds": 0}}', times=20, end="reset")
        _attack_as(other_account, port, "POST", "/api/queue/pause", times=20, end="close")
        assert client.get("/api/queue").json()["paused"] is False
        assert client.get("/api/jobs").json()["jobs"] == []
        # The owner is answered as before.
        assert client.post("/api/queue/pause").json()["paused"] is True


# Holds connections open with unfinished requests, so that the server's descriptors run
# out, then finishes the first: run as another account by the system's Python.
HOARD = ("import socket, sys, time\n"
         "port, count = int(sys.argv[1]), int(sys.argv[2])\n"
         "held = []\n"
         "for _ in range(count):\n"
         "    s = socket.create_connection(('127.0.0.1', port))\n"
         "    s.sendall(b'GET /api/jobs HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\n')\n"
         "    held.append(s)\n"
         "time.sleep(2)  # each accepted, until the server has no descriptor left\n"
         "held[0].sendall(b'Connection: close\\r\\n\\r\\n')\n"
         "print(held[0].makefile('rb').read().decode())\n")


def system_python() -> str:
    """The system's python3 (not this .venv's, which another account may not read), for a
    program run as another account; the test is skipped without one."""
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("needs the system's python3 to run as another account")
    return python


def _listening(port: int) -> bool:
    """A connection opened and closed, no request sent: the server answers nothing."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
        return True
    return False


@pytest.mark.skipif(sys.platform != "linux", reason="the caller's account is known on Linux")
def test_another_account_that_uses_up_the_servers_descriptors_is_refused_all_the_same(
        other_account: str, data_dir: Path, tmp_path: Path) -> None:
    # The check's first lookup, failing for want of descriptors before the server's
    # first request, switched the check off for good: the other account then read and
    # erased the owner's chats.
    python = system_python()
    port = free_port()
    api = start_process(["api_entry.py"], {**NO_MODEL, "OFFLOAD_DATA_DIR": str(data_dir),
                                           "OFFLOAD_PORT": str(port)}, tmp_path / "api.log")
    try:
        wait_for(lambda: _listening(port), 60, what="the API listening")
        server = psutil.Process(api.pid)
        spare = server.num_fds() + 8  # a few descriptors to spare, as a busy server has
        server.rlimit(psutil.RLIMIT_NOFILE, (spare, spare))
        done = subprocess.run(["runuser", "-u", other_account, "--", python, "-c", HOARD,
                               str(port), "100"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("HTTP/1.1 503"), done.stdout
        assert "could not tell whose this connection is just now" in done.stdout
        assert "retry-after: 1" in done.stdout.lower()
        # Its connections closed, the check works as ever: still refused, and the owner
        # answered.
        again = _attack_as(other_account, port, "GET", "/api/jobs")
        assert again.startswith("HTTP/1.1 403"), again
        assert httpx.get(f"http://127.0.0.1:{port}/api/jobs").status_code == 200
    finally:
        stop_process(api)


# Listens on [::1] at a port (argv 1) for some seconds (argv 2), as another account would
# beside the server's 127.0.0.1.
LISTEN_ON_IPV6_LOOPBACK = ("import socket, sys, time\n"
                           "s = socket.socket(socket.AF_INET6)\n"
                           "s.bind(('::1', int(sys.argv[1]))); s.listen()\n"
                           "print('listening', flush=True); time.sleep(int(sys.argv[2]))\n")


def _ipv6_loopback() -> bool:
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        return True
    return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="needs ::1")
@pytest.mark.timeout(300)  # two starts of the server on a slow machine
def test_another_account_cannot_listen_where_localhost_leads_beside_the_server(
        other_account: str, data_dir: Path, tmp_path: Path) -> None:
    # The server listened on 127.0.0.1:P alone: another account listening on [::1]:P was
    # where localhost:P led (browsers and curl try ::1 first), and got the dashboard's
    # visits, the chats typed into its page and the token sent to it.
    python = system_python()
    port = free_port()
    env = {**NO_MODEL, "OFFLOAD_DATA_DIR": str(data_dir), "OFFLOAD_PORT": str(port)}
    api = start_process(["api_entry.py"], env, tmp_path / "api.log")
    try:
        wait_for(lambda: _listening(port), 60, what="the API listening")
        tried = subprocess.run(["runuser", "-u", other_account, "--", python, "-c",
                                LISTEN_ON_IPV6_LOOPBACK, str(port), "0"],
                               capture_output=True, text=True, timeout=60)
        assert "Address already in use" in tried.stderr, tried.stdout + tried.stderr
        with pytest.raises(ConnectionRefusedError):  # at once: clients go on to 127.0.0.1
            socket.create_connection(("::1", port), 10).close()
        assert httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=30).status_code == 200
    finally:
        stop_process(api)
    # There first, it keeps the server from starting, which says why.
    with subprocess.Popen(["runuser", "-u", other_account, "--", python, "-c",
                           LISTEN_ON_IPV6_LOOPBACK, str(port), "120"],
                          stdout=subprocess.PIPE, text=True) as theirs:
        try:
            assert theirs.stdout is not None and theirs.stdout.readline() == "listening\n"
            api = start_process(["api_entry.py"], env, tmp_path / "refused.log")
            try:
                assert api.wait(120) == 3
            finally:
                stop_process(api)
        finally:
            theirs.terminate()
    said = (tmp_path / "refused.log").read_text()
    assert (f"Offload cannot start: [::1]:{port} is taken by another program, and "
            f"localhost:{port} leads there as well as here") in said, said
    assert "Traceback" not in said, said


@pytest.mark.skipif(not _ipv6_loopback(), reason="needs ::1")
@pytest.mark.timeout(300)  # launch.py, then its server on a slow machine
def test_launch_py_moves_past_a_port_another_account_listens_on_at_ipv6_loopback(
        other_account: str, data_dir: Path, tmp_path: Path) -> None:
    python = system_python()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OFFLOAD_", "OPENAI_"))}
    env.update(OFFLOAD_DATA_DIR=str(data_dir), OPENAI_BASE_URL="http://127.0.0.1:9/v1")
    log = tmp_path / "launch.log"
    with subprocess.Popen(["runuser", "-u", other_account, "--", python, "-c",
                           LISTEN_ON_IPV6_LOOPBACK, str(port), "120"],
                          stdout=subprocess.PIPE, text=True) as theirs:
        try:
            assert theirs.stdout is not None and theirs.stdout.readline() == "listening\n"
            with open(log, "ab") as out:
                launcher = subprocess.Popen([sys.executable, "launch.py", "--no-browser",
                                             "--port", str(port)], cwd=p.ROOT, env=env,
                                            stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
            try:
                wait_for(lambda: "using port" in log.read_text(errors="replace"), 120, 0.2,
                         f"the move to another port: {log}")
                said = log.read_text(errors="replace")
                assert f"port {port} is taken by another program" in said, said
                moved = int(said.split("using port ")[1].split()[0])
                wait_for(lambda: _listening(moved), 120, 0.3, "the server on the next port")
                health = httpx.get(f"http://127.0.0.1:{moved}/api/health", timeout=30)
                assert health.status_code == 200
            finally:
                stop_process(launcher)
        finally:
            theirs.terminate()


@pytest.mark.skipif(sys.platform != "linux", reason="the caller's account is known on Linux")
def test_a_self_test_whose_connection_fails_for_now_is_tried_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from jobs.api import peer

    # Another account holding every ephemeral port made the first lookup's own test
    # connection fail (EADDRINUSE): read as "this kernel cannot tell", the check was off
    # for good. No port range can be exhausted here without harming the machine: scripted.
    lookup = peer.PeerLookup()
    real = socket.create_server

    def no_port(*args: Any, **kwargs: Any) -> socket.socket:
        raise OSError(errno.EADDRINUSE, "Address already in use")

    try:
        with socket.create_server(("127.0.0.1", 0)) as listener, \
                socket.create_connection(listener.getsockname()) as client:
            ends = client.getsockname(), listener.getsockname()
            monkeypatch.setattr(socket, "create_server", no_port)
            assert lookup.account(*ends) == peer.UNKNOWN  # refused now, asked again later
            monkeypatch.setattr(socket, "create_server", real)
            assert lookup.account(*ends) == os.geteuid()
    finally:
        lookup.close()


@pytest.mark.skipif(sys.platform != "linux", reason="the caller's account is known on Linux")
def test_a_kernel_that_cannot_tell_accounts_refuses_nobody_for_it() -> None:
    import socket

    from jobs.api.peer import PeerLookup

    # A kernel without tcp_diag answers every lookup "no such socket"; none can be had
    # on demand, so one is scripted: it must read as "cannot be told", not as "closed".
    seeing, blind = PeerLookup(), PeerLookup()
    blind._ask = lambda request: None  # type: ignore[method-assign]
    try:
        with socket.create_server(("127.0.0.1", 0)) as listener, \
                socket.create_connection(listener.getsockname()) as client:
            ends = client.getsockname(), listener.getsockname()
            assert seeing.account(*ends) == os.geteuid()
            assert blind.account(*ends) is None
    finally:
        seeing.close()


def _read_as(user: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", user, "--", "cat", str(path)],
                          capture_output=True, text=True, timeout=30)


# Sends one datagram to a Unix socket: run as another account by the system's Python.
RING = ("import socket, sys; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); "
        "s.sendto(sys.argv[2].encode(), sys.argv[1])")


def _ring_as(user: str, python: str, sock: Path, text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", user, "--", python, "-c", RING, str(sock), text],
                          capture_output=True, text=True, timeout=30)


def test_another_account_cannot_read_a_chat(other_account: str) -> None:
    # A data folder inside a folder every account may enter (pytest's own is private).
    public = Path(tempfile.mkdtemp(prefix="offload-public-"))
    server = None
    try:
        public.chmod(0o755)
        control = public / "control.txt"
        control.write_text("readable by all\n")
        assert _read_as(other_account, control).stdout == "readable by all\n"  # it can read
        server = Server(public / "data", public / "server.log", NO_MODEL).start()
        with server.client() as client:
            job = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0}}
                              ).json()
            _final(client, job["id"])
        for path in (public / "data" / "jobs" / job["id"] / p.JOB_FILE,
                     public / "data" / "supervisor.log"):
            assert path.is_file()
            attempt = _read_as(other_account, path)
            assert attempt.returncode != 0 and "Permission denied" in attempt.stderr, attempt
        # Nor ring the supervisor's doorbell (a datagram naming a job), where one that any
        # account may use takes its ring.
        python = shutil.which("python3", path="/usr/bin:/bin")
        doorbell = public / "data" / "supervisor.sock"
        if python is not None and doorbell.exists():
            import socket

            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as open_bell:
                open_bell.bind(str(public / "open.sock"))
                (public / "open.sock").chmod(0o777)
                sent = _ring_as(other_account, python, public / "open.sock", job["id"])
                assert sent.returncode == 0, sent.stderr
                assert open_bell.recv(64) == job["id"].encode()
            attempt = _ring_as(other_account, python, doorbell, job["id"])
            assert attempt.returncode != 0 and "PermissionError" in attempt.stderr, attempt
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(public, ignore_errors=True)


class _Listener:
    """A loopback listener that keeps whatever a client sends it (a token, say)."""

    def __init__(self) -> None:
        import socket
        import threading

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.heard = b""
        self._done = False
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._done:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    self.heard += conn.recv(65536)
                except OSError:
                    pass

    def close(self) -> None:
        self._done = True
        self._thread.join(5)
        self.sock.close()


@pytest.mark.parametrize("how", ["in their folder", "their file", "a file all can write",
                                 "a file their group can write",
                                 "in a folder their group can write"])
def test_a_settings_file_another_account_could_have_written_is_not_read(
        how: str, other_account: str, tmp_path: Path) -> None:
    # A .env left where one starts Offload (/tmp, a shared checkout) named a listener of
    # another account as the server: the CLI sent it the token. As the model server, it
    # would have had every chat. Of a group another account is of (a project folder
    # shared with the usual umask 002), it was read.
    import pwd  # POSIX only

    their_group = pwd.getpwnam(other_account).pw_gid
    listener = _Listener()
    folder = tmp_path / "shared"
    folder.mkdir()
    env_file = folder / ".env"
    env_file.write_text(f"OFFLOAD_URL={listener.url}\nOPENAI_BASE_URL={listener.url}/v1\n")
    if how == "in their folder":
        shutil.chown(folder, other_account)
        said = f"the folder {folder} on the way belongs to another account"
    elif how == "their file":
        shutil.chown(env_file, other_account)
        said = "it belongs to another account"
    elif how == "a file all can write":
        env_file.chmod(0o666)
        said = "every account can write it"
    elif how == "a file their group can write":
        os.chown(env_file, -1, their_group)
        env_file.chmod(0o664)
        said = f"another account of its group (gid {their_group}) can write it (chmod g-w it)"
    else:
        os.chown(folder, -1, their_group)
        folder.chmod(0o2775)
        said = (f"the folder {folder} on the way can be written by another account of its "
                f"group (gid {their_group})")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_")}
    env.update({"OFFLOAD_API_TOKEN": uuid.uuid4().hex, "OFFLOAD_DATA_DIR": str(tmp_path / "var")})
    starts = {"cli": ["-m", "jobs", "list"],
              "api": [os.path.join(p.ROOT, "api_entry.py"), "--port", "0"],
              "supervisor": ["-m", "jobs.supervisor"]}
    try:
        for what, args in starts.items():
            done = subprocess.run([sys.executable, *args], cwd=folder, env=env,
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == (2 if what == "cli" else 3), (what, done.stderr)
            assert f"refusing to read {env_file}: {said}" in done.stderr, (what, done.stderr)
            assert "Traceback" not in done.stderr, done.stderr
    finally:
        listener.close()
    assert listener.heard == b""
    assert not (tmp_path / "var").exists()
    # Nor a schedules file of theirs (it would have this account run their jobs).
    schedules = folder / "schedules.toml"
    schedules.write_text('[beat]\nkind = "sleep"\nevery = "1h"\n')
    env_file.unlink()
    if how == "a file all can write":
        schedules.chmod(0o666)
    elif how == "their file":
        shutil.chown(schedules, other_account)
    elif how == "a file their group can write":
        os.chown(schedules, -1, their_group)
        schedules.chmod(0o664)
    done = subprocess.run([sys.executable, starts["api"][0], "--port", "0"], cwd=folder,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    if how.startswith("in "):  # with no .env there: they could put one in meanwhile
        assert f"refusing to read {env_file}: {said}" in done.stderr, done.stderr
    else:
        assert f"refusing to read the schedules file {schedules}: {said}" in done.stderr
    schedules.unlink()
    env_file.write_text("")
    # The same file, the user's own and theirs alone, is read: written by its group too,
    # where that group is the user's alone.
    os.chown(folder, os.geteuid(), os.getegid())
    folder.chmod(0o775)
    os.chown(env_file, os.geteuid(), os.getegid())
    env_file.chmod(0o660)
    closed = f"http://127.0.0.1:{free_port()}"
    env_file.write_text(f"OFFLOAD_URL={closed}\n")
    done = subprocess.run([sys.executable, "-m", "jobs", "list"], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 3 and f"cannot reach Offload at {closed}" in done.stderr, done


def test_a_settings_file_holding_a_secret_is_made_the_owners_alone(
        other_account: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A .env made with the usual umask (0644), in a folder every account may enter (a
    # checkout in a home folder): any of them read the model server's key and the token.
    public = Path(tempfile.mkdtemp(prefix="offload-public-"))
    server = None
    try:
        public.chmod(0o755)
        env_file = public / ".env"
        secrets = (f"OPENAI_API_KEY=sk-private-{uuid.uuid4().hex}\n"
                   f"OFFLOAD_API_TOKEN={uuid.uuid4().hex}\n")
        env_file.write_text(secrets)
        env_file.chmod(0o644)
        monkeypatch.delenv("OFFLOAD_ENV_FILE")  # the working folder's, as a user starts it
        server = Server(public / "data", public / "server.log", NO_MODEL, cwd=public).start()
        attempt = _read_as(other_account, env_file)
        assert attempt.returncode != 0 and "Permission denied" in attempt.stderr, attempt
        assert _mode(env_file) == 0o640 and env_file.read_text() == secrets
        assert "is now readable by its owner (and group) only" in (
            public / "server.log").read_text()
        server.stop()
        # Shared with a group on purpose (a service account of it): left as it is.
        env_file.chmod(0o640)
        server = Server(public / "data", public / "server.log", NO_MODEL, cwd=public).start()
        assert _mode(env_file) == 0o640
        server.stop()
        # One that holds no secret is left as it is.
        env_file.write_text(f"OFFLOAD_URL=http://127.0.0.1:{free_port()}\n")
        env_file.chmod(0o644)
        env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_")}
        done = subprocess.run([sys.executable, "-m", "jobs", "list"], cwd=public, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 3 and "cannot reach Offload" in done.stderr, done
        assert _mode(env_file) == 0o644 and _read_as(other_account, env_file).returncode == 0
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(public, ignore_errors=True)


# Swaps a file open to all for a link to argv[2] and back, in folder argv[1], until killed.
SWAP = """
import os, sys
os.umask(0)
entry, spare, link = (os.path.join(sys.argv[1], name) for name in ("entry", "f.tmp", "l.tmp"))
while True:
    with open(spare, "w"):
        pass
    os.chmod(spare, 0o666)
    os.replace(spare, entry)
    os.symlink(sys.argv[2], link)
    os.replace(link, entry)
"""


def test_tightening_never_changes_what_a_link_swapped_in_leads_to(tmp_path: Path) -> None:
    # While the folder was open, another account swapped a file of its own for a link to
    # one of ours, over and over: a chmod by path between the look and the change
    # followed the link (one start in about 80 made the file it led to 0600).
    from jobs.store.private import tighten

    ours = tmp_path / "ours.txt"
    ours.write_text("ours\n")
    ours.chmod(0o644)
    top = tmp_path / "open"
    top.mkdir()
    swapper = subprocess.Popen([sys.executable, "-c", SWAP, str(top), str(ours)])
    try:
        wait_for(lambda: (top / "entry").exists(), 30, 0.01, "the swapping to begin")
        for _ in range(3000):
            tighten(top)
            top.chmod(0o777)
            assert _mode(ours) == 0o644
    finally:
        swapper.kill()
        swapper.wait()


@pytest.mark.parametrize("first", ["api", "supervisor"])
def test_an_open_data_folder_holding_another_accounts_link_is_refused(
        first: str, other_account: str, data_dir: Path, tmp_path: Path) -> None:
    # While it was open, another account put in a link to a file of ours where the
    # supervisor logs, and a link to a folder of its own where the jobs go: Offload
    # appended to our file, and ran the jobs it put in its folder.
    import pwd  # POSIX only

    mine = tmp_path / "mine.txt"
    mine.write_text("mine\n")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    shutil.chown(theirs, other_account)
    data_dir.mkdir()
    data_dir.chmod(0o777)
    for name, target in (("supervisor.log", mine), ("jobs", theirs)):
        (data_dir / name).symlink_to(target)
        os.lchown(data_dir / name, pwd.getpwnam(other_account).pw_uid, -1)
    said = _refused_start(first, data_dir, tmp_path).read_text()
    assert f"cannot start: the data folder {data_dir} was open to other accounts ({data_dir}: " \
        "mode 777) and holds" in said
    assert "Traceback" not in said, said
    assert "which belongs to another account" in said
    assert mine.read_text() == "mine\n"
    assert list(theirs.iterdir()) == []


def test_the_name_of_another_accounts_file_is_said_with_its_control_characters_written_out(
        other_account: str, data_dir: Path, tmp_path: Path) -> None:
    # Said raw, a name could clear the owner's terminal, or start a line of its own in the
    # log the message went to (a key line, in a file the log was linked to).
    data_dir.mkdir()
    data_dir.chmod(0o777)
    planted = data_dir / "x\nssh-ed25519 AAAA attacker\n\x1b]0;HACKED\x07\u202eevil"
    planted.write_text("")
    shutil.chown(planted, other_account)
    said = _refused_start("api", data_dir, tmp_path).read_text()
    assert (f"and holds {data_dir}/x\\x0assh-ed25519 AAAA attacker\\x0a\\x1b]0;HACKED"
            "\\x07\\u202eevil, which belongs to another account") in said, said
    assert "\x1b" not in said and "\u202e" not in said
    assert not any(line.startswith("ssh-ed25519") for line in said.splitlines())


@pytest.mark.parametrize("first", ["api", "supervisor"])
@pytest.mark.parametrize("jobs_folder", ["private", "open", "a job's open"])
def test_a_data_folder_tightened_at_its_top_alone_is_still_looked_into(
        first: str, jobs_folder: str, other_account: str, data_dir: Path,
        tmp_path: Path) -> None:
    # Open once, then `chmod 700` on its top alone: what another account put in it
    # meanwhile was no longer looked for. Offload appended its log to a file of ours
    # through their link, and ran the job they put in the jobs folder, left open.
    import pwd  # POSIX only

    uid = pwd.getpwnam(other_account).pw_uid
    mine = tmp_path / "mine.txt"
    mine.write_text("mine\n")
    jobs = data_dir / "jobs"
    jobs.mkdir(parents=True)
    jobs.chmod(0o777 if jobs_folder == "open" else 0o700)
    if jobs_folder == "a job's open":  # `chmod 700 data data/*`: a job's folder left 0777
        ours = jobs / p.new_id()
        ours.mkdir()
        ours.chmod(0o777)
        planted = ours / "job.log"
        planted.symlink_to(mine)
        os.lchown(planted, uid, -1)
        said_open = f"was open to other accounts ({ours}: mode 777)"
    elif jobs_folder == "open":
        planted = jobs / p.new_id()
        planted.mkdir()
        (planted / p.JOB_FILE).write_text(json.dumps(p.new_job(planted.name, "sleep", {}, 0)))
        shutil.chown(planted / p.JOB_FILE, other_account)
        shutil.chown(planted, other_account)
        said_open = f"was open to other accounts ({jobs}: mode 777)"
    else:
        planted = data_dir / "supervisor.log"
        planted.symlink_to(mine)
        os.lchown(planted, uid, -1)
        said_open = "may have been open to other accounts"
    data_dir.chmod(0o700)
    said = _refused_start(first, data_dir, tmp_path).read_text()
    assert f"cannot start: the data folder {data_dir} {said_open} and holds {planted}, which " \
        f"belongs to another account (uid {uid})" in said, said
    assert "Traceback" not in said, said
    assert mine.read_text() == "mine\n"
    if jobs_folder == "open":
        assert not (planted / p.RUN_FILE).exists()
