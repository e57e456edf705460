"""The house style, checked: ruff and mypy --strict over the source and the tests, and the
import contracts of pyproject.toml (import-linter): one room per process."""

from __future__ import annotations

import os
import re
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
     "launcher", "start_dashboard.pyw"],
])
def test_clean(tool: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", *tool], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.timeout(300)
def test_import_contracts() -> None:
    # import-linter has no `python -m` entry: its command's function, in a fresh interpreter.
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(no_cache=True, no_logo=True))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_api_reports_the_version_of_pyproject() -> None:
    from jobs.api.routes_status import VERSION

    declared = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert declared is not None
    # The API reads the installed package's metadata: `python launch.py` reinstalls after
    # any change to pyproject.toml; a bare pytest in an old .venv does not.
    assert VERSION == declared.group(1), "stale install: run `python launch.py --reinstall`"


@pytest.mark.parametrize(("contract", "own"), [
    ("The protocol imports nothing of the project, nor the libraries the other rooms use",
     "jobs.protocol"),
    ("Runners import only the protocol (and their own helpers)", "jobs.protocol"),
    ("The CLI speaks HTTP: it imports only the protocol, and starts fast", "jobs.cli"),
])
def test_the_protocol_the_runners_and_the_cli_are_forbidden_every_other_module_of_jobs(
        contract: str, own: str) -> None:
    # A forbidden list names modules: one left off (a new one) would be importable unseen.
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - the same parser, as a package, before 3.11
        import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    forbidden = next(c for c in contracts["contracts"]
                     if c["name"] == contract)["forbidden_modules"]
    others = {f"jobs.{path.stem if path.is_file() else path.name}"
              for path in (ROOT / "jobs").iterdir()
              if (path.suffix == ".py" or (path / "__init__.py").is_file())
              and path.name not in ("__init__.py", "__main__.py", "protocol")}
    assert others - set(forbidden) - {own} == set()


def test_settings_exported_for_ones_own_server_stay_out_of_the_tests() -> None:
    # README's Configuration invites `export OFFLOAD_...`; the suite's servers must not obey.
    env = {**os.environ, "OFFLOAD_JOB_TIMEOUT_S": "0.001"}  # every job would time out
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_api.py::test_seed_frontend_flow"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


@pytest.mark.parametrize("modules", [
    ["jobs.protocol", "jobs.protocol.embedded", "jobs.protocol.remote", "jobs.protocol.urls",
     "jobs.protocol.wake"],
    ["runners.sleep", "runners.chat", "runners.train"],  # what a runner loads at start
    ["launch"],  # launch.py and its parts in launcher/: they run before .venv exists
])
def test_loads_only_the_standard_library_and_the_protocol(modules: list[str]) -> None:
    code = ("import sys; before = set(sys.modules); "
            + "; ".join(f"import {m}" for m in modules)
            + "; print(*sorted(set(sys.modules) - before))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, check=True, timeout=60).stdout.split()
    ours = ("jobs.protocol", "runners", "launch")  # "launch": launch and launcher.*
    foreign = [m for m in loaded if m.split(".")[0] not in sys.stdlib_module_names
               and not m.startswith(ours) and m != "jobs"]
    assert not foreign, foreign


def test_no_route_resolves_a_dependency_in_a_thread() -> None:
    """FastAPI runs a plain `def` dependency in its thread pool: a thread hop on every
    request that takes it."""
    import importlib
    import inspect
    import pkgutil

    from fastapi.dependencies.models import Dependant
    from fastapi.routing import APIRoute

    import jobs.api

    def threaded(dependant: Dependant) -> list[str]:
        found = []
        for dependency in dependant.dependencies:
            call = dependency.call
            if call is not None and not inspect.iscoroutinefunction(call):
                found.append(getattr(call, "__qualname__", repr(call)))
            found += threaded(dependency)
        return found

    routers = [importlib.import_module(f"jobs.api.{each.name}") for each in
               pkgutil.iter_modules(jobs.api.__path__) if each.name.startswith("routes_")]
    assert len(routers) >= 5
    found = {f"{route.path}: {name}" for module in routers for route in module.router.routes
             if isinstance(route, APIRoute) for name in threaded(route.dependant)}
    assert not found, "make these dependencies `async def`:\n" + "\n".join(sorted(found))
