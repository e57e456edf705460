"""Diagnostic kind: sleep, report progress, echo the input. Measures the machinery.

Input: {"seconds": float, "steps": int (progress updates, default 10),
        "spawn_child": bool (start a child process that outlives nothing: tests use it),
        "exit_code": int (exit abruptly with this code, without a final state),
        "fail": str (raise an error with this message),
        "spew": bool (print lines to the log as fast as it can for the whole time)}
"""

from __future__ import annotations

import os
import sys
import time

from runners import base

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any


def execute(job: base.Job) -> dict[str, Any]:
    seconds = float(job.input.get("seconds", 0))
    steps = max(1, int(job.input.get("steps", 10)))
    child = None
    if job.input.get("spawn_child"):
        import subprocess

        # A grandchild of the supervisor that must die with this runner.
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"],
                                 stdin=subprocess.DEVNULL)
        job.data["child_pid"] = child.pid
        job.progress(0.0, f"child {child.pid} started")
    if job.input.get("ignore_sigterm"):
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if "exit_code" in job.input:
        os._exit(int(job.input["exit_code"]))
    if job.input.get("fail"):
        raise base.RunnerError(str(job.input["fail"]))
    if job.input.get("spew"):
        _spew(job, seconds)
    elif seconds > 0:
        for step in range(1, steps + 1):
            time.sleep(seconds / steps)
            job.progress(step / steps, f"step {step}/{steps}")
    return {"slept_s": seconds, "echo": job.input, "child_pid": child.pid if child else None}


def _spew(job: base.Job, seconds: float) -> None:
    """A runner printing without end: the supervisor must cap its log."""
    line = "spew " + "x" * 95 + "\n"
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        sys.stdout.write(f"{n:>10} {line}" * 100)
        n += 100
        if n % 100_000 == 0:
            job.progress(1 - (end - time.monotonic()) / seconds, f"{n} lines")
    sys.stdout.flush()
    print(f"spewed {n} lines", flush=True)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("seconds", nargs="?", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=10)


def _direct_input(args: argparse.Namespace) -> dict[str, Any]:
    if args.seconds < 0:
        raise ValueError("seconds must be >= 0")
    return {"seconds": args.seconds, "steps": args.steps}


def main(argv: list[str] | None = None) -> int:
    return base.main("sleep", execute, _add_arguments, _direct_input, argv)


if __name__ == "__main__":
    sys.exit(main())
