"""Start Offload without a console window (double-click on Windows: pythonw runs it).

Everything `launch.py` prints goes to var/launch.log; the browser opens by itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def main() -> int:
    log_dir = ROOT / "var"
    log_dir.mkdir(mode=0o700, exist_ok=True)
    python = Path(sys.executable)
    if python.name.lower() == "pythonw.exe":  # launch.py's output needs a console-less python
        python = python.with_name("python.exe")
    flags = getattr(subprocess, "CREATE_NO_WINDOW", 0)
    # The owner's only, as everything Offload writes; no line for each request in it, or
    # it would grow with every poll of the dashboard.
    log_fd = os.open(log_dir / "launch.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.chmod(log_dir / "launch.log", 0o600)  # made by an earlier version, open to all
    with open(log_fd, "ab") as log:
        return subprocess.call([str(python), str(ROOT / "launch.py"), "--no-access-log",
                                *sys.argv[1:]], cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               creationflags=flags)


if __name__ == "__main__":
    sys.exit(main())
