"""The house style, checked: ruff and mypy --strict over the source and the tests."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tool", [
    ["ruff", "check", "."],
    ["mypy"],
    # Every Windows branch type-checks too: no POSIX-only call outside a platform guard.
    ["mypy", "--platform", "win32", "jobs", "runners", "api_entry.py", "launch.py",
     "start_dashboard.pyw"],
])
def test_clean(tool: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", *tool], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
