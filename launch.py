"""Bootstrap and start Offload.

    python launch.py [--no-browser] [--host H] [--port P]   start the dashboard
    python launch.py test [pytest args]                     run the test suite
    python launch.py --reinstall [...]                      install again first

The first run creates `.venv` beside this file with the interpreter that runs it and
installs the project; later runs re-install only when pyproject.toml changed.
Standard library only, as its parts in launcher/: this runs before anything is
installed.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path

# Its parts beside it, also where the script's folder is not on the path (python -P).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from launcher import ROOT
from launcher.install import install
from launcher.serve import already_running, port_number, serve
from launcher.start_lock import one_start_at_a_time
from launcher.venv import ensure_venv, forget_install, venv_python


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


def run_suite(cmd: list[str]) -> int:
    """The suite's exit code, once it has ended: stopped, it stops the servers it started
    first (subprocess.call killed it outright at a Ctrl+C, and a SIGTERM to launch.py alone
    left it running)."""
    started: list[subprocess.Popen[bytes]] = []
    arrived: list[int] = []  # before it started: passed on once it has

    def pass_on(number: int, _: object) -> None:
        if started:
            started[0].send_signal(number)
        else:
            arrived.append(number)

    for name in ("SIGTERM", "SIGHUP"):  # as `python launch.py` passes them to its server
        number = getattr(signal, name, None)
        if number is not None and signal.getsignal(number) is not signal.SIG_IGN:
            signal.signal(number, pass_on)
    suite = subprocess.Popen(cmd, cwd=ROOT)
    started.append(suite)
    for number in arrived[:1]:
        suite.send_signal(number)
    while True:
        try:
            return suite.wait()
        except KeyboardInterrupt:  # a terminal's Ctrl+C reached the suite too
            continue


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 10):  # noqa: UP036 - launch.py may meet any Python
        sys.exit("[offload] Python 3.10 or newer is needed")
    options, extra = parse_args(argv)
    with one_start_at_a_time() as release:
        if options.reinstall:
            forget_install()
        if options.command != "test" and already_running(options):
            return 0
        ensure_venv()
        if options.command == "test":
            install({"test", "bench", "llm", "llm-server", "ray"})
            release()  # the suite starts launch.py itself
            return run_suite([str(venv_python()), "-m", "pytest", *extra])
        install({"llm", "llm-server"})
        return serve(options, extra, release)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:  # while it checks, waits or installs (the server's is handled)
        print("[offload] stopped (Ctrl+C); run python launch.py again to go on",
              file=sys.stderr, flush=True)
        sys.exit(130)  # a shell's code for a stop by Ctrl+C
