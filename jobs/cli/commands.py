"""The commands that look at jobs and submit them: status, list, show, wait, log, submit."""

from __future__ import annotations

import argparse
import json
import re
import secrets
import shlex
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from jobs import protocol as p
from jobs.cli.client import (
    BATCH_JOB_S,
    EXIT_JOB_FAILED,
    EXIT_OK,
    EXIT_SERVER,
    EXIT_USAGE,
    LIST_MAX,
    REQUEST_TIMEOUT_S,
    Client,
    Failure,
    Unreachable,
    job_path,
    offload_job,
)
from jobs.cli.follow import follow, live_jobs, reconnecting, until_all_ended, until_ended
from jobs.cli.ids import job_id
from jobs.cli.show import (
    cap_said,
    job_details,
    job_table,
    kind_caps_said,
    note,
    print_json,
    remedy,
    shown,
    table,
)

INPUT_EXAMPLE = '{"seconds": 2}'
STATES = [state.value for state in p.JobState]
ENDED = [state for state in STATES if state in p.FINAL_STATES]


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    health = client.call("GET", "/api/health")
    counts = client.call("GET", "/api/history?seconds=5&jobs=0")
    running = client.call("GET", "/api/jobs?state=running&limit=1000"
                                 + ("" if args.json else "&fields=summary"))["jobs"]
    if args.json:
        print_json({"url": client.url, "health": health, "counts": counts["counts"],
                     "running": running})
        return _health_code(health)
    llm = health.get("llm") or {}
    model = " ".join(str(part) for part in (llm.get("provider"), llm.get("model")) if part)
    model += f" at {llm['base_url']}" if llm.get("base_url") else ""
    model += ": ready" if llm.get("ready") else f": not ready ({llm.get('detail') or '-'})"
    rows = [["offload", f"{health.get('version')} at {client.url}: {health.get('status')}"],
            ["supervisor", f"{health.get('supervisor')} (launcher {health.get('launcher')})"],
            ["runners", f"{health.get('running')} running of {health.get('max_concurrent')}, "
                        f"{health.get('queued')} queued"],
            ["jobs", ", ".join(f"{state} {counts['counts'].get(state, 0)}" for state in STATES)],
            ["model", model]]
    queue = health.get("queue")
    if isinstance(queue, dict):
        cap = f", {cap_said(queue)}" if "max_concurrent_set" in queue else ""
        rows.append(["queue", f"{'paused' if queue.get('paused') else 'running'}{cap}"])
        rows.extend(["", line] for line in kind_caps_said(queue))
    samples = counts.get("metrics", {}).get("samples") or []
    if samples:
        rows.append(["machine", f"cpu {samples[-1].get('cpu')} %, memory "
                                f"{samples[-1].get('mem')} %"])
    table(rows, sys.stdout)
    if running:
        sys.stdout.write("\n")
        job_table(running, sys.stdout)
    return _health_code(health)


def _health_code(health: dict[str, Any]) -> int:
    """A script's `offload status && ...`: a supervisor that is stalled launches nothing,
    a data folder that cannot be written stores nothing."""
    problems = list(health.get("problems") or [])
    if health.get("supervisor") == "stalled":
        problems.append("the supervisor is stalled (no sign of life for 15 s): nothing "
                        "starts; see supervisor.log in the data folder")
    for problem in problems:
        sys.stderr.write(f"offload: {problem}\n")
    return EXIT_SERVER if problems else EXIT_OK


def cmd_list(client: Client, args: argparse.Namespace) -> int:
    if args.all and args.limit is not None:
        raise Failure(EXIT_USAGE, "give --all or --limit, not both")
    jobs: list[dict[str, Any]] = []
    before = job_id(args.before, "--before")
    while True:  # with --all, page after page: a listing gives at most LIST_MAX
        query = {"state": args.state, "kind": args.kind, "before": before,
                 "limit": LIST_MAX if args.all else args.limit,
                 # A table needs no input, output nor result (an older server sends them
                 # anyway); --json prints the jobs in full.
                 "fields": None if args.json else "summary"}
        given = urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        try:
            page = client.call("GET", f"/api/jobs?{given}")
        except Failure as exc:
            if jobs and exc.code == EXIT_USAGE:  # the page's last job pruned meanwhile
                raise Failure(EXIT_SERVER, f"{exc.message}; the listing changed as it was "
                                           "read: run it again") from None
            raise
        if (args.before or args.all) and "next_before" not in page:
            raise Failure(EXIT_SERVER, "this server is older: it lists no further than its "
                                       "newest 1000 jobs; leave out --before and --all")
        jobs += [offload_job(client.url, job) for job in page["jobs"]]
        before = page.get("next_before")
        if not (args.all and before):
            break
    queue = _queue(client) if any(job.get(p.F_STATE) == p.JobState.QUEUED for job in jobs) else {}
    if args.json:
        print_json(jobs)
    else:
        job_table(jobs, sys.stdout)
    if queue.get("paused") is True:
        sys.stderr.write("the queue is paused: queued jobs start once resumed (offload "
                         "resume)\n")
    if before:  # on stderr: what a script reads stays the listing
        every = "" if args.limit is not None else " (or --all)"
        sys.stderr.write(f"older ones: {_next_page(args, before)}{every}\n")
    return EXIT_OK


def _next_page(args: argparse.Namespace, before: str) -> str:
    """The `offload list` that gives the page after this one, with this one's filters."""
    given = [part for name in ("url", "state", "kind", "limit")
             if getattr(args, name, None) not in (None, False)
             for part in (f"--{name}", shlex.quote(str(getattr(args, name))))]
    return " ".join(["offload list", *given, "--before", before,
                     *(["--json"] if args.json else [])])


def cmd_show(client: Client, args: argparse.Namespace) -> int:
    job = client.job("GET", f"/api/jobs/{job_path(args.id)}")
    if args.json:
        print_json(job)
    else:
        job_details(job, sys.stdout)
    if job.get(p.F_STATE) == p.JobState.QUEUED and _queue(client).get("paused") is True:
        sys.stderr.write("the queue is paused: it starts once resumed (offload resume)\n")
    return EXIT_OK


def cmd_wait(client: Client, args: argparse.Namespace) -> int:
    """As `pueue wait [ID...]`: until each job (by default: each queued or running now)
    has ended; a table of them (or their JSON)."""
    ids = list(dict.fromkeys(job_path(each) for each in args.ids))
    if ids:
        return _wait_all(client, ids, args)
    # Thousands of jobs: a request for each would be thousands of requests (and a wait).
    live = reconnecting(lambda: live_jobs(client))
    if not live:
        if args.json:
            print_json([])
        else:  # on stderr: stdout stays the jobs waited for, none
            sys.stderr.write("no queued or running jobs: nothing to wait for\n")
        return EXIT_OK
    jobs = sorted(live.values(), key=p.fifo_key)
    _say_why_it_waits(client, jobs, counted=True)
    return _shown(until_all_ended(client, [str(job[p.F_ID]) for job in jobs], args.json),
                  args)


def _wait_all(client: Client, ids: list[str], args: argparse.Namespace) -> int:
    # An unknown id exits 5 before any wait; a job ended already is kept as it is now
    # (by the end of a long wait for another, it may have been pruned).
    finals = [client.job("GET", f"/api/jobs/{job_id}") for job_id in ids]
    _say_why_it_waits(client, finals, counted=True)
    for n, job in enumerate(finals):
        if job.get(p.F_STATE) not in p.FINAL_STATES:
            finals[n] = until_ended(client, ids[n])
    return _shown(finals, args)


def _shown(finals: list[dict[str, Any]], args: argparse.Namespace) -> int:
    """The jobs waited for, as a table or JSON; EXIT_OK if all completed."""
    if args.json:
        print_json(finals)
    else:
        job_table(finals, sys.stdout)
    return max(_outcome(job) for job in finals)


def _outcome(job: dict[str, Any]) -> int:
    """EXIT_OK for a completed job; else its error on stderr and EXIT_JOB_FAILED."""
    if job.get(p.F_STATE) == p.JobState.COMPLETED:
        return EXIT_OK
    error = job.get(p.F_ERROR) or {}
    reason = error.get("message") or error.get("type") or "no reason given"
    sys.stderr.write(shown(f"offload: job {job.get(p.F_ID)} {job.get(p.F_STATE)}: {reason}\n",
                            sys.stderr))
    return EXIT_JOB_FAILED


def cmd_log(client: Client, args: argparse.Namespace) -> int:
    if not args.follow:
        text = client.text(f"/api/jobs/{job_path(args.id)}/log")
        if args.json:
            print_json({"id": args.id, "log": text})
        elif text:
            sys.stdout.write(shown(text, sys.stdout))
        elif client.job("GET", f"/api/jobs/{job_path(args.id)}")[p.F_STATE] == p.JobState.QUEUED:
            sys.stderr.write(f"offload: job {args.id} has not started yet, so has logged "
                             "nothing (offload log ID --follow waits for it)\n")
        else:
            sys.stderr.write(f"offload: job {args.id} has logged nothing (its output, if "
                             "any: offload show ID)\n")
        return EXIT_OK
    return _follow_log(client, args)


def _follow_log(client: Client, args: argparse.Namespace) -> int:
    """The job's output as it streams; its progress on stderr while it writes none."""
    progress_seen: list[Any] = [None]

    attempt_shown: list[Any] = [None]
    line_open = [False]  # the output printed so far does not end a line

    def show(event: dict[str, Any], job: dict[str, Any]) -> None:
        attempt = job.get(p.F_ATTEMPT) or 1
        if attempt_shown[0] is not None and attempt != attempt_shown[0] and not args.json:
            # A retry starts its output afresh: the earlier attempt's stays, marked as such.
            if line_open[0]:
                sys.stdout.write("\n")
            earlier = (job.get(p.F_EARLIER_ERRORS) or [{}])[-1]
            said = (f"[attempt {attempt - 1} failed ({earlier.get('message', '?')}); "
                    f"attempt {attempt} of {job.get(p.F_MAX_ATTEMPTS) or '?'}]\n")
            sys.stderr.write(shown(said, sys.stderr))
            line_open[0] = False
        attempt_shown[0] = attempt
        if args.json:
            sys.stdout.write(json.dumps(event, ensure_ascii=False) + "\n")
        elif p.F_OUTPUT in event or p.OUTPUT_DELTA in event:
            text = event.get(p.F_OUTPUT, event.get(p.OUTPUT_DELTA)) or ""
            sys.stdout.write(shown(text, sys.stdout))
            if text:
                line_open[0] = not text.endswith("\n")
        sys.stdout.flush()
        progress = job.get(p.F_PROGRESS)
        if not args.json and progress and progress != progress_seen[0]:
            progress_seen[0] = progress
            if not job.get(p.F_OUTPUT):  # never inside a reply being written
                sys.stderr.write(shown(f"[{note({p.F_PROGRESS: progress})}]\n", sys.stderr))

    def first(event: dict[str, Any], job: dict[str, Any]) -> None:
        if attempt_shown[0] is None:  # the job as it is now, before any change
            _say_why_it_waits(client, [job], counted=True)
        show(event, job)

    job = follow(client, args.id, first)
    if not args.json and job.get(p.F_OUTPUT) and not str(job[p.F_OUTPUT]).endswith("\n"):
        sys.stdout.write("\n")
    return _outcome(job)


def wait_and_report(client: Client, job: dict[str, Any], args: argparse.Namespace) -> int:
    if not args.wait:
        if args.json:
            print_json(job)
        else:
            sys.stdout.write(f"{job[p.F_ID]}\n")
        return EXIT_OK
    # Said first: Ctrl-C while it waits leaves the job running, and its id is how to reach it.
    sys.stderr.write(f"{job[p.F_ID]} submitted; waiting for it to end (Ctrl-C stops the "
                     "waiting, not the job)\n")
    _say_why_it_waits(client, [job])
    final = until_ended(client, job[p.F_ID])
    if args.json:
        print_json(final)
    else:
        job_details(final, sys.stdout)
    return _outcome(final)


def _say_why_it_waits(client: Client, jobs: list[dict[str, Any]],
                      counted: bool = False) -> None:
    """Before waiting for jobs: that those queued wait for the queue to be resumed, for
    a kind's cap to leave room, or for the start time they were given (the wait would look
    stuck). `counted`: the jobs as `GET` answers them, with why each waits."""
    if not any(job.get(p.F_STATE) == p.JobState.QUEUED for job in jobs):
        return
    if _queue(client).get("paused") is True:
        they = "it starts" if len(jobs) == 1 else "they start"
        sys.stderr.write(f"offload: the queue is paused: {they} once resumed (offload resume)\n")
    for job in (job for job in jobs if job.get(p.F_STATE) == p.JobState.QUEUED):
        if not counted:  # a 202's job: why it waits is not counted yet
            job = client.job("GET", f"/api/jobs/{job_path(str(job.get(p.F_ID)))}")
        said = note(job)
        if said.startswith("held: "):
            sys.stderr.write(f"offload: job {job.get(p.F_ID)} is {said}: it starts once one "
                             f"of them ends ({remedy(job)})\n")
        elif said.startswith("starts "):  # --delay or --at: no sooner
            sys.stderr.write(f"offload: job {job.get(p.F_ID)} {said}, as submitted\n")


def _queue(client: Client) -> dict[str, Any]:
    """`GET /api/queue`: whether it is paused; {} from an older server."""
    try:
        queue = client.call("GET", "/api/queue")
    except Failure:  # an older server, without the route: not paused
        return {}
    return queue if isinstance(queue, dict) else {}


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
        headers = {"Idempotency-Key": args.key} if args.key else None
        try:
            job = client.job("POST", "/api/jobs", body, headers)
        except Failure as exc:
            exc.message = _as_key(exc.message, args.key)
            raise
        return wait_and_report(client, job, args)
    return _submit_batch(client, body, args)


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
    key = args.key or f"offload-submit-{secrets.token_hex(16)}"
    try:
        jobs = client.call("POST", "/api/jobs/batch",
                           {"jobs": [{**body, "input": each} for _, each in inputs]},
                           {"Idempotency-Key": key},
                           REQUEST_TIMEOUT_S + BATCH_JOB_S * len(inputs))["jobs"]
    except Unreachable as exc:
        if isinstance(exc.reason, (ConnectionRefusedError, socket.gaierror)):  # never sent
            raise
        raise Unreachable(f"no answer to the batch from {client.url} ({exc.reason or exc}); some "
                          f"of its jobs may be stored: the same command again with --key {key} "
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
    return _wait_all(client, ids, args)


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
