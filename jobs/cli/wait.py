"""Waiting for jobs to end: `offload wait`, and what `--wait` does for submit and retry;
why a queued job waits, said before, and each job's outcome as an exit code."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from jobs import protocol as p
from jobs.cli.client import EXIT_JOB_FAILED, EXIT_NOT_FOUND, EXIT_OK, Client, Failure, job_path
from jobs.cli.follow import (
    live_jobs,
    read_if_there,
    reconnecting,
    until_all_ended,
    until_ended_unless_removed,
)
from jobs.cli.show import (
    REMOVED_SAID,
    is_removed,
    job_details,
    job_table,
    note,
    print_json,
    remedy,
    removed,
    shown,
    start_ahead,
    waits_for,
)


def cmd_wait(client: Client, args: argparse.Namespace) -> int:
    """As `pueue wait [ID...]`: until each job (by default: each queued or running now)
    has ended; a table of them (or their JSON)."""
    ids = list(dict.fromkeys(job_path(each) for each in args.ids))
    if ids:
        return wait_all(client, ids, args)
    # Thousands of jobs: a request for each would be thousands of requests (and a wait).
    live = reconnecting(lambda: live_jobs(client))
    if not live:
        if args.json:
            print_json([])
        else:  # on stderr: stdout stays the jobs waited for, none
            sys.stderr.write("no queued or running jobs: nothing to wait for\n")
        return EXIT_OK
    jobs = sorted(live.values(), key=p.fifo_key)
    say_why_it_waits(client, jobs, counted=True)
    return _shown(until_all_ended(client, [str(job[p.F_ID]) for job in jobs], args.json),
                  args)


def wait_all(client: Client, ids: list[str], args: argparse.Namespace,
             submitted: bool = False) -> int:
    # An unknown id exits 5 before any wait; a job ended already is kept as it is now
    # (by the end of a long wait for another, it may have been pruned). One that ends
    # during the wait for another and is removed before it is read has its own row, as
    # has one `submitted` just now that is gone already.
    finals = [(read_if_there(client, job_id) or removed(job_id)) if submitted
              else client.job("GET", f"/api/jobs/{job_id}") for job_id in ids]
    say_why_it_waits(client, finals, counted=True)
    for n, job in enumerate(finals):
        if job.get(p.F_STATE) not in p.FINAL_STATES and not is_removed(job):
            finals[n] = until_ended_unless_removed(client, ids[n])
    return _shown(finals, args)


def _shown(finals: list[dict[str, Any]], args: argparse.Namespace) -> int:
    """The jobs waited for, as a table or JSON; EXIT_OK if all completed (`outcome`)."""
    if args.json:
        print_json(finals)
    else:
        job_table(finals, sys.stdout)
    return max(outcome(job) for job in finals)


def outcome(job: dict[str, Any]) -> int:
    """EXIT_OK for a completed job; else its error on stderr and EXIT_JOB_FAILED; for one
    removed after it ended, before it was read (`show.removed`), EXIT_NOT_FOUND."""
    if job.get(p.F_STATE) == p.JobState.COMPLETED:
        return EXIT_OK
    if is_removed(job):
        sys.stderr.write(f"offload: job {job.get(p.F_ID)} was {REMOVED_SAID}: how it "
                         "ended is unknown\n")
        return EXIT_NOT_FOUND
    error = job.get(p.F_ERROR) or {}
    reason = error.get("message") or error.get("type") or "no reason given"
    sys.stderr.write(shown(f"offload: job {job.get(p.F_ID)} {job.get(p.F_STATE)}: {reason}\n",
                            sys.stderr))
    return EXIT_JOB_FAILED


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
    say_why_it_waits(client, [job])
    final = until_ended_unless_removed(client, job[p.F_ID])
    if args.json:
        print_json(final)
    elif is_removed(final):  # its row, as `offload wait` shows it: all there is to say
        job_table([final], sys.stdout)
    else:
        job_details(final, sys.stdout)
    return outcome(final)


MOST_TOLD = 5  # queued jobs said to wait for more than their turn; the rest counted


def say_why_it_waits(client: Client, jobs: list[dict[str, Any]],
                      counted: bool = False) -> None:
    """Before waiting for jobs: that those queued wait for the queue to be resumed, for
    the jobs they depend on (or a chat's earlier turn), for a kind's cap to leave room, or
    for the start time they were given (the wait would look stuck). `counted`: the jobs as
    `GET` answers them, with why each waits."""
    if not any(job.get(p.F_STATE) == p.JobState.QUEUED for job in jobs):
        return
    queue = queue_state(client)
    they = "it starts" if len(jobs) == 1 else "they start"
    if queue.get("paused") is True:
        sys.stderr.write(f"offload: the queue is paused: {they} once resumed (offload resume)\n")
    if _supervisor_stalled(client):
        sys.stderr.write(f"offload: the supervisor is stalled (stopped or hung): {they} once "
                         "it runs again; see offload status\n")
    queued = [job for job in jobs if job.get(p.F_STATE) == p.JobState.QUEUED]
    told = 0
    for place, each in enumerate(queued):
        if told == MOST_TOLD:  # a chain of a thousand: not a line (and a GET) for each
            sys.stderr.write(f"offload: {len(queued) - place} more queued, not looked at "
                             "here: offload list --state queued says why each waits\n")
            return
        # A 202's job: why it waits is not counted yet. Gone: the wait that follows says so.
        job = each if counted else read_if_there(client, str(each.get(p.F_ID)))
        why = None if job is None else _why_it_waits(job, queue)
        if job is not None and why is not None:
            sys.stderr.write(f"offload: job {job.get(p.F_ID)} {why}\n")
            told += 1


def _why_it_waits(job: dict[str, Any], queue: dict[str, Any]) -> str | None:
    """Why a queued job waits, where that is more than its turn."""
    said = note(job)
    waits = waits_for(job)
    if waits.get(p.WAITS_REASON) in (p.F_DEPENDS_ON, p.F_AFTER):  # a turn's note: progress
        awaited = [str(each) for each in waits.get("jobs") or []]
        whom = f"job{'s' if len(awaited) > 1 else ''} {', '.join(awaited)}"
        to = ("to complete (--after)" if waits[p.WAITS_REASON] == p.F_DEPENDS_ON
              else "to end (the earlier turn of its conversation)")
        starts = start_ahead(job)  # given --delay or --at too: that comes after
        then = "" if starts is None else f", then starts no sooner than {starts}"
        return f"waits for {whom} {to}{then}"
    if said.startswith("held: "):
        return (f"is {said}: it starts once one of them ends "
                f"({remedy(job, queue.get('model_engine'))})")
    if said.startswith("starts "):  # --delay or --at: no sooner
        return f"{said}, as submitted"
    return None


def _supervisor_stalled(client: Client) -> bool:
    """Whether the server's health says its supervisor is stalled: no queued job starts."""
    try:
        health = client.call("GET", "/api/health")
    except Failure:
        return False
    return isinstance(health, dict) and health.get("supervisor") == "stalled"


def queue_state(client: Client) -> dict[str, Any]:
    """`GET /api/queue` (whether it is paused, the model's engine); empty from an older
    server (no such route): not paused."""
    try:
        queue = client.call("GET", "/api/queue")
    except Failure:  # an older server, without the route
        return {}
    return queue if isinstance(queue, dict) else {}
