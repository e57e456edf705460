"""Diagnostic kind: sleep, report progress, echo the input. Measures the machinery.

Input: {"seconds": float (0 to 3600, default 0), "steps": int (progress updates, 1 to
10000, default 10)}, as the API's SleepInput checks it. Anyone may submit it, so it
takes nothing else: the tests' knobs (a child process, an ignored SIGTERM, a crash, a
failure, a flood of output) are the test-only kind in tests/probe_runner.py.

By hand: `python -m runners.sleep [seconds] [--steps N]` (seconds default to 1).
"""

from __future__ import annotations

import sys
import time

from runners import base

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any


# Each option's (default, lowest, highest): checked here and, before a job is created, by
# the API's SleepInput (jobs/inputs.py), which is built from these.
SECONDS = (0, 0, 3600)
STEPS = (10, 1, 10_000)  # progress updates


def execute(job: base.Job) -> dict[str, Any]:
    seconds, steps = _options(job.input)
    if seconds > 0:
        for step in range(1, steps + 1):
            time.sleep(seconds / steps)
            job.progress(step / steps, f"step {step}/{steps}")
    return {"slept_s": seconds, "echo": job.input}


def _options(options: dict[str, Any]) -> tuple[float, int]:
    return (base.number(options, "seconds", SECONDS),
            int(base.number(options, "steps", STEPS, whole=True)))


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("seconds", nargs="?", type=float, default=1.0,
                        help="how long to sleep (default: 1)")
    parser.add_argument("--steps", type=int, default=STEPS[0],
                        help=f"progress updates along the way (default: {STEPS[0]})")


def _direct_input(args: argparse.Namespace) -> dict[str, Any]:
    job_input = {"seconds": args.seconds, "steps": args.steps}
    _options(job_input)  # out of bounds: bad usage, as the API's 422
    return job_input


def main(argv: list[str] | None = None) -> int:
    return base.main("sleep", execute, _add_arguments, _direct_input, argv)


if __name__ == "__main__":
    sys.exit(main())
