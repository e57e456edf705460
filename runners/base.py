"""What every runner shares: read the job, report into it, finish it, obey a stop.

A runner module defines `execute(job: Job) -> dict | None` and calls `main()`:

    python -m runners.<kind> --job-file var/jobs/<id>/job.json   # as the launcher does
    python -m runners.<kind> [direct options]                # by hand, no job file

Standard library only (plus the kind's own client): this runs in every subprocess. The
parts live beside it, each imported here so that the fork server has them all loaded.
"""

from __future__ import annotations

import sys

from jobs.protocol import remote, trust
from runners.by_hand import run_by_hand
from runners.job import Job as Job, RunnerError as RunnerError, number as number
from runners.job_file import run_job_file, run_remote

# Every runner pays for its imports at start: typing stays out of run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from runners.by_hand import DirectContext, DirectInput, DirectParser
    from runners.execution import Execute


def main(
    kind: str,
    execute: Execute,
    add_arguments: DirectParser,
    direct_input: DirectInput,
    argv: Sequence[str] | None = None,
    direct_context: DirectContext | None = None,
) -> int:
    """`direct_context(args)`: a context manager around a run by hand (the chat runner
    starts a model server in it when none is configured)."""
    trust.private_files()  # forked or exec'd, by the supervisor or by hand: private files
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 2 and argv[0] == "--job-file":
        # The launcher's exact form: skip argparse, every millisecond of start counts.
        return run_job_file(argv[1], execute, kind)
    if argv == [remote.REMOTE_FLAG]:
        return run_remote(execute)
    return run_by_hand(kind, execute, add_arguments, direct_input, argv, direct_context)
