"""A warm interpreter that forks runners (Linux): `python -m jobs.launch.forkserver`.

A runner started with exec is a new interpreter, and the kernel's share of it (exec,
page faults) is shielded by no scheduling policy: a burst of such starts slows the API
far more than forks of an interpreter that has already imported the runners
(docs/benchmarks.md). So the supervisor keeps one of these. It has
imported the built-in runners; it forks each child ahead, while idle: the child makes
itself a process group of its own and waits for one job (a child that never gets one
exits with the server, unreported); given its job it answers, makes itself SCHED_IDLE
(only then: a SCHED_IDLE child on a busy machine would answer seconds late), sends its
output to the job's log, shows
`python -m runners.<kind> --job-file <file>` in `ps`, and runs the module as
`python -m` would. If a file of the project changed since this server started, the
child execs a fresh interpreter instead, so an edited runner always runs as edited.

Protocol, JSON lines: it says `{"ready": pid}` once it has imported the runners, and
`{"ahead": pid}` for each child forked ahead (the supervisor's claim may name it); the
supervisor writes `{"module", "job_file", "log"}` to its stdin; the answer is
`{"error": "..."}` from the server if it cannot fork, else `{"pid": n}` from the child
itself, before it runs anything of the job; later the server says `{"exit": pid,
"code": n}` when that child ends. So a server that dies or stalls right after a fork
loses no runner: until a child has answered it holds the reply pipe open, and the
supervisor starts a job another way only once that pipe has closed unanswered. The
server exits when its stdin closes (the supervisor is gone); its children run on, and a
later supervisor adopts them like any runner.

Once the supervisor has synced a runner's claim it writes `{"claim": pid, "job_file",
"durable": true}`, and the server passes the word on to the child it handed that job
on the pipe that brought the job: its runner waits for the word instead of syncing the
claim again (told false, or the pipe closed, it syncs the claim itself). No other
child holds that pipe: each closes the server's pipes to the others.

What a child does is in `jobs.launch.fork_child`; the supervisor's side, in
`jobs.launch.fork_client`.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
from typing import Any

from jobs.launch.fork_child import Ahead, fork_for_request, fork_waiting_child, send
from jobs.launch.warm import edited_since, preload, project_files, run_as_main
from jobs.protocol import trust

PRELOAD = ("runners.chat", "runners.sleep")  # train imports numpy: forked fresh instead
AHEAD_DELAY_S = 0.005  # idle this long after a request, the server forks the next runner
# Fault injection for the tests only; the product never sets it. `die_after_fork`: the
# server exits right after a fork, before it says anything; `stall_after_fork`: it goes
# on reading requests but never answers again. Real servers do this only by accident
# (the OOM killer, a stopped process), so a test cannot wait for one.
TEST_FAULT_ENV = "OFFLOAD_TEST_FORKSERVER_FAULT"


def main() -> int:
    trust.private_files()  # its children's job files and logs too
    preload(PRELOAD, "fork server")
    # The protocol leaves fds 0 and 1, so a stray print cannot corrupt it.
    requests, replies = os.dup(0), os.dup(1)
    os.dup2(2, 1)
    server = os.getpid()
    try:
        send(replies, {"ready": server})
        request = _serve(requests, replies, project_files())
    except BrokenPipeError:
        if os.getpid() != server:
            raise  # a child's answer: as any runner's failure
        return 0  # the supervisor is gone (its runners run on): nobody to tell anything
    if request is None:
        return 0
    # Only a forked child gets here, with the server's frames gone from its stack.
    run_as_main(request["module"], request["job_file"])


def _serve(requests: int, replies: int, files: dict[str, int]) -> dict[str, Any] | None:
    """Fork a child per request until stdin closes (None); in a child, its request."""
    if sys.platform == "win32":
        raise OSError("no fork on Windows")  # never started there; tells the type checker
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wake-up fd is written
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C in a terminal is for the API
    return _Server(requests, replies, files, (requests, replies, wake_r, wake_w)).serve()


class _Server:
    """The server's loop. The next child is forked ahead, while the server is idle, and
    waits for its request: the fork and the child's first steps are then off the path
    from a submission to its runner. It is forked AHEAD_DELAY_S after the last request,
    so that it does not take a core from the runner just given its job."""

    def __init__(self, requests: int, replies: int, files: dict[str, int],
                 fds: tuple[int, ...]) -> None:
        self.requests, self.replies, self.files, self.fds = requests, replies, files, fds
        self.ahead: Ahead | None = None
        self.ahead_due: float | None = time.monotonic()
        self.waiting: set[int] = set()  # forked ahead, without a job: no exit to report
        self.handed: dict[int, Ahead] = {}  # given a job, until told of its claim

    def serve(self) -> dict[str, Any] | None:
        wake_r = self.fds[2]
        pending = b""
        while True:
            due = self.ahead_due
            ready, _, _ = select.select([self.requests, wake_r], [], [],
                                        None if due is None else max(0.0, due - time.monotonic()))
            if wake_r in ready:
                os.read(wake_r, 4096)
                self._reap()
            if not ready:
                request = self._fork_ahead()
                if request is not None:
                    return request  # a child, given its job
                continue
            if self.requests not in ready:
                continue
            chunk = os.read(self.requests, 65536)
            if not chunk:
                return None
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = self._start(line)
                if request is not None:
                    return request  # a child forked for it

    def _start(self, line: bytes) -> dict[str, Any] | None:
        """Give the request to the child forked ahead, else fork one for it (None in the
        server; in that child, its request). A word on a claim goes to its runner."""
        request: dict[str, Any] = json.loads(line)
        if "claim" in request:
            handed = self.handed.get(int(request["claim"]))
            if handed is not None and handed.job_file == request.get("job_file"):
                del self.handed[handed.pid]
                handed.tell(bool(request.get("durable")))
            return None
        stale = edited_since(self.files)
        ahead, self.ahead = self.ahead, None
        if ahead is not None and not stale and ahead.hand(line, request.get("job_file")):
            self.waiting.discard(ahead.pid)
            self.handed[ahead.pid] = ahead
        else:
            if ahead is not None:  # its code is stale, or it is gone: it exits
                ahead.close()
            try:
                pid = fork_for_request(request, stale, self.replies, self._fds())
            except OSError as exc:
                send(self.replies, {"error": str(exc)})
                return None
            if pid == 0:
                return request
        # A stale server forks none ahead: every runner is a fresh interpreter.
        self.ahead_due = None if stale else time.monotonic() + AHEAD_DELAY_S
        _test_fault(self.requests)  # the child has answered, or will
        return None

    def _fork_ahead(self) -> dict[str, Any] | None:
        self.ahead_due = None
        if edited_since(self.files):
            return None
        try:
            forked = fork_waiting_child(self.replies, self._fds())
        except OSError as exc:  # EMFILE, EAGAIN, ENOMEM: nothing asked for it, so no answer
            # The next request gets a child forked for it, and the one after is ahead again.
            print(f"fork server: cannot fork a child ahead: {exc}", file=sys.stderr, flush=True)
            return None
        if isinstance(forked, dict):
            return forked
        self.ahead = forked
        self.waiting.add(forked.pid)
        send(self.replies, {"ahead": forked.pid})  # the supervisor may claim in its name
        return None

    def _fds(self) -> tuple[int, ...]:
        """What a new child must close: the server's own pipes, and those to the children
        handed a job (only the server may tell one of them that its claim is on disk)."""
        return self.fds + tuple(handed.fd for handed in self.handed.values())

    def _reap(self) -> None:
        """Report the exit of every child that ended, but of those forked ahead that
        never had a job."""
        if sys.platform == "win32":
            return
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            handed = self.handed.pop(pid, None)
            if handed is not None:
                handed.close()
            if pid in self.waiting:
                self.waiting.discard(pid)
            else:
                send(self.replies, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})
        if self.ahead is not None and self.ahead.pid not in self.waiting:  # died waiting
            self.ahead.close()
            self.ahead, self.ahead_due = None, time.monotonic() + AHEAD_DELAY_S


def _test_fault(requests: int) -> None:
    fault = os.environ.get(TEST_FAULT_ENV)
    if fault in ("die_after_fork", "stall_after_fork"):
        print(f"fork server: test fault {fault}", file=sys.stderr, flush=True)
    if fault == "die_after_fork":
        os._exit(1)
    if fault == "stall_after_fork":
        while os.read(requests, 65536):
            pass  # never answers; leaves when the supervisor does
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
