"""The project's .venv: where it is, its Python and pip, made when missing or broken."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from launcher import ROOT, say

VENV = ROOT / ".venv"
STAMP = VENV / "offload-install.json"


def venv_scripts() -> Path:
    return VENV / ("Scripts" if os.name == "nt" else "bin")


def venv_python() -> Path:
    return venv_scripts() / ("python.exe" if os.name == "nt" else "python")


def pip(*args: str) -> int:
    cmd = [str(venv_python()), "-m", "pip", "--disable-pip-version-check", *args]
    return subprocess.call(cmd, cwd=ROOT)


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
    forget_install()  # whatever it said was installed is gone


def forget_install() -> None:
    """The next start installs everything again."""
    STAMP.unlink(missing_ok=True)


def venv_works() -> bool:
    """Whether .venv's Python starts, is 3.10 or newer and has pip."""
    try:
        return subprocess.call(
            [str(venv_python()), "-c", "import sys, pip; sys.exit(sys.version_info < (3, 10))"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) == 0
    except OSError:
        return False
