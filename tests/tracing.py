"""strace on the real server: every process it starts traced from its first
instruction, and the trace parsed into system calls."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.server import Server

# A file put at its name: renamed onto it, or linked to it (a claim made only if none is).
PUT_IN_PLACE = ("rename", "renameat", "renameat2", "link", "linkat")


class TracedServer(Server):
    """The real server, every process it starts traced from its first instruction."""

    def __init__(self, strace: str, trace: Path, syscalls: str, *args: Any) -> None:
        super().__init__(*args)
        self.strace = strace
        self.trace = trace
        self.syscalls = syscalls

    def command(self) -> list[str]:
        # -y: a descriptor shows its path; --seccomp-bpf: only these calls stop the tracee.
        return [self.strace, "-f", "-qq", "-y", "-s", "400", "--seccomp-bpf",
                "-e", "signal=none", "-e", f"trace={self.syscalls}", "-o", str(self.trace),
                *super().command()]


@dataclass
class Call:
    tid: int
    name: str
    text: str
    start: int  # line of the trace where it began
    end: int  # line where it returned


def parse(trace: str) -> list[Call]:
    """System calls in the order they began; `<unfinished ...>` joined to its return."""
    calls: list[Call] = []
    unfinished: dict[int, Call] = {}
    for number, line in enumerate(trace.splitlines()):
        match = re.match(r"(\d+)\s+(.*)", line)
        if match is None:
            continue
        tid, rest = int(match[1]), match[2]
        if rest.startswith("<... "):
            call = unfinished.pop(tid, None)
            if call is not None:
                call.text += rest.split("resumed>", 1)[-1]
                call.end = number
            continue
        name = re.match(r"(\w+)\(", rest)
        if name is None:
            continue
        call = Call(tid, name[1], rest.removesuffix("<unfinished ...>"), number, number)
        if rest.endswith("<unfinished ...>"):
            unfinished[tid] = call
        calls.append(call)
    return calls
