"""A warm spare interpreter, where there is no safe fork (Windows, macOS; elsewhere with
`OFFLOAD_LAUNCH_MODE=spares`): `python -m jobs.launch.spare <runner modules>`.

The supervisor keeps a few started ahead (`jobs.launch.spare_pool`), each started as a
runner is: a process group of its own, low priority, the runners' environment. A spare
imports the runner modules it is named, says so on its stdout, then waits for one line
on its stdin: `{"module", "job_file"}`. It then becomes that job's runner: it opens the
job's log itself and sends its output there (Windows cannot hand it a file descriptor),
empties its stdin, shows `python -m <module> --job-file <file>` as its command line
(Linux), and runs the module as `python -m` would; when the runner ends, the process
ends (as a forked runner: without a teardown of its modules). So the supervisor sees a
runner like any other: its own pid, create time, process group and exit code, one fresh
process per job; a spare never takes a second job. If a file of the project changed
since the spare imported it, the project's modules are imported afresh for the job. A
spare whose stdin closes before a job comes (the supervisor left) exits.
"""

from __future__ import annotations

import json
import os
import sys

from jobs import protocol as p
from jobs.launch.warm import (
    TITLE_ROOM_ENV,
    edited_since,
    forget_code,
    preload,
    project_files,
    run_as_main,
    show_command_line,
)
from jobs.protocol import trust

# Everything here runs once per job: imports only what a runner loads anyway.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence


READY = b"warm\n"  # on its stdout, once it has imported the runners


def main(modules: Sequence[str]) -> int:
    trust.private_files()  # the job's log, and all its runner writes
    preload(modules, "spare")
    files = project_files()
    try:
        os.write(1, READY)
    except OSError:
        return 0  # the supervisor is gone
    line = sys.stdin.buffer.readline()
    if not line.strip():
        return 0  # the supervisor left without a job for it
    request = json.loads(line)
    module, job_file = str(request["module"]), str(request["job_file"])
    _become_runner(p.sibling(job_file, p.LOG_FILE))
    if edited_since(files):  # edited since imported: the runner runs them as they are
        _forget_modules(files)
        forget_code()
    show_command_line([sys.executable, "-m", module, "--job-file", job_file])
    os.environ.pop(TITLE_ROOM_ENV, None)  # its room is taken now; the runner never sees it
    run_as_main(module, job_file)


def _become_runner(log_path: str) -> None:
    """Stdin empty, stdout and stderr to the job's log, as a started runner has them (its
    stdout to the pool closes)."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    log_fd = p.open_log(log_path)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(devnull)
    os.close(log_fd)


def _forget_modules(files: dict[str, int]) -> None:
    for name, module in list(sys.modules.items()):
        if name != "__main__" and getattr(module, "__file__", None) in files:
            del sys.modules[name]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
