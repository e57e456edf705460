"""The launchers: a path with spaces and non-ASCII characters, a second start, a busy
port, and the Windows files (their line endings and the commands they call)."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import ROOT, free_port, stop_process, wait_for


def test_bat_file_is_crlf_and_calls_what_exists() -> None:
    raw = (ROOT / "start_dashboard.bat").read_bytes()
    assert raw.count(b"\r\n") == raw.count(b"\n") > 10, "every line ends with CRLF"
    text = raw.decode("ascii")
    assert "py -3 launch.py" in text and "python launch.py" in text
    assert (ROOT / "launch.py").is_file()
    assert "pause" in text, "the window stays open when something fails"
    assert "python.org/downloads" in text, "no Python: it says where to get it"


def test_pyw_starts_launch_py_without_a_console() -> None:
    source = (ROOT / "start_dashboard.pyw").read_text()
    compile(source, "start_dashboard.pyw", "exec")
    assert "launch.py" in source and "CREATE_NO_WINDOW" in source


def test_launch_py_the_server_and_offload_default_to_one_address() -> None:
    from jobs import settings
    from jobs.cli import client
    from launcher import serve

    assert serve.DEFAULT_HOST == client.DEFAULT_HOST == settings.DEFAULT_HOST
    assert int(serve.DEFAULT_PORT) == int(client.DEFAULT_PORT) == settings.DEFAULT_PORT


def start_dashboard_pyw() -> Any:
    """start_dashboard.pyw, imported as a module."""
    import importlib.machinery
    import importlib.util

    pyw_file = str(ROOT / "start_dashboard.pyw")
    loader = importlib.machinery.SourceFileLoader("start_dashboard", pyw_file)
    spec = importlib.util.spec_from_loader("start_dashboard", loader)
    assert spec is not None
    pyw = importlib.util.module_from_spec(spec)
    loader.exec_module(pyw)
    return pyw


def test_pyw_sets_its_log_aside_once_past_its_bound(tmp_path: Path) -> None:
    # Appended to at every start and never cut, launch.log grew for as long as Offload
    # was used.
    pyw = start_dashboard_pyw()
    log = tmp_path / "var" / "launch.log"
    os.close(pyw.open_log(log.parent))
    assert log.stat().st_mode & 0o777 == 0o600
    log.write_bytes(b"an earlier start\n" * (pyw.LOG_KEPT_BYTES // 17 + 1))
    with open(pyw.open_log(log.parent), "ab") as out:
        out.write(b"this start\n")
    assert log.read_bytes() == b"this start\n"
    assert (log.parent / "launch.log.1").read_bytes().startswith(b"an earlier start\n")
    with open(pyw.open_log(log.parent), "ab") as out:  # under the bound: appended to
        out.write(b"the next\n")
    assert log.read_bytes() == b"this start\nthe next\n"


def test_pyw_says_a_failed_start_in_a_window(monkeypatch: pytest.MonkeyPatch) -> None:
    # Under pythonw there is no console: a start that failed (a port range all taken, a
    # failed install) ended without a word on screen.
    pyw = start_dashboard_pyw()
    told: list[str] = []
    monkeypatch.setattr(pyw, "tell", told.append)
    monkeypatch.setattr(pyw, "main", lambda: (0, True))
    assert pyw.started() == 0 and told == []
    monkeypatch.setattr(pyw, "main", lambda: (1, True))  # ended from Task Manager, once up
    assert pyw.started() == 1 and told == []
    monkeypatch.setattr(pyw, "main", lambda: (2, False))
    assert pyw.started() == 2
    assert told[-1].startswith("Offload stopped with an error (exit code 2). What it said is "
                               "in ") and "launch.log" in told[-1]

    def fails() -> int:
        raise PermissionError(13, "Permission denied", "var")

    monkeypatch.setattr(pyw, "main", fails)
    assert pyw.started() == 1
    assert told[-1] == "Offload could not start: [Errno 13] Permission denied: 'var'"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes and links")
def test_pyw_writes_no_file_its_log_is_a_hard_link_to(tmp_path: Path) -> None:
    """launch.log as a second name of another file (a hard link another account made, in
    a `var` open to it): the .pyw's output went there, and the file was made 0600."""
    pyw = start_dashboard_pyw()
    var = tmp_path / "var"
    var.mkdir()
    victim = tmp_path / "authorized_keys"
    victim.write_bytes(b"ssh-ed25519 AAAA the owner's key\n")
    victim.chmod(0o644)
    os.link(victim, var / "launch.log")
    with open(pyw.open_log(var), "ab") as out:
        out.write(b"this start\n")
    assert victim.read_bytes() == b"ssh-ed25519 AAAA the owner's key\n"
    assert victim.stat().st_mode & 0o777 == 0o644 and victim.stat().st_nlink == 1
    log = (var / "launch.log").stat()
    assert (log.st_nlink, log.st_mode & 0o777) == (1, 0o600)
    assert (var / "launch.log").read_bytes() == b"this start\n"


def test_the_browser_opens_on_a_server_with_a_token(make_server: Callable[..., Any],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # Its /api/health asks for the token (401): that was taken for "not up yet", for good.
    import launch
    from launcher import serve

    server = make_server(env={"OFFLOAD_API_TOKEN": "a-token-of-more-than-16-characters"})
    assert serve.wait_until_up(server.url, timeout_s=30)  # what opens the browser on it
    # Found running by a second start told not to open it: it said "opening it".
    options, _ = launch.parse_args(["--no-browser"])
    assert serve.opened_if_running(server.url, options)
    said = capsys.readouterr()
    assert f"already running at {server.url}" in said.out + said.err
    assert "opening" not in said.out + said.err


def test_a_degraded_server_is_still_offload(make_server: Callable[..., Any]) -> None:
    # A full disk made /api/health say "degraded": a second start took the server for
    # another program, and started another API on the next port, on the same data.
    import subprocess

    from launcher import serve

    server = make_server()
    with server.client() as client:
        assert client.post("/api/jobs", json={"kind": "sleep"}).status_code == 202
        jobs_dir = server.data_dir / "jobs"
        subprocess.run(["chattr", "+i", str(jobs_dir)], check=True)
        try:
            assert client.post("/api/jobs", json={"kind": "sleep"}).status_code == 503
            assert client.get("/api/health").json()["status"] == "degraded"
            assert serve.offload_answers(server.url)
            assert serve.wait_until_up(server.url, timeout_s=30)
        finally:
            subprocess.run(["chattr", "-i", str(jobs_dir)], check=True)


def test_host_and_port_are_read_from_dotenv_as_the_server_reads_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import launch
    from launcher import serve

    (tmp_path / ".env").write_text("# the user's\nexport OFFLOAD_PORT=18555 # a comment\n"
                                   "OFFLOAD_HOST='::1'\n")
    monkeypatch.setattr(serve, "ROOT", tmp_path)
    for name in ("OFFLOAD_HOST", "OFFLOAD_PORT", "OFFLOAD_ENV_FILE"):
        monkeypatch.delenv(name, raising=False)
    options, _ = launch.parse_args(["--no-browser"])
    assert serve.address(options) == ("::1", 18555, "[::1]")
    monkeypatch.setenv("OFFLOAD_PORT", "18556")  # the environment first, as the server's
    assert serve.address(options)[1] == 18556
    monkeypatch.delenv("OFFLOAD_PORT")
    # Another file named, set twice in it: the last line counts, as python-dotenv has it.
    (tmp_path / "mine.env").write_text("OFFLOAD_PORT=18557\nOFFLOAD_PORT=18558\n")
    monkeypatch.setenv("OFFLOAD_ENV_FILE", str(tmp_path / "mine.env"))
    assert serve.address(options)[:2] == ("127.0.0.1", 18558)
    monkeypatch.setenv("OFFLOAD_ENV_FILE", "mine.env")  # relative: to the server's folder
    assert serve.address(options)[:2] == ("127.0.0.1", 18558)
    # Empty: the folder's own, as the server has it; comments after any whitespace, and
    # quotes, as python-dotenv reads them.
    monkeypatch.setenv("OFFLOAD_ENV_FILE", "")
    (tmp_path / ".env").write_text("OFFLOAD_PORT=18559\t# a comment after a tab\n"
                                   "OFFLOAD_HOST=\"::1\" # quoted\n")
    assert serve.address(options)[:2] == ("::1", 18559)
    from dotenv import dotenv_values

    assert dotenv_values(tmp_path / ".env") == {"OFFLOAD_PORT": "18559", "OFFLOAD_HOST": "::1"}
    # Saved by Notepad as "UTF-8 with BOM": its first line was no setting to the launcher.
    (tmp_path / ".env").write_text("OFFLOAD_PORT=18560\n", encoding="utf-8-sig")
    assert serve.address(options)[:2] == ("127.0.0.1", 18560)
    assert dotenv_values(tmp_path / ".env") == {"OFFLOAD_PORT": "18560"}
    # ${NAME}, from a line above or the environment: the launcher read it as it stands,
    # "not a port", where the server took the port it names.
    monkeypatch.setenv("THE_HOST", "::1")
    (tmp_path / ".env").write_text("MYPORT=18561\nOFFLOAD_PORT=${MYPORT}\n"
                                   "OFFLOAD_HOST=${THE_HOST:-127.0.0.1}\n")
    assert serve.address(options)[:2] == ("::1", 18561)
    assert dotenv_values(tmp_path / ".env") == {"MYPORT": "18561", "OFFLOAD_PORT": "18561",
                                                "OFFLOAD_HOST": "::1"}
    (tmp_path / ".env").write_text("OFFLOAD_PORT=${NO_SUCH:-18562}\n")
    assert serve.address(options)[:2] == ("127.0.0.1", 18562)
    assert dotenv_values(tmp_path / ".env") == {"OFFLOAD_PORT": "18562"}


def test_a_port_that_is_no_port_is_said_so() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OFFLOAD_", "OPENAI_"))}
    # "²" is a digit to str.isdigit(), not to int(): it was a raw ValueError.
    for args, extra in ((["--port", "70000"], {}), ([], {"OFFLOAD_PORT": "abc"}),
                        (["--port", "²"], {}), ([], {"OFFLOAD_PORT": "²"})):
        done = subprocess.run([sys.executable, "launch.py", "--no-browser", *args], cwd=ROOT,
                              env={**env, **extra}, capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
        assert "is not a port (1 to 65535)" in done.stderr, done.stderr


def test_a_host_that_is_no_host_is_said_so(tmp_path: Path) -> None:
    # A space, brackets or a scheme in the host went into the URL a running Offload is
    # looked for at: a traceback from urllib instead of a start.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OFFLOAD_", "OPENAI_"))}
    env.update(OFFLOAD_DATA_DIR=str(tmp_path / "var"))
    for args, extra in ((["--host", "not a host"], {}), ([], {"OFFLOAD_HOST": "[::1]"}),
                        ([], {"OFFLOAD_HOST": "http://127.0.0.1/"}),
                        (["--host", "127.0.0.1:8001"], {})):
        done = subprocess.run([sys.executable, "launch.py", "--no-browser", *args], cwd=ROOT,
                              env={**env, **extra}, capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
        assert "is not a host name or address (--host, OFFLOAD_HOST)" in done.stderr, done.stderr


def test_a_dotenv_that_is_no_utf8_is_said_so(tmp_path: Path) -> None:
    # Saved as UTF-16 (PowerShell's `>`, Notepad): the launcher took its port for none and
    # started on 8001, and the server stopped with a traceback from python-dotenv.
    dotenv = tmp_path / "offload.env"
    dotenv.write_bytes("OFFLOAD_PORT=18999\r\n".encode("utf-16"))
    dotenv.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OFFLOAD_", "OPENAI_"))}
    env.update(OFFLOAD_DATA_DIR=str(tmp_path / "var"), OFFLOAD_ENV_FILE=str(dotenv),
               OPENAI_BASE_URL="http://127.0.0.1:9/v1")
    said = f"cannot read {dotenv}: it is not UTF-8 text (byte 0xff at position 0); save it as UTF-8"
    done = subprocess.run([sys.executable, "launch.py", "--no-browser"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert f"[offload] {said}" in done.stderr, done.stderr
    # Host and port set elsewhere: the launcher reads no .env, the server does.
    env.update(OFFLOAD_HOST="127.0.0.1", OFFLOAD_PORT=str(free_port()))
    done = subprocess.run([sys.executable, "launch.py", "--no-browser"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 3 and "Traceback" not in done.stderr, done.stderr
    assert f"Offload cannot start: {said}" in done.stderr, done.stderr


def test_a_dotenv_line_that_cannot_be_read_is_said_so(tmp_path: Path) -> None:
    # A quote left open: python-dotenv left the line out with a warning that named no
    # file, so launch.py said one port (its own reading) and the server served on 8001.
    dotenv = tmp_path / "offload.env"
    dotenv.write_text('# mine\nOFFLOAD_MAX_CONCURRENT=2\nOFFLOAD_PORT="18999\n')
    dotenv.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OFFLOAD_", "OPENAI_"))}
    env.update(OFFLOAD_DATA_DIR=str(tmp_path / "var"), OFFLOAD_ENV_FILE=str(dotenv),
               OPENAI_BASE_URL="http://127.0.0.1:9/v1")
    done = subprocess.run([sys.executable, "launch.py", "--no-browser"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 3 and "Traceback" not in done.stderr, done.stderr
    assert (f"Offload cannot start: cannot read {dotenv}: line 3 (OFFLOAD_PORT=...) cannot be "
            "read as NAME=value: close a quote it opens, or remove the line") in done.stderr
    assert "Uvicorn running" not in done.stdout + done.stderr
    # Its value is not said: a line left open may hold a key.
    dotenv.write_text('OPENAI_API_KEY="sk-not-to-be-shown\n')
    done = subprocess.run([sys.executable, "launch.py", "--no-browser", "--port",
                           str(free_port())], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 3 and "line 1 (OPENAI_API_KEY=...)" in done.stderr, done.stderr
    assert "sk-not-to-be-shown" not in done.stdout + done.stderr
    dotenv.write_text("=no-name\n")
    done = subprocess.run([sys.executable, "launch.py", "--no-browser", "--port",
                           str(free_port())], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert f"cannot read {dotenv}: line 1 cannot be read as NAME=value" in done.stderr


@pytest.mark.skipif(os.name != "posix", reason="file modes")
def test_a_dotenv_any_account_can_write_sends_launch_py_nowhere(tmp_path: Path) -> None:
    # Another account added OFFLOAD_HOST/PORT of its own server to a .env every account
    # could write: launch.py found "Offload already running" there and opened it in the
    # browser, while the server itself refuses such a file.
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
            body = b'{"status": "ok"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    theirs = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=theirs.serve_forever, daemon=True).start()
    dotenv = tmp_path / "shared.env"
    dotenv.write_text(f"OFFLOAD_PORT={theirs.server_address[1]}\n")
    dotenv.chmod(0o666)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OFFLOAD_", "OPENAI_"))}
    env.update(OFFLOAD_DATA_DIR=str(tmp_path / "var"), OFFLOAD_ENV_FILE=str(dotenv))
    try:
        done = subprocess.run([sys.executable, "launch.py", "--no-browser"], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=120)
    finally:
        theirs.shutdown()
        theirs.server_close()
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert f"refusing to read {dotenv}: every account can write it" in done.stderr, done.stderr
    assert "already running" not in done.stdout + done.stderr


def test_a_port_that_cannot_be_served_on_is_said_so(tmp_path: Path) -> None:
    # Ports after a taken one are tried; after 65535 there is none, and the message said
    # to pass --port, which had been passed.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OFFLOAD_", "OPENAI_"))}
    env.update(OFFLOAD_DATA_DIR=str(tmp_path / "var"))
    with socket.socket() as taken:
        try:
            taken.bind(("127.0.0.1", 65535))
            taken.listen()
        except OSError:
            pass  # another program has it: taken all the same
        done = subprocess.run([sys.executable, "launch.py", "--no-browser", "--host",
                               "127.0.0.1", "--port", "65535"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert ("port 65535 is taken (the last port there is); stop the program on it, or pass "
            "--port with a free one") in done.stderr, done.stderr
    # An address not of this machine (TEST-NET-1) was said to be a taken port, and so was
    # every port after it.
    done = subprocess.run([sys.executable, "launch.py", "--no-browser", "--host",
                           "192.0.2.1", "--port", "18999"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert "cannot serve on 192.0.2.1 port 18999: " in done.stderr, done.stderr
    assert "taken" not in done.stderr, done.stderr


def test_a_venv_that_does_not_work_is_made_again(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Made in part (stopped with Ctrl+C, or Debian's venv without ensurepip): no pip in
    # it, and every later start (--reinstall too) failed on it.
    import launcher.venv

    venv = tmp_path / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    monkeypatch.setattr(launcher.venv, "VENV", venv)
    monkeypatch.setattr(launcher.venv, "STAMP", venv / "offload-install.json")
    (venv / "offload-install.json").write_text("{}")
    assert launcher.venv.venv_python().exists() and not launcher.venv.venv_works()
    launcher.venv.ensure_venv()
    assert launcher.venv.venv_works() and not (venv / "offload-install.json").exists()


def test_the_newest_cached_llama_wheel_is_picked_by_its_version(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two builds in the cache (one copied in by hand, say): a string sort took 0.3.9's
    # over 0.3.16's, and llama-server was then built to match the older one.
    from launcher.llama import cached_wheel, wheel_cache

    monkeypatch.setenv("OFFLOAD_CACHE_DIR", str(tmp_path))
    assert cached_wheel() is None
    wheel_cache().mkdir(parents=True)
    for version in ("0.3.9", "0.3.16", "0.2.90"):
        (wheel_cache() / f"llama_cpp_python-{version}-cp311-cp311-linux_x86_64.whl").touch()
    newest = cached_wheel()
    assert newest is not None and newest.name.startswith("llama_cpp_python-0.3.16-")


def _launched(tmp_path: Path, port: int, before: tuple[str, ...] = (),
              log: Path | None = None) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """`python launch.py` as a user starts it (a process group of its own, as in its
    terminal; `before`: a command it is given to, such as nohup), and its environment;
    what it says goes to `log`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OFFLOAD_", "OPENAI_"))}
    env.update(OFFLOAD_DATA_DIR=str(tmp_path / "var"), OPENAI_BASE_URL="http://127.0.0.1:9/v1")
    with open(log or os.devnull, "ab") as out:
        launcher = subprocess.Popen([*before, sys.executable, "launch.py", "--no-browser",
                                     "--port", str(port), "--no-access-log"], cwd=ROOT, env=env,
                                    stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    return launcher, env


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_a_server_killed_under_launch_py_is_said(tmp_path: Path) -> None:
    # Killed outright (out of memory, say), it left launch.py exiting 247 without a word.
    port, log = free_port(), tmp_path / "launch.log"
    launcher, _ = _launched(tmp_path, port, log=log)
    try:
        wait_for(lambda: _health(port), 120, 0.3, f"the server on {port}")
        server = next(proc for proc in psutil.Process(launcher.pid).children()
                      if "api_entry.py" in " ".join(proc.cmdline()))
        supervisor = wait_for(lambda: next((proc for proc in server.children()
                                            if "jobs.supervisor" in proc.cmdline()), None),
                              60, what="its supervisor")
        # Said once up: start_dashboard.pyw then says no failure of a start at its end.
        up_said = start_dashboard_pyw().UP_SAID.decode()
        wait_for(lambda: up_said in log.read_text(), 60, what="the dashboard said up")
        server.kill()
        assert launcher.wait(30) == 128 + signal.SIGKILL
        # It watches the API by its pid and create time, and leaves once it has ended.
        psutil.wait_procs([supervisor], timeout=30)
        assert not supervisor.is_running()
    finally:
        stop_process(launcher)
    assert ("[offload] the server was stopped by SIGKILL, not from here; its supervisor "
            "leaves with it and running jobs run on: start it again with python launch.py"
            ) in log.read_text()


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_ctrl_c_before_the_server_starts_says_so(tmp_path: Path) -> None:
    # Ctrl+C while launch.py waits for another start, checks .venv or installs: a
    # KeyboardInterrupt traceback through subprocess or time.sleep.
    import fcntl

    env = {k: v for k, v in os.environ.items() if not k.startswith(("OFFLOAD_", "OPENAI_"))}
    env.update(OFFLOAD_DATA_DIR=str(tmp_path / "var"), OPENAI_BASE_URL="http://127.0.0.1:9/v1")
    log = tmp_path / "launch.log"
    with open(ROOT / ".launch.lock", "a+b") as other_start:
        fcntl.flock(other_start.fileno(), fcntl.LOCK_EX)  # another start, installing
        with open(log, "wb") as out:
            launcher = subprocess.Popen([sys.executable, "launch.py", "--no-browser", "--port",
                                         str(free_port())], cwd=ROOT, env=env, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(lambda: "waiting for it" in log.read_text(), 60, 0.1, "the wait")
            launcher.send_signal(signal.SIGINT)
            assert launcher.wait(30) == 130
        finally:
            stop_process(launcher)
    said = log.read_text()
    assert "Traceback" not in said and "KeyboardInterrupt" not in said, said
    assert "[offload] stopped (Ctrl+C); run python launch.py again to go on" in said, said


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_launch_py_killed_outright_does_not_leave_its_server_running(tmp_path: Path) -> None:
    # kill -9, or Task Manager's End task on a start_dashboard.pyw: its server served on
    # with no one to stop it, and a job kept running.
    port = free_port()
    launcher, _ = _launched(tmp_path, port)
    try:
        wait_for(lambda: _health(port), 120, 0.3, f"the server on {port}")
        server = next(proc for proc in psutil.Process(launcher.pid).children()
                      if "api_entry.py" in " ".join(proc.cmdline()))
        supervisor = wait_for(lambda: next((proc for proc in server.children()
                                            if "jobs.supervisor" in proc.cmdline()), None),
                              30, 0.1, "the supervisor")
        url = f"http://127.0.0.1:{port}"
        job_id = httpx.post(f"{url}/api/jobs", json={"kind": "sleep", "input": {
            "seconds": 4}}).json()["id"]
        # Running (on a loaded machine the kill came before its launch: queued, it waits
        # for the next start).
        wait_for(lambda: httpx.get(f"{url}/api/jobs/{job_id}").json()["state"] == "running",
                 30, 0.1, "the job to start")
        launcher.kill()
        launcher.wait(10)
        gone, alive = psutil.wait_procs([server, supervisor], timeout=30)
        assert not alive, "the server ran on without its launcher"
        job_file = tmp_path / "var" / "jobs" / job_id / "job.json"
        wait_for(lambda: json.loads(job_file.read_text())["state"] == "completed", 30, 0.2,
                 "the job to run on to its end")
    finally:
        stop_process(launcher)


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "Ctrl+C"])
def test_launch_py_stopped_with_a_signal_stops_its_server(tmp_path: Path, sig: str) -> None:
    # As a process manager stops it (and the only way to stop a start_dashboard.pyw);
    # a SIGINT to it alone (`kill -INT`) left it waiting for a server that ran on; a
    # Ctrl+C in its terminal (a SIGINT to its process group) stops both.
    port = free_port()
    launcher, env = _launched(tmp_path, port)
    waiting: subprocess.Popen[bytes] | None = None
    try:
        wait_for(lambda: _health(port), 120, 0.3, f"the server on {port}")
        servers = [proc for proc in psutil.Process(launcher.pid).children()
                   if "api_entry.py" in " ".join(proc.cmdline())]
        assert len(servers) == 1
        # A job's event stream followed meanwhile (`offload wait`, a dashboard tab) held
        # the stop for good: uvicorn waits for the requests under way.
        url = f"http://127.0.0.1:{port}"
        httpx.post(f"{url}/api/queue/pause").raise_for_status()
        job_id = httpx.post(f"{url}/api/jobs", json={"kind": "sleep"}).json()["id"]
        waiting = subprocess.Popen([sys.executable, "-m", "jobs", "--url", url, "wait", job_id],
                                   cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: any(conn.pid == waiting.pid and conn.raddr and conn.raddr.port == port
                             for conn in psutil.net_connections("tcp")), 30, 0.1,
                 "the wait to follow the job")
        if sig == "Ctrl+C":
            os.killpg(launcher.pid, signal.SIGINT)  # its session's group: it and its server
        else:
            launcher.send_signal(getattr(signal, sig))  # the launcher alone
        assert launcher.wait(30) == 0, "a stop asked for is no failure"
        psutil.wait_procs(servers, timeout=30)
        assert not servers[0].is_running(), "the server ran on without its launcher"
    finally:
        stop_process(launcher)
        if waiting is not None:
            stop_process(waiting)


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
@pytest.mark.parametrize("stop", ["SIGTERM to launch.py", "SIGTERM to all", "Ctrl+C"])
def test_the_suite_stopped_under_launch_py_stops_the_servers_it_started(
        tmp_path: Path, stop: str) -> None:
    if stop == "Ctrl+C" and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        pytest.skip("this suite was started ignoring SIGINT (in a shell's background)")
    # A CI's time limit or a process manager (a SIGTERM to launch.py, or to its whole
    # group) left the suite's servers running, as did a Ctrl+C (launch.py killed the
    # suite outright while it stopped them).
    started = tmp_path / "server.pid"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OFFLOAD_", "OPENAI_"))}
    suite = subprocess.Popen(
        [sys.executable, "launch.py", "test", "-p", "no:cacheprovider",
         f"--basetemp={tmp_path / 'inner'}", "tests/fixtures/stopped_suite.py"],
        cwd=ROOT, env={**env, "STOPPED_SUITE_SERVER_PID": str(started)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    started_by_it: list[psutil.Process] = []
    try:
        wait_for(lambda: started.exists() and started.read_text() != "", 120, 0.2,
                 "the suite's server")
        server = psutil.Process(int(started.read_text()))
        started_by_it += [server, *server.children(recursive=True)]
        assert any("jobs.supervisor" in proc.cmdline() for proc in started_by_it)
        if stop == "SIGTERM to launch.py":
            suite.send_signal(signal.SIGTERM)
        else:
            os.killpg(suite.pid, signal.SIGTERM if stop == "SIGTERM to all" else signal.SIGINT)
        suite.wait(60)
        _, running = psutil.wait_procs(started_by_it, timeout=30)
        assert not running, [proc.cmdline() for proc in running]
    finally:
        stop_process(suite)
        for proc in started_by_it:  # what a failure left
            with contextlib.suppress(psutil.Error):
                proc.kill()


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_closing_its_terminal_stops_launch_py_and_its_server_as_ctrl_c_does(
        tmp_path: Path) -> None:
    """Its terminal window closed: the shell hangs up its jobs (a SIGHUP to launch.py's
    process group, its server's too). The server stops as Ctrl+C stops it, a followed
    job's event stream ended; it died on the spot, the stream cut, its shutdown never run."""
    port = free_port()
    launcher, _ = _launched(tmp_path, port)
    ended: list[str] = []
    try:
        wait_for(lambda: _health(port), 120, 0.3, f"the server on {port}")
        servers = [proc for proc in psutil.Process(launcher.pid).children()
                   if "api_entry.py" in " ".join(proc.cmdline())]
        url = f"http://127.0.0.1:{port}"
        httpx.post(f"{url}/api/queue/pause").raise_for_status()
        job_id = httpx.post(f"{url}/api/jobs", json={"kind": "sleep"}).json()["id"]
        opened = threading.Event()

        def follow() -> None:
            try:
                with httpx.stream("GET", f"{url}/api/jobs/{job_id}/events",
                                  timeout=60) as stream:
                    opened.set()
                    for _ in stream.iter_lines():
                        pass
                ended.append("ended")
            except httpx.HTTPError as exc:
                ended.append(f"cut: {exc!r}")

        follower = threading.Thread(target=follow)
        follower.start()
        assert opened.wait(30)
        os.killpg(launcher.pid, signal.SIGHUP)
        assert launcher.wait(30) == 0, "a stop asked for is no failure"
        follower.join(30)
        psutil.wait_procs(servers, timeout=30)
        assert len(servers) == 1 and not servers[0].is_running()
        assert ended == ["ended"], ended
    finally:
        stop_process(launcher)


@pytest.mark.skipif(shutil.which("nohup") is None, reason="nohup")
def test_launch_py_under_nohup_runs_on_when_its_terminal_closes(tmp_path: Path) -> None:
    # It stopped its server on the hang-up it was told to ignore.
    port = free_port()
    launcher, _ = _launched(tmp_path, port, ("nohup",))
    try:
        wait_for(lambda: _health(port), 120, 0.3, f"the server on {port}")
        os.killpg(launcher.pid, signal.SIGHUP)
        time.sleep(3)
        assert launcher.poll() is None and _health(port)
    finally:
        stop_process(launcher)


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_two_starts_at_once_serve_one_dashboard(tmp_path: Path) -> None:
    # A double click twice: the second start found nothing answering yet and started a
    # server of its own on the same data folder (or made .venv again under the first's
    # install, on a first run).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OFFLOAD_", "OPENAI_"))}
    env.update(OFFLOAD_DATA_DIR=str(tmp_path / "var"), OPENAI_BASE_URL="http://127.0.0.1:9/v1")
    port = free_port()
    logs = [tmp_path / f"start{n}.log" for n in range(2)]
    starts = []
    for log in logs:
        with open(log, "wb") as out:
            starts.append(subprocess.Popen(
                [sys.executable, "launch.py", "--no-browser", "--port", str(port),
                 "--no-access-log"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True))
    try:
        wait_for(lambda: _health(port), 120, 0.3, f"the server on {port}")
        wait_for(lambda: any(start.poll() is not None for start in starts), 120, 0.3,
                 "the second start to find the first one's server")
        second = next(start for start in starts if start.poll() is not None)
        said = logs[starts.index(second)].read_text(errors="replace")
        assert second.returncode == 0, said
        assert f"already running at http://127.0.0.1:{port}" in said, said
        first = next(start for start in starts if start is not second)
        servers = [proc for proc in psutil.Process(first.pid).children()
                   if "api_entry.py" in " ".join(proc.cmdline())]
        assert len(servers) == 1 and first.poll() is None
    finally:
        for start in starts:
            stop_process(start)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_launch_from_a_path_with_spaces_and_non_ascii(tmp_path: Path) -> None:
    home = tmp_path / "My Dashboard 桌面" / "offload copy"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    for name in tracked:
        (home / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, home / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OFFLOAD_", "OPENAI_"))}
    env["OPENAI_BASE_URL"] = "http://127.0.0.1:9/v1"  # no model server for this test
    port = free_port()
    log = tmp_path / "launch.log"
    with open(log, "ab") as out:
        first = subprocess.Popen([sys.executable, "launch.py", "--no-browser", "--port",
                                  str(port)], cwd=home, env=env, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: _health(port), 600, 0.5, f"the server on {port}: {log}")
        assert (home / ".venv").is_dir()
        wait_for(lambda: (home / "var" / "jobs").is_dir(), 30, 0.2,
                 "the supervisor to set up the data folder in the copy")

        again = subprocess.run([sys.executable, "launch.py", "--no-browser", "--port",
                                str(port)], cwd=home, env=env, capture_output=True,
                               text=True, timeout=120)
        assert again.returncode == 0
        assert f"already running at http://127.0.0.1:{port}" in again.stdout

        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            taken = busy.getsockname()[1]
            with open(log, "ab") as out:
                moved = subprocess.Popen([sys.executable, "launch.py", "--no-browser",
                                          "--port", str(taken)], cwd=home, env=env,
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
            try:
                wait_for(lambda: f"port {taken} is taken" in log.read_text(errors="replace"),
                         120, 0.2, "the busy-port message")
                text = log.read_text(errors="replace")
                new_port = int(text.split(f"port {taken} is taken")[1].split("using port ")[1]
                               .split()[0])
                wait_for(lambda: _health(new_port), 120, 0.3, "the server on the next port")
                # Started again while that port is still taken: the moved one is found.
                third = subprocess.run([sys.executable, "launch.py", "--no-browser",
                                        "--port", str(taken)], cwd=home, env=env,
                                       capture_output=True, text=True, timeout=120)
                assert third.returncode == 0, third.stdout + third.stderr
                assert f"already running at http://127.0.0.1:{new_port}" in third.stdout
            finally:
                stop_process(moved)
    finally:
        stop_process(first)
        time.sleep(0.5)


def _health(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
