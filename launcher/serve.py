"""Where to serve (options, environment, `.env`), an Offload already running there
found, and api_entry.py started, waited for and stopped."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import webbrowser
from collections.abc import Callable

from launcher import ROOT, say
from launcher.venv import venv_python

# The server's own defaults (jobs.settings; offload's in jobs.cli.client), which this
# standard-library-only module cannot import: a test holds the three equal.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = "8001"


def address(options: argparse.Namespace) -> tuple[str, int, str]:
    """The host and port to serve on, as the server reads them (given here, else the
    environment, else `.env`), and the host a browser reaches it by."""
    host: str = options.host or setting("OFFLOAD_HOST") or DEFAULT_HOST
    if not host_like(host):  # in the URL it is looked for at: a traceback from urllib
        sys.exit(f"[offload] {host!r} is not a host name or address (--host, OFFLOAD_HOST): "
                 "give one such as 127.0.0.1, 0.0.0.0, ::1 or localhost, without brackets, "
                 "port or http://")
    try:
        port: int = options.port or port_number(setting("OFFLOAD_PORT") or DEFAULT_PORT)
    except argparse.ArgumentTypeError as exc:
        sys.exit(f"[offload] OFFLOAD_PORT: {exc}")
    browse_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    if ":" in browse_host:
        browse_host = f"[{browse_host}]"  # an IPv6 address in a URL
    return host, port, browse_host


def host_like(host: str) -> bool:
    """A name (letters, digits, dots, dashes) or an IPv4 or IPv6 address (with a zone)."""
    if ":" not in host:
        return re.fullmatch(r"[A-Za-z0-9_.-]+", host) is not None
    try:
        ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return False
    return re.fullmatch(r"[^%]+(%[A-Za-z0-9_.-]+)?", host) is not None


def setting(name: str) -> str | None:
    """An OFFLOAD_* setting from the environment, else from the `.env` the server reads
    (OFFLOAD_ENV_FILE's, else the one beside launch.py; the last line that sets it), read
    here by hand: python-dotenv is not installed yet."""
    from jobs.protocol.trust import (  # stdlib only
        UnsafeSettingsFile,
        not_utf8,
        read_settings_file,
    )

    if os.environ.get(name):
        return os.environ[name]
    path = ROOT / (os.environ.get("OFFLOAD_ENV_FILE") or ".env")  # absolute: itself
    try:
        data = read_settings_file(str(path), ".env")
    except UnsafeSettingsFile as exc:
        # Its address would be "already running" there, and opened in the browser.
        sys.exit(f"[offload] refusing to read {path}: {exc}. It could send you, and your "
                 "token, to another account's server. Make it yours and not writable by "
                 "others (chmod o-w), or set OFFLOAD_ENV_FILE to a file of yours")
    except OSError:
        return None
    if data is not None and (problem := not_utf8(data)):  # its port was taken for none
        sys.exit(f"[offload] cannot read {path}: {problem}")
    lines = [] if data is None else data.decode("utf-8-sig").splitlines()  # Notepad's BOM
    values: dict[str, str] = {}  # the last line that sets a name counts
    for line in lines:
        key, sep, value = line.strip().removeprefix("export ").partition("=")
        if sep:
            values[key.strip()] = _expanded(_dotenv_value(value), {**os.environ, **values})
    return values.get(name) or None


# python-dotenv's ${NAME} and ${NAME:-default}: from the lines above, else the environment.
_VARIABLE = re.compile(r"\$\{(?P<name>[^}:]*)(?::-(?P<default>[^}]*))?\}")


def _expanded(value: str, known: dict[str, str]) -> str:
    return _VARIABLE.sub(lambda found: known.get(found["name"], found["default"] or ""), value)


def _dotenv_value(raw: str) -> str:
    """A value as python-dotenv reads it: quoted (a backslash escapes within double
    quotes), or bare up to a comment after whitespace."""
    raw = raw.strip()
    if raw[:1] not in ("'", '"'):
        return re.split(r"\s+#", raw, maxsplit=1)[0].strip()
    quote, value, i = raw[0], [], 1
    while i < len(raw) and raw[i] != quote:
        if quote == '"' and raw[i] == "\\" and i + 1 < len(raw):
            i += 1
        value.append(raw[i])
        i += 1
    return "".join(value)


def already_running(options: argparse.Namespace) -> bool:
    """Offload answers where it would serve: open it, and install nothing (its .venv is
    in use)."""
    _, port, browse_host = address(options)
    return opened_if_running(f"http://{browse_host}:{port}", options)


def opened_if_running(url: str, options: argparse.Namespace) -> bool:
    if not offload_answers(url):
        return False
    if options.no_browser:
        say(f"Offload is already running at {url}")
    else:
        say(f"Offload is already running at {url}; opening it")
        webbrowser.open(fresh_url(url))
    return True


def serve(options: argparse.Namespace, extra: list[str], release: Callable[[], None]) -> int:
    """Start api_entry.py with `extra` and the host and port given here; `release` the
    start lock once it answers (or has exited)."""
    host, port, browse_host = address(options)
    given_port = options.port is not None

    def usable(port: int) -> bool:
        # Another account listening on [::1] there too: where localhost leads first.
        return port_free(host, port) and not others_listen(port)

    if not usable(port):
        taken = port
        for port in range(taken + 1, min(taken + 100, 65536)):
            # One started before, when this port was taken too, is there.
            if opened_if_running(f"http://{browse_host}:{port}", options):
                return 0
            if usable(port):
                break
        else:
            last = min(taken + 99, 65535)
            after = f", and so is every port up to {last}" if last > taken else \
                " (the last port there is)"
            sys.exit(f"[offload] port {taken} is taken{after}; stop the program on it, or "
                     "pass --port with a free one")
        say(f"port {taken} is taken by another program; using port {port} instead")
        given_port = True
    url = f"http://{browse_host}:{port}"
    say(f"starting the dashboard on {url} (Ctrl+C stops it)")
    # Only what was given here: api_entry.py reads the same defaults itself.
    args = [*extra, *(["--host", host] if options.host else []),
            *(["--port", str(port)] if given_port else [])]
    from jobs.protocol import LAUNCHER_PID_ENV  # the standard library only

    proc = subprocess.Popen([str(venv_python()), str(ROOT / "api_entry.py"), *args], cwd=ROOT,
                            env={**os.environ, LAUNCHER_PID_ENV: str(os.getpid())})

    def when_up() -> None:
        up = wait_until_up(url, 600.0, proc)  # the embedded model may be compiling
        release()
        if up:
            say(f"the dashboard is up at {url}")  # start_dashboard.pyw looks for it
        if up and not options.no_browser:
            webbrowser.open(fresh_url(url))

    threading.Thread(target=when_up, daemon=True).start()
    return until_stopped(proc)


def until_stopped(proc: subprocess.Popen[bytes]) -> int:
    """The server's exit code once it has ended; 0 if it was asked to stop, and did."""
    stop_asked = False

    def stop(*_: object) -> None:
        nonlocal stop_asked
        stop_asked = True
        proc.terminate()

    # Stopped as a whole (a process manager, a closed terminal): the server stops with it.
    # Not a hang-up under nohup (ignored, as its server ignores it).
    for name in ("SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)
        if number is not None and signal.getsignal(number) is not signal.SIG_IGN:
            signal.signal(number, stop)
    while True:
        try:
            code = proc.wait()
            break
        except KeyboardInterrupt:  # a second one too: the server's stop is waited for
            # A Ctrl+C in the terminal reached the server too; a SIGINT sent to this
            # process alone did not. SIGTERM: a second SIGINT would cut its grace short.
            if not stop_asked and os.name != "nt":
                proc.terminate()
            stop_asked = True
    # Once stopped, uvicorn raises the signals it was sent again (a closed terminal's
    # SIGHUP too): a stop asked for is no failure (0, as before, not 241).
    if stop_asked and code <= 0:
        return 0
    if code < 0:  # killed (out of memory, kill -9): said nowhere else
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        say(f"the server was stopped by {name}, not from here; its supervisor leaves with it "
            "and running jobs run on: start it again with python launch.py")
        return 128 - code  # as a shell says a death by a signal
    return code


def fresh_url(url: str) -> str:
    """The dashboard at an address no page can have been cached under: a page another
    program served at `url` before Offload ran, cached by the browser, would be shown
    instead; the dashboard's own page then empties that cache (Clear-Site-Data)."""
    return f"{url}/?opened={secrets.token_hex(4)}"


def wait_until_up(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None,
                  ) -> bool:
    """Whether Offload answers at `url` within `timeout_s` (False as soon as `proc`, its
    server, has exited)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        if offload_answers(url):  # a token-guarded one too: its page asks for the token
            return True
        time.sleep(0.3)
    return False


def offload_answers(url: str) -> bool:
    """Is an Offload server (not some other program, nor another account's) answering
    there?"""
    port = urllib.parse.urlsplit(url).port
    if port is not None and others_listen(port):
        return False  # a page of theirs opened here would stay in the browser (a worker)
    try:
        with urllib.request.urlopen(f"{url}/api/health", timeout=2) as response:
            # degraded: it serves, with a problem to tell (a full disk, say)
            return json.load(response).get("status") in ("ok", "degraded")
    except urllib.error.HTTPError as exc:
        return exc.code == 401 and b"OFFLOAD_API_TOKEN" in exc.read()  # a token-guarded one
    except (OSError, ValueError):
        return False


def others_listen(port: int) -> bool:
    """Whether an account Offload does not trust listens on this TCP port (Linux: read
    from /proc/net; elsewhere, not known: False)."""
    from jobs.protocol.trust import trusted_owners  # the standard library only

    trusted = {*trusted_owners(), 0}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()  # sl local rem st queues timer retrnsmt uid ...
            if (len(fields) > 7 and fields[3] == "0A"  # listening
                    and int(fields[1].rsplit(":", 1)[1], 16) == port
                    and int(fields[7]) not in trusted):
                return True
    return False


def port_free(host: str, port: int) -> bool:
    """Whether the server can listen there. Any other problem than the port being taken (an
    address not of this machine, a port below 1024 without the right) stops the start."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        if os.name != "nt":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            s.bind((host, port))
        except OSError as exc:
            from jobs.protocol import port_taken  # the standard library only

            if port_taken(exc):
                return False
            sys.exit(f"[offload] cannot serve on {host} port {port}: "
                     f"{exc.strerror or exc}; pass another --host or --port")
    return True


def port_number(text: str) -> int:
    digits = text.strip()
    # isdigit() alone takes "²" and other digits int() refuses.
    if not (digits.isascii() and digits.isdigit()) or not 1 <= int(digits) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1 to 65535)")
    return int(text)
