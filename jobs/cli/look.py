"""The commands that look at jobs: status, list, show, log."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any

from jobs import protocol as p
from jobs.cli.client import (
    EXIT_OK,
    EXIT_SERVER,
    EXIT_USAGE,
    Client,
    Failure,
    job_path,
    offload_shaped,
)
from jobs.cli.follow import follow
from jobs.cli.show import (
    cap_said,
    job_details,
    job_table,
    kind_caps_said,
    note,
    print_json,
    shown,
    table,
)
from jobs.cli.wait import outcome, queue_state, say_why_it_waits

STATES = [state.value for state in p.JobState]
ENDED = [state for state in STATES if state in p.FINAL_STATES]
# Names for several states at once, as `--state` takes them; `live` queued ones first,
# which may depend on running ones.
GROUPS = {"live": [p.JobState.QUEUED.value, p.JobState.RUNNING.value], "finished": ENDED}


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    health = offload_shaped(client.url, client.call("GET", "/api/health"), "a health report",
                            status=str, supervisor=str)
    counts = offload_shaped(client.url, client.call("GET", "/api/history?seconds=5&jobs=0"),
                            "a history", counts=dict)
    running = offload_shaped(client.url, client.call(
        "GET", "/api/jobs?state=running&limit=1000" + ("" if args.json else "&fields=summary")),
        "a list of jobs", jobs=list)["jobs"]
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
    if health.get("supervisor") == "stalled" and not any("stalled" in each for each in problems):
        # a server before 0.10 says it in `supervisor` alone
        problems.append("the supervisor is stalled (no sign of life for 15 s): nothing "
                        "starts; end its process, or restart the server")
    for problem in problems:
        sys.stderr.write(f"offload: {problem}\n")
    return EXIT_SERVER if problems else EXIT_OK


def cmd_list(client: Client, args: argparse.Namespace) -> int:
    if args.all and args.limit is not None:
        raise Failure(EXIT_USAGE, "give --all or --limit, not both")
    start = args.before  # made whole (whole_ids)
    if args.state:
        args.state = list(dict.fromkeys(state for given in args.state
                                        for state in GROUPS.get(given, [given])))
    # A table needs no input, output nor result; --json prints the jobs in full (as the
    # server gives them by default).
    fields = None if args.json else "summary"
    if args.all:  # page after page: a listing gives at most LIST_MAX
        jobs, before = list(client.listed(args.state, fields, args.kind, start)), None
    else:
        jobs, before = client.listing(args.state, fields, start, args.limit, args.kind)
    paused = (any(job.get(p.F_STATE) == p.JobState.QUEUED for job in jobs)
              and queue_state(client).get("paused") is True)
    if args.json:
        print_json(jobs)
    else:
        job_table(jobs, sys.stdout)
    if paused:
        sys.stderr.write("the queue is paused: queued jobs start once resumed (offload "
                         "resume)\n")
    if before:  # on stderr: what a script reads stays the listing
        every = "" if args.limit is not None else " (or --all)"
        sys.stderr.write(f"older ones: {_next_page(args, before)}{every}\n")
    return EXIT_OK


def _next_page(args: argparse.Namespace, before: str) -> str:
    """The `offload list` that gives the page after this one, with this one's filters."""
    given = [part for name in ("url", "state", "kind", "limit")
             for value in _each(getattr(args, name, None))
             for part in (f"--{name}", shlex.quote(str(value)))]
    return " ".join(["offload list", *given, "--before", before,
                     *(["--json"] if args.json else [])])


def _each(value: object) -> list[object]:
    """An option's values: none, one, or those of an option given again."""
    return [] if value in (None, False) else value if isinstance(value, list) else [value]


def cmd_show(client: Client, args: argparse.Namespace) -> int:
    job = client.job("GET", f"/api/jobs/{job_path(args.id)}")
    # Queued: whether the queue is paused, and the model's engine for a held chat.
    queue = queue_state(client) if job.get(p.F_STATE) == p.JobState.QUEUED else {}
    if args.json:
        print_json(job)
    else:
        job_details(job, sys.stdout, queue.get("model_engine"))
    if queue.get("paused") is True:
        sys.stderr.write("the queue is paused: it starts once resumed (offload resume)\n")
    return EXIT_OK


def cmd_log(client: Client, args: argparse.Namespace) -> int:
    if not args.follow:
        text = client.text(f"/api/jobs/{job_path(args.id)}/log")
        if args.json:
            print_json({"id": args.id, "log": text})
        elif text:
            sys.stdout.write(shown(text, sys.stdout, progress_bars=True))
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
    held = [""]  # a carriage return the next piece may end as a CRLF: not a lone one yet

    def show(event: dict[str, Any], job: dict[str, Any]) -> None:
        attempt = job.get(p.F_ATTEMPT) or 1
        if attempt_shown[0] is not None and attempt != attempt_shown[0] and not args.json:
            # A retry starts its output afresh: the earlier attempt's stays, marked as such.
            if line_open[0]:
                sys.stdout.write(shown(held[0] + "\n", sys.stdout))
                held[0] = ""
            earlier = (job.get(p.F_EARLIER_ERRORS) or [{}])[-1]
            said = (f"[attempt {attempt - 1} failed ({earlier.get('message', '?')}); "
                    f"attempt {attempt} of {job.get(p.F_MAX_ATTEMPTS) or '?'}]\n")
            sys.stderr.write(shown(said, sys.stderr))
            line_open[0] = False
        attempt_shown[0] = attempt
        if args.json:
            sys.stdout.write(json.dumps(event, ensure_ascii=False) + "\n")
        elif p.F_OUTPUT in event or p.OUTPUT_DELTA in event:
            text = held[0] + (event.get(p.F_OUTPUT, event.get(p.OUTPUT_DELTA)) or "")
            held[0] = "\r" if text.endswith("\r") else ""
            sys.stdout.write(shown(text[:len(text) - len(held[0])], sys.stdout))
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
            say_why_it_waits(client, [job], counted=True)
        show(event, job)

    job = follow(client, args.id, first)
    ends_open = not args.json and job.get(p.F_OUTPUT) and not str(job[p.F_OUTPUT]).endswith("\n")
    sys.stdout.write(shown(held[0] + ("\n" if ends_open else ""), sys.stdout))
    return outcome(job)
