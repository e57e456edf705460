"""Start Offload without a console window (double-click on Windows: pythonw runs it).

Everything `launch.py` prints goes to var/launch.log; the browser opens by itself. A
failure is also said in a window.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
LOG_KEPT_BYTES = 10 * 2**20  # past this at a start, the log is set aside (one older kept)


def open_log(log_dir: Path) -> int:
    """launch.log, to append to: the owner's only, as everything Offload writes; set aside
    as launch.log.1 once past LOG_KEPT_BYTES, so a start's output never fills the disk."""
    log_dir.mkdir(mode=0o700, exist_ok=True)
    path = log_dir / "launch.log"
    with contextlib.suppress(OSError):  # none yet, or held open (Windows): appended to
        if path.lstat().st_size > LOG_KEPT_BYTES:
            os.replace(path, log_dir / "launch.log.1")
    if sys.platform == "win32":  # no links another account makes there, nor such modes
        return os.open(path, APPEND, 0o600)
    try:
        log_fd = os.open(path, APPEND, 0o600)
    except OSError as exc:  # a link (ELOOP), a pipe that no one reads (ENXIO)
        if exc.errno not in (errno.ELOOP, errno.ENXIO):
            raise
    else:
        found = os.fstat(log_fd)
        # One name only: a hard link of another account's would lead to a file of yours.
        if (found.st_uid == os.geteuid() and stat.S_ISREG(found.st_mode)
                and found.st_nlink == 1):
            os.fchmod(log_fd, 0o600)  # made by an earlier version, open to all
            return log_fd
        os.close(log_fd)
    # Another account's, in a `var` open to it: never written through (a link of its would
    # send this output, and a change of mode, to a file of its choosing). A file of ours
    # takes its place.
    os.unlink(path)
    return os.open(path, APPEND | os.O_EXCL, 0o600)


# Created the owner's only; never through a link, nor into a pipe (that would wait).
APPEND = (os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
          | getattr(os, "O_NONBLOCK", 0))


UP_SAID = b"[offload] the dashboard is up at "  # what launch.py says once it serves


def main() -> tuple[int, bool]:
    """launch.py's exit code, and whether the dashboard came up before it ended."""
    python = Path(sys.executable)
    if python.name.lower() == "pythonw.exe":  # launch.py's output needs a console-less python
        python = python.with_name("python.exe")
    flags = getattr(subprocess, "CREATE_NO_WINDOW", 0)
    # No line for each request in it, or it would grow with every poll of the dashboard.
    # Read back through a handle of its own: a start meanwhile may set the file aside.
    with open(open_log(ROOT / "var"), "ab") as log, \
            open(ROOT / "var" / "launch.log", "rb") as said:
        said.seek(0, os.SEEK_END)
        code = subprocess.call([str(python), str(ROOT / "launch.py"), "--no-access-log",
                                *sys.argv[1:]], cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               creationflags=flags)
        return code, UP_SAID in said.read()


def tell(text: str) -> None:
    """`text` in a window: pythonw has no console to print it in."""
    if sys.platform == "win32":
        import ctypes

        ctypes.windll.user32.MessageBoxW(None, text, "Offload", 0x10)  # MB_ICONERROR
    elif sys.stderr is not None:
        print(text, file=sys.stderr)


def started() -> int:
    """`main()`, and a start that failed said where the one who double-clicked sees it.
    Once the dashboard was up, the only stops are Task Manager's and the session's end:
    no failure of a start, nothing said."""
    log = ROOT / "var" / "launch.log"
    try:
        code, came_up = main()
    except Exception as exc:  # before launch.py could write a word: nothing in its log
        tell(f"Offload could not start: {exc}")
        return 1
    if code != 0 and not came_up:
        tell(f"Offload stopped with an error (exit code {code}). What it said is in "
             f"{log}; start_dashboard.bat shows it in a window.")
    return code


if __name__ == "__main__":
    sys.exit(started())
