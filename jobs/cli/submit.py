"""`offload submit`: a job's input read (`--input`, `--inputs`: a file, stdin), one job
or a batch sent, and the server's words said for the command."""

from __future__ import annotations

import argparse
import json
import re
import secrets
import shlex
import socket
import sys
from typing import Any

from jobs import protocol as p
from jobs.cli.client import (
    BATCH_JOB_S,
    EXIT_OK,
    EXIT_SERVER,
    EXIT_USAGE,
    REQUEST_TIMEOUT_S,
    Client,
    Failure,
    Unreachable,
    offload_job,
)
from jobs.cli.show import print_json
from jobs.cli.wait import wait_all, wait_and_report

INPUT_EXAMPLE = '{"seconds": 2}'


# Past this a file can never be sent; below it the server's own 413 says what to do (a
# file's JSON may shrink or grow on its way into the request's).
READ_MAX_BYTES = 16 * p.MAX_BODY_BYTES


def _read(given: str, option: str) -> tuple[str, str]:
    """The text `option` names: `-` for stdin's, a file's (`@file` too); where it was, said
    as such. UTF-8, with or without the BOM Notepad writes."""
    where = "stdin" if given == "-" else given.removeprefix("@")
    try:
        if given == "-":
            if sys.stdin is None:  # `<&-`: no stdin at all
                raise Failure(EXIT_USAGE, f"{option} - reads stdin, which is closed: give "
                                          f"{option} a file")
            data = sys.stdin.buffer.read(READ_MAX_BYTES + 1)
        else:
            with open(where, "rb") as file:
                data = file.read(READ_MAX_BYTES + 1)
        if len(data) > READ_MAX_BYTES:  # /dev/zero, say: read whole, it filled the memory
            raise Failure(EXIT_USAGE, f"{option} {where} is over {READ_MAX_BYTES // 10**6} MB, "
                                      f"and a request takes at most {p.MAX_BODY_BYTES // 10**6} MB:"
                                      " give a smaller one")
        # Lines as a file opened as text has them: an old Mac's \r alone ends one too.
        return where, data.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
    except OSError as exc:
        raise Failure(EXIT_USAGE, f"cannot read {option} {where}: {exc.strerror}") from None
    except UnicodeError:
        raise Failure(EXIT_USAGE, f"{option} {where} is not UTF-8 text") from None


def parse_input(text: str) -> dict[str, Any]:
    """`--input`: JSON, `@file` for a file's, `-` for stdin's."""
    where = "--input"
    if text == "-" or text.startswith("@"):
        where, text = _read(text, "--input")
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise Failure(EXIT_USAGE, f"{where} is not JSON ({exc}); give an object, like "
                                  f"--input '{INPUT_EXAMPLE}' for a sleep job") from None
    except RecursionError:
        raise Failure(EXIT_USAGE, f"{where} is nested too deeply to be a job's input") from None
    if not isinstance(value, dict):
        raise Failure(EXIT_USAGE, f"{where} must be a JSON object, like "
                                  f"--input '{INPUT_EXAMPLE}' for a sleep job")
    return value


def parse_inputs(given: str) -> tuple[str, list[tuple[int, dict[str, Any]]]]:
    """`--inputs`: a file (or `-`, stdin) of JSON lines, one job's input object on each;
    its name as said, and each input with its line's number."""
    where, text = _read(given, "--inputs")
    inputs = []
    # Lines end at \n alone: JSON's strings may hold U+2028 and others that splitlines() cuts at.
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise Failure(EXIT_USAGE, f"line {n} of {where} is no JSON object ({exc}); give "
                                      f"one input a line, like {INPUT_EXAMPLE} for sleep "
                                      "jobs") from None
        if not isinstance(value, dict):
            raise Failure(EXIT_USAGE, f"line {n} of {where} is no JSON object; give one input "
                                      f"a line, like {INPUT_EXAMPLE} for sleep jobs")
        inputs.append((n, value))
    if not inputs:
        raise Failure(EXIT_USAGE, f"--inputs {where} holds no input: give one JSON object a "
                                  "line")
    return where, inputs


def cmd_submit(client: Client, args: argparse.Namespace) -> int:
    after = args.after  # checked, and made whole (jobs.cli.ids)
    body: dict[str, Any] = {"kind": args.kind}
    for field, value in (("timeout_s", args.timeout), ("priority", args.priority),
                         ("delay_s", args.delay), ("run_at", args.at),
                         ("max_attempts", args.max_attempts), ("depends_on", after or None)):
        if value is not None:
            body[field] = value
    # A retried submission with the same key gets the first one's job, not a second job.
    if args.key is not None and not args.key.strip():
        raise Failure(EXIT_USAGE, "--key is empty: give a key (any text up to 255 "
                                  "characters), or leave --key out")
    if args.inputs is None:
        body["input"] = parse_input(args.input if args.input is not None else "{}")
        key = args.key or _own_key()  # so that the command sent again stores no job twice
        try:
            job = client.job("POST", "/api/jobs", body, {"Idempotency-Key": key})
        except Unreachable as exc:
            raise _unanswered(exc, client.url, key, "the job may be stored",
                              "stores it only if it is not") from None
        except Failure as exc:
            exc.message = _as_key(exc.message, args.key)
            raise
        return wait_and_report(client, job, args)
    return _submit_batch(client, body, args)


def _own_key() -> str:
    return f"offload-submit-{secrets.token_hex(16)}"


def _unanswered(exc: Unreachable, url: str, key: str, stored: str, again: str) -> Unreachable:
    """A submission sent that got no answer: what may be stored, and the command that
    stores the rest (`exc` itself when it was never sent)."""
    if isinstance(exc.reason, (ConnectionRefusedError, socket.gaierror)):
        return exc
    return Unreachable(f"no answer from {url} ({exc.reason or exc}); {stored}: the same "
                       f"command again with --key {shlex.quote(key)} {again}")


def _as_key(message: str, key: str | None) -> str:
    """The server's words for an Idempotency-Key said as the option that gave it."""
    if key is None:
        return message
    return (message.replace("this Idempotency-Key", f"--key {shlex.quote(key)}")
            .replace("use a new key", "give another --key"))


def _submit_batch(client: Client, body: dict[str, Any], args: argparse.Namespace) -> int:
    """`submit --inputs`: one job a line, in one request; with a key of its own if none is
    given, so that the command sent again after a lost answer stores no job twice."""
    where, inputs = parse_inputs(args.inputs)
    key = args.key or _own_key()
    try:
        jobs = client.call("POST", "/api/jobs/batch",
                           {"jobs": [{**body, "input": each} for _, each in inputs]},
                           {"Idempotency-Key": key},
                           REQUEST_TIMEOUT_S + BATCH_JOB_S * len(inputs))["jobs"]
    except Unreachable as exc:
        raise _unanswered(exc, client.url, key, "some of its jobs may be stored",
                          "stores only those that are not") from None
    except Failure as exc:
        if exc.status == 405:  # /api/jobs/{id} takes no POST: no batch route there
            raise Failure(EXIT_SERVER, "this server is older: it takes no batch; submit each "
                                       "job with --input") from None
        exc.message = _as_key(_by_line(exc.message, [line for line, _ in inputs], where),
                              args.key)
        # The server's words for a batch too large, said for this command.
        fewer = ("send fewer lines at a time" if where == "stdin"
                 else f"split {where} into files of fewer lines")
        for said in ("send a smaller input, or a batch of fewer jobs", "send them in several"):
            exc.message = exc.message.replace(said, fewer)
        exc.message = exc.message.replace("This request stored no job", "This command stored "
                                                                        "no job")
        stored = exc.answer.get("stored")
        if isinstance(stored, list) and stored:  # before the job it names: said, as if done
            if args.json:
                print_json(stored)
            else:
                sys.stdout.write("".join(f"{job_id}\n" for job_id in stored))
            # The server's words (BatchStopped in jobs/api/service.py) said for this command.
            exc.message = exc.message.replace("(their ids are in `stored`)", "(their ids above)")
            exc.message = exc.message.replace(
                "send the batch again with the same Idempotency-Key to store the rest",
                f"run the same command again with --key {key} to store the rest")
        raise
    ids = [offload_job(client.url, job)[p.F_ID] for job in jobs]
    if not args.wait:
        if args.json:
            print_json(jobs)
        else:
            sys.stdout.write("".join(f"{job_id}\n" for job_id in ids))
        return EXIT_OK
    # Their ids first: a Ctrl-C while it waits leaves them running, and ids reach them.
    sys.stderr.write(f"{len(ids)} jobs submitted ({' '.join(ids)}); waiting for them to end "
                     "(Ctrl-C stops the waiting, not the jobs)\n")
    return wait_all(client, ids, args, submitted=True)


def _by_line(message: str, lines: list[int], where: str) -> str:
    """The server's `jobs[N]` (pydantic's `jobs.N.field`) said as the line of --inputs it
    was; a field the options set, alike on every line, said once by its name alone."""
    def line(n: int) -> str:
        return f"line {lines[n]} of {where}" if n < len(lines) else f"jobs[{n}]"

    message = re.sub(r"jobs\[(\d+)\]", lambda match: line(int(match.group(1))), message)
    head, found, problems = message.partition("invalid request: ")
    if not found:
        return message
    said = []
    for problem in problems.split("; "):
        each = re.match(r"jobs\.(\d+)\.(.*)", problem, re.DOTALL)
        if each is None:
            said.append(problem)
        elif each.group(2).startswith("input"):
            said.append(f"{line(int(each.group(1)))}: {each.group(2)}")
        else:
            said.append(each.group(2))
    return head + found + "; ".join(dict.fromkeys(said))
