"""The test-only job kind `probe`: the sleep kind plus knobs that make a runner
misbehave on purpose. Registered by the tests (`OFFLOAD_KINDS=probe=tests.probe_runner`,
see tests/__init__.py), never by Offload itself: anyone may submit a public kind.

Input: {"seconds": float, "steps": int (progress updates, default 10),
        "spawn_child": bool (start a child process that must die with the runner),
        "ignore_sigterm": bool (SIGTERM does nothing; only SIGKILL stops it),
        "exit_code": int (exit abruptly with this code, without a final state),
        "fail": str (raise an error with this message),
        "spew": bool (print lines to the log as fast as it can for the whole time),
        "linger_s": float (live on this long after its final state is written),
        "emit": int (emit this many characters of output, in pieces of 100,000),
        "count_to": str (append the job's id and this runner's pid to this file, at start),
        "pieces": [str] (emit each as output, "piece_gap_s" (default 1) apart, at start)}
"""

from __future__ import annotations

import os
import sys
import time

from runners import base, sleep

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def execute(job: base.Job) -> dict[str, Any]:
    child = None
    if job.input.get("count_to"):  # each run of the job, counted
        with open(str(job.input["count_to"]), "a") as runs:
            runs.write(f"{job.data['id']} {os.getpid()}\n")
    for number, piece in enumerate(job.input.get("pieces") or []):
        if number:
            time.sleep(float(job.input.get("piece_gap_s", 1)))
        job.emit(str(piece))
    if job.input.get("linger_s"):
        import threading

        # Not a daemon: the process waits for it, after the final state is written.
        threading.Thread(target=time.sleep, args=(float(job.input["linger_s"]),)).start()
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
    for _ in range(0, int(job.input.get("emit", 0)), 100_000):
        job.emit("0123456789" * 10_000)
    if "exit_code" in job.input:
        os._exit(int(job.input["exit_code"]))
    if job.input.get("fail"):
        raise base.RunnerError(str(job.input["fail"]))
    if job.input.get("spew"):
        _spew(job, float(job.input.get("seconds", 0)))
        return {"echo": job.input}
    return {**sleep.execute(job), "child_pid": child.pid if child else None}


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


def main(argv: list[str] | None = None) -> int:
    return base.main("probe", execute, sleep._add_arguments, sleep._direct_input, argv)


if __name__ == "__main__":
    sys.exit(main())
