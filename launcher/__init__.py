"""launch.py's parts, one purpose each. Standard library only, as launch.py: they run
before .venv exists.

  venv        .venv: made (again, if it does not work), its Python and its pip
  install     the project and its extras installed into .venv, once per pyproject.toml
  llama       the embedded model: llama-cpp-python's wheel and llama-server, built and cached
  start_lock  one start at a time in a folder
  serve       where to serve, a running Offload found, api_entry.py started and stopped
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the project's folder, launch.py's


def say(message: str) -> None:
    print(f"[offload] {message}", flush=True)
