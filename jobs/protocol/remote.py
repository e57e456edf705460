"""A runner on another machine (a Ray node): how its job travels there in its
environment, and how its snapshots come back in its log. Standard library only."""

from __future__ import annotations

import json

from jobs import protocol as p

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import MutableMapping, Sequence
    from typing import Any

REMOTE_FLAG = "--remote-job"  # python -m runners.<kind> --remote-job, the job in JOB_ENV_<n>
# The job, encoded, in OFFLOAD_REMOTE_JOB_0, _1, ...: not on the command line, which every
# account on the node can read (/proc/<pid>/cmdline), where its environment is its own.
JOB_ENV = "OFFLOAD_REMOTE_JOB"
# A runner without the API's disk (on a Ray node) prints each job snapshot on stdout as
# one line `@@offload <key> <seq> <job JSON>`; the API side reads them from the engine's
# log. The key is a secret of that launch, given to the runner in this environment
# variable: the job's own output (its input, a model's reply) cannot know it, so it
# cannot print a line that passes for a snapshot.
SNAPSHOT_TAG = "@@offload"
SNAPSHOT_KEY_ENV = "OFFLOAD_SNAPSHOT_KEY"


def job_env(data: dict[str, Any]) -> dict[str, str]:
    """The environment variables that carry a job to its runner."""
    return {f"{JOB_ENV}_{n}": piece for n, piece in enumerate(encode_job(data))}


def pop_job(environ: MutableMapping[str, str]) -> dict[str, Any]:
    """The job `job_env` put in `environ`, taken out of it (the job's own child processes
    do not inherit it). Raises ValueError if it is missing or spoiled."""
    pieces: list[str] = []
    while (piece := environ.pop(f"{JOB_ENV}_{len(pieces)}", None)) is not None:
        pieces.append(piece)
    if not pieces:
        raise ValueError(f"{JOB_ENV}_0 is not set")
    return decode_job(pieces)


def encode_job(data: dict[str, Any], piece_chars: int = 100_000) -> list[str]:
    """A job as ASCII pieces: JSON, zlib, URL-safe base64, cut into pieces (Linux refuses
    any single argument or environment string over 128 KiB)."""
    import base64
    import zlib

    raw = zlib.compress(json.dumps(data, separators=(",", ":")).encode(), 6)
    text = base64.urlsafe_b64encode(raw).decode("ascii")
    return [text[i:i + piece_chars] for i in range(0, len(text), piece_chars)] or [""]


def decode_job(pieces: Sequence[str]) -> dict[str, Any]:
    import base64
    import binascii
    import zlib

    try:
        data = json.loads(zlib.decompress(base64.urlsafe_b64decode("".join(pieces))))
    except (binascii.Error, zlib.error, UnicodeDecodeError) as exc:
        raise ValueError(str(exc)) from exc
    if not isinstance(data, dict) or not p.is_valid_id(str(data.get(p.F_ID))):
        raise ValueError("not a job")
    return data


def snapshot_line(seq: int, data: dict[str, Any], key: str) -> str:
    """One snapshot as a line of stdout (ASCII only: the log may be decoded as anything)."""
    return f"{SNAPSHOT_TAG} {key} {seq} {json.dumps(data, separators=(',', ':'))}\n"


def split_snapshots(text: str, key: str) -> tuple[list[tuple[int, dict[str, Any]]], str]:
    """Complete lines of a runner's log: its snapshots (seq, job) and the other text.
    Only a line with the launch's key is a snapshot; any other line holding the key (one
    cut by output from another thread) is dropped, so the key is never shown."""
    prefix = f"{SNAPSHOT_TAG} {key} "
    snapshots: list[tuple[int, dict[str, Any]]] = []
    plain: list[str] = []
    for line in text.splitlines(keepends=True):
        if not key or key not in line:
            plain.append(line)
        elif line.startswith(prefix):
            seq, _, payload = line[len(prefix):].partition(" ")
            try:
                data = json.loads(payload)
            except ValueError:
                continue
            if isinstance(data, dict) and seq.isdigit():
                snapshots.append((int(seq), data))
    return snapshots, "".join(plain)
