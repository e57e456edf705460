"""What a warm interpreter does to become a runner: a child of the fork server
(`jobs.launch.forkserver`) or a spare (`jobs.launch.spare`). Light on imports: a spare
pays for each of them once per job."""

from __future__ import annotations

import importlib
import os
import runpy
import sys
import threading

from jobs import protocol as p

# A spare pays for each import once per job: typing stays out of run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.machinery import ModuleSpec
    from types import CodeType
    from typing import NoReturn

if sys.platform == "linux":
    # Loaded once, ahead: a runner then only writes its title.
    import setproctitle

# Room a runner's title can take (its job file's path), whatever the supervisor's
# environment holds: setproctitle writes over the arguments and the environment block.
TITLE_ROOM = 1024
TITLE_ROOM_ENV = "OFFLOAD_FORKSERVER_TITLE_ROOM"

# The preloaded runner modules' code, so that a job's runner reads no file (runpy would).
_code: dict[str, tuple[ModuleSpec, CodeType]] = {}
_code_mtimes: dict[str, int] = {}  # each one's file, as it was before its code was read


def preload(modules: Sequence[str], who: str) -> None:
    """Import the runner modules and keep their code; a broken one is said on stderr."""
    for name in modules:
        try:
            spec = importlib.import_module(name).__spec__
            if spec is None or spec.origin is None or spec.submodule_search_locations is not None:
                continue  # a package runs its __main__: left to runpy
            mtime = os.stat(spec.origin).st_mtime_ns  # an edit from now on is seen as one
            get_code = getattr(spec.loader, "get_code", None)
            code = get_code(name) if get_code is not None else None
        except Exception as exc:  # a broken runner: its jobs will say so when they run
            print(f"{who}: cannot preload {name}: {exc}", file=sys.stderr)
            continue
        if code is not None:
            _code[name] = (spec, code)
            _code_mtimes[spec.origin] = mtime


def forget_code() -> None:
    """Run the runner modules from their files again (they were edited since read)."""
    _code.clear()
    _code_mtimes.clear()


def run_as_main(module: str, job_file: str) -> NoReturn:
    """Run a preloaded runner module as `python -m <module> --job-file <job_file>` would,
    then end the process the way multiprocessing ends a forked child: wait for its
    threads, flush, `os._exit` — not a teardown of the hundreds of modules a warm
    interpreter has loaded."""
    code = _run_module(module, job_file)
    try:
        threading._shutdown()  # type: ignore[attr-defined]  # non-daemon threads, as at exit
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def _run_module(module: str, job_file: str) -> int:
    sys.argv = [module, "--job-file", job_file]
    # A fresh __main__, not the preloaded module (whose imports stay loaded: they are
    # what the preloading saves).
    sys.modules.pop(module, None)
    try:
        if module in _code:
            _exec_as_main(*_code[module])
        else:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except BaseException:
        import traceback

        traceback.print_exc()
        return 1
    return 0


def _exec_as_main(spec: ModuleSpec, code: CodeType) -> None:
    """What `runpy.run_module(name, run_name="__main__", alter_sys=True)` does, with code
    already read; nothing to restore after it, as the process ends."""
    main = type(sys)("__main__")
    main.__dict__.update(__file__=spec.origin, __cached__=spec.cached, __loader__=spec.loader,
                         __package__=spec.parent, __spec__=spec)
    sys.modules["__main__"] = main
    sys.argv[0] = spec.origin or sys.argv[0]
    exec(code, main.__dict__)


def project_files() -> dict[str, int]:
    """The project's modules this interpreter has loaded, with their mtimes."""
    files = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and path.startswith(p.ROOT + os.sep) and ".venv" not in path:
            try:
                files[path] = _code_mtimes.get(path) or os.stat(path).st_mtime_ns
            except OSError:
                files[path] = 0
    return files


def edited_since(files: dict[str, int]) -> bool:
    """Whether a file of `files` (from `project_files`) has changed since: a stat each.
    Not a new walk over the loaded modules: in a fork server each module touched is a
    page copied (its pages are shared with the children forked; docs/benchmarks.md)."""
    for path, mtime in files.items():
        try:
            if os.stat(path).st_mtime_ns != mtime:
                return True
        except OSError:
            if mtime != 0:
                return True
    return False


def show_command_line(argv: list[str]) -> None:
    """Show `argv` as this process's command line (what `ps` and psutil show): one
    string, its spaces separating the arguments. Linux only."""
    if sys.platform == "linux":
        name = setproctitle.getthreadtitle()
        setproctitle.setproctitle(" ".join(argv))
        # setproctitle renames the process too; top and pgrep keep the interpreter's name.
        setproctitle.setthreadtitle(name)
