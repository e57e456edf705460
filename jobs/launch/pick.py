"""Which launcher runs a job: the configured one for new jobs, the recorded one for a job
another configuration started."""

from __future__ import annotations

from typing import Any

from jobs import protocol as p
from jobs.launch.base import Launcher
from jobs.launch.local import LocalLauncher, launch_mode
from jobs.launch.ray import RayLauncher
from jobs.settings import Settings


def make_launcher(settings: Settings) -> Launcher:
    """The launcher `OFFLOAD_LAUNCHER` names."""
    if settings.launcher == p.RAY:
        return RayLauncher.from_settings(settings)
    return LocalLauncher(settings.runner_env(), launch_mode(settings))


def adopting_launcher(record: dict[str, Any], runner_env: dict[str, str],
                      log_max_bytes: int | None = None) -> Launcher:
    """The launcher for a job that another configuration started (its run.json says)."""
    if record.get("launcher") in (None, p.LOCAL):
        return LocalLauncher(runner_env)
    if record.get("launcher") == p.RAY:
        return RayLauncher(str(record.get("address") or ""), runner_env,
                           log_max_bytes=log_max_bytes)
    raise ValueError(f"unknown launcher {record.get('launcher')!r} in the launch record")
