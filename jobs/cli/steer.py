"""The commands that change jobs and the queue: retry, cancel, remove, pause, resume,
parallel, and the schedules."""

from __future__ import annotations

import argparse
import re
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from jobs import protocol as p
from jobs.protocol import control

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

from jobs.cli.client import (
    BATCH_JOB_S,
    EXIT_CONFLICT,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_SERVER,
    EXIT_USAGE,
    LIST_MAX,
    REQUEST_TIMEOUT_S,
    Client,
    Failure,
    job_path,
    offload_shaped,
)
from jobs.cli.look import GROUPS
from jobs.cli.show import cap_said, kind_caps_said, print_json, table, when
from jobs.cli.submit import parse_input
from jobs.cli.wait import queue_state, wait_all, wait_and_report

T = TypeVar("T")
Answer = dict[str, Any] | Failure  # a job acted on, or why it was not


def cmd_retry(client: Client, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    if args.input is not None:
        body["input"] = parse_input(args.input)
    if args.timeout is not None:
        body["timeout_s"] = args.timeout

    def rerun(job_id: str) -> dict[str, Any]:
        try:
            return client.job("POST", f"/api/jobs/{job_path(job_id)}/rerun", body or None)
        except Failure as exc:  # a file that holds no job: the server's words for the API
            exc.message = exc.message.replace("with POST /api/jobs", "with offload submit")
            raise

    if len(args.ids) == 1:
        return wait_and_report(client, rerun(args.ids[0]), args)
    ids = list(dict.fromkeys(args.ids)) or _not_run_again(client, args.state, args.kind)
    if not ids:
        if args.json:
            print_json([])
        else:  # on stderr: stdout stays the jobs run again, none
            sys.stderr.write(f"no {args.state} jobs{_of_kind(args.kind)} not run again already: "
                             "nothing to retry\n")
        return EXIT_OK
    # With --wait, each one's new id is said on stderr: stdout is the table of them ended.
    as_told = argparse.Namespace(**{**vars(args), "json": args.json and not args.wait})
    done: list[dict[str, Any]] = []
    # One at a time: the new jobs queue in the order of the old ones.
    code = _act(as_told, ids, _each_at_once(rerun, threads=1),
                lambda job: f"run again as {job[p.F_ID]}", (EXIT_NOT_FOUND, "was gone already"),
                done, sys.stderr if args.wait else sys.stdout)
    if args.wait and done:
        return wait_all(client, [str(job[p.F_ID]) for job in done], args, submitted=True) or code
    if args.json:
        print_json(done)
    return code


def _not_run_again(client: Client, state: str, kind: list[str] | None) -> list[str]:
    """The jobs in `state` (of any `kind`) that no job kept runs again yet, oldest first: a
    retry of them all, made twice, runs each once. (A re-run has its job's kind; a file
    that holds no job, `corrupt`, has none to run.)"""
    every = list(client.listed(None, kind=kind))
    run_again = {job.get(p.F_RERUN_OF) for job in every}
    return [str(job[p.F_ID]) for job in reversed(every) if job.get(p.F_STATE) == state
            and job[p.F_ID] not in run_again
            and not p.holds_no_job(job)]


def _matching(client: Client, state: str, kind: list[str] | None) -> tuple[list[str], bool]:
    """The ids of the jobs in `state` (of any `kind`), as the API lists them now, newest
    first; and whether the listing was cut at LIST_MAX (older ones are left)."""
    listed, _ = client.listing(state, "summary", None, kind=kind)  # only their ids needed
    return [job[p.F_ID] for job in listed], len(listed) >= LIST_MAX


def _of_kind(kinds: list[str] | None) -> str:
    return f" of kind {' or '.join(dict.fromkeys(kinds))}" if kinds else ""


def cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    queued = _queued(client)
    dependants = _dependants(queued)
    # More ids than a request takes: the newest queued first, so a job's request is never
    # before that of one given that depends on it (its cancel would fail that one first).
    place = {str(job[p.F_ID]): n for n, job in enumerate(queued)}
    cancelled: list[str] = []

    def cancel(ids: list[str]) -> dict[str, dict[str, Any] | Failure]:
        # Together: every stop stands before any is acted on, so a job cancelled with the
        # ones that depend on it fails none of them (dependency) first.
        try:
            answer = client.call("POST", "/api/jobs/cancel", {"ids": ids},
                                 timeout=REQUEST_TIMEOUT_S + BATCH_JOB_S * len(ids))
        except Failure as exc:
            if exc.status == 405 or (exc.status == 404
                                     and exc.message.startswith("no API route")):
                raise Failure(EXIT_SERVER, "this server is older: it cannot cancel jobs "
                                           "together (POST /api/jobs/cancel); upgrade it, or "
                                           "cancel each with DELETE /api/jobs/ID") from None
            raise
        answer = offload_shaped(client.url, answer, "the jobs cancelled", jobs=list,
                                finished=list, missing=list)
        outcome: dict[str, dict[str, Any] | Failure] = {}
        for job in answer["jobs"]:
            job_id, state = job[p.F_ID], job[p.F_STATE]
            if state in p.FINAL_STATES:
                cancelled.append(job_id)
                outcome[job_id] = job
            else:  # the server's wait ended first: not done yet
                outcome[job_id] = Failure(
                    EXIT_SERVER, f"{job_id}: cancel asked, but the job is still {state} after "
                    "the server's wait: is the supervisor running (offload status)? It is "
                    "cancelled once it stops", answer=job)
        for job in answer["finished"]:  # not in --json's list: this command did not end it
            outcome[job[p.F_ID]] = Failure(
                EXIT_CONFLICT, f"job {job[p.F_ID]} has already finished ({job[p.F_STATE]}): "
                "there is nothing to cancel")
        for job_id in answer["missing"]:
            outcome[job_id] = Failure(EXIT_NOT_FOUND, f"no job with id {job_id!r} (removed, "
                                                      "pruned, or never submitted here)")
        return outcome

    code = _each_job(client, args,
                     _in_parts(cancel, lambda job_id: place.get(job_id, len(place))),
                     lambda job: str(job.get(p.F_STATE)),
                     (EXIT_CONFLICT, "had finished"))
    stopped = set(cancelled)  # a chain of thousands: a look-up each, not a walk
    for job_id in cancelled:
        failing = [each for each in _depending_on(job_id, dependants) if each not in stopped]
        if failing:  # on stderr: stdout stays a line for each job cancelled
            sys.stderr.write(f"offload: {job_id} cancelled: {len(failing)} job(s) that depend "
                             f"on it fail with it (dependency): "
                             f"{', '.join(each[:8] for each in failing)}\n")
    return code


def _in_parts(act: Callable[[list[str]], dict[str, T]], order: Callable[[str], int]
              ) -> Callable[[list[str]], dict[str, T]]:
    """`act` on at most LIST_MAX ids at a time (as many as a request takes), in `order`."""
    def parts(ids: list[str]) -> dict[str, T]:
        ids = sorted(ids, key=order)
        done: dict[str, T] = {}
        for start in range(0, len(ids), LIST_MAX):
            done.update(act(ids[start:start + LIST_MAX]))
        return done
    return parts


def _queued(client: Client) -> list[dict[str, Any]]:
    """The queued jobs, newest first, as the API lists them now; none where they cannot
    be listed (the cancels say why, each)."""
    try:
        return list(client.listed(p.JobState.QUEUED.value))
    except Failure:
        return []


def _dependants(queued: list[dict[str, Any]]) -> dict[str, list[str]]:
    """The queued jobs (`queued`, newest first) that depend on each job, oldest first."""
    dependants: dict[str, list[str]] = {}
    for job in reversed(queued):
        for each in p.dependencies(job):
            dependants.setdefault(each, []).append(str(job[p.F_ID]))
    return dependants


def _depending_on(job_id: str, dependants: dict[str, list[str]]) -> list[str]:
    """The jobs that depend on `job_id`, and on those, and so on: each fails once the one
    it depends on has not completed."""
    found: dict[str, None] = {}
    waiting = list(dependants.get(job_id, []))
    while waiting:
        each = waiting.pop(0)
        if each not in found and each != job_id:
            found[each] = None
            waiting += dependants.get(each, [])
    return list(found)


def cmd_remove(client: Client, args: argparse.Namespace) -> int:
    def remove(job_id: str) -> Any:
        try:
            return client.call("POST", f"/api/jobs/{job_path(job_id)}/remove")
        except Failure as exc:
            if exc.status == 404 and exc.message.startswith("no API route"):
                raise Failure(EXIT_SERVER, "this server is older: it cannot remove jobs (they "
                                           "go with pruning)") from None
            raise

    # "gone already": pruned, or removed by another
    return _each_job(client, args, _each_at_once(remove),
                     lambda job: "removed", (EXIT_NOT_FOUND, "was gone already"))


def _each_job(client: Client, args: argparse.Namespace,
              act: Callable[[list[str]], Mapping[str, Answer]],
              said: Callable[[dict[str, Any]], str], moved_on: tuple[int, str]) -> int:
    """`act` on the jobs given by id, or on every job in --state (of --kind), saying how
    each went; `act(ids)` answers each id's job, or the Failure for it. `moved_on`: the
    exit code of a failure that means a job listed in that state changed since, leaving
    nothing to do, and the words for it. The exit code."""
    done: list[dict[str, Any]] = []
    if args.ids:
        ids = list(dict.fromkeys(args.ids))
        code = _act(args, ids, act, said, moved_on, done)
    else:
        tried: set[str] = set()
        code = EXIT_OK
        # `live`: every queued job before the running ones, which queued ones may depend
        # on; one that starts meanwhile is found running.
        for state in GROUPS.get(args.state, [args.state]):
            cut = True
            while cut:  # a listing holds the newest LIST_MAX: those done, older ones next
                ids, cut = _matching(client, state, args.kind)
                ids = [job_id for job_id in ids if job_id not in tried]
                if not ids:
                    break
                tried.update(ids)
                acted = _act(args, ids, act, said, moved_on, done)  # each page, as it comes
                code = code or acted
        if not tried and not args.json:  # on stderr: stdout stays the jobs acted on, none
            sys.stderr.write(f"no {args.state} jobs{_of_kind(args.kind)}: nothing to "
                             f"{args.command}\n")
    if args.json:
        print_json(done)
    return code


def _act(args: argparse.Namespace, ids: list[str],
         act: Callable[[list[str]], Mapping[str, Answer]],
         said: Callable[[dict[str, Any]], str], moved_on: tuple[int, str],
         done: list[dict[str, Any]], told: TextIO | None = None) -> int:
    """`act` on `ids`, saying how each went in the order of `ids` on `told` (stdout; for
    --json: appended to `done`); the exit code."""
    told = told or sys.stdout
    try:
        answered = act(ids)
    except Failure as exc:  # a request for them all: said once, and --json's list goes on
        sys.stderr.write(f"offload: {exc.message}\n")
        return exc.code
    left_out = Failure(EXIT_SERVER, "the server's answer left this job out")
    answers = [answered.get(job_id, left_out) for job_id in ids]
    code = EXIT_OK
    for job_id, answer in zip(ids, answers, strict=True):
        if isinstance(answer, Failure) and args.state and answer.code == moved_on[0]:
            if not args.json:  # it changed since it was listed: nothing left to do
                told.write(f"{job_id} {moved_on[1]}\n")
        elif isinstance(answer, Failure):
            named = "" if job_id in answer.message else f"{job_id}: "
            sys.stderr.write(f"offload: {named}{answer.message}\n")
            code = code or answer.code
        elif not args.json:
            told.write(f"{job_id} {said(answer)}\n")
    for job_id, answer in zip(ids, answers, strict=True):
        if not isinstance(answer, Failure):
            done.append(answer)
        elif answer.answer.get(p.F_ID) == job_id:  # it failed, yet carries the job as it is
            done.append(answer.answer)
    return code


def _each_at_once(act: Callable[[str], Any], threads: int = 8
                  ) -> Callable[[list[str]], dict[str, Answer]]:
    """`act` on each id, `threads` at once: each its job, or the Failure it raised."""
    def one(job_id: str) -> Answer:
        try:
            return dict(act(job_id))
        except Failure as exc:
            return exc

    return lambda ids: dict(zip(ids, _at_once(one, ids, threads), strict=True))


def _at_once(one: Callable[[str], T], ids: list[str], threads: int = 8) -> list[T]:
    """`one(id)` of each id, `threads` at a time, in daemon threads (as a pool's `map`:
    what one raises is raised here): a Ctrl-C ends the command at once (a pool's threads
    are waited for at exit, so a cancel held it until the server's wait ended), and what
    was asked of the server goes on."""
    answers: dict[int, T] = {}
    raised: list[Exception] = []
    places = iter(range(len(ids)))
    lock = threading.Lock()

    def work() -> None:
        while not raised:
            with lock:
                n = next(places, None)
            if n is None:
                return
            try:
                answers[n] = one(ids[n])
            except Exception as exc:  # raised in the main thread, below
                raised.append(exc)

    workers = [threading.Thread(target=work, daemon=True) for _ in range(min(threads, len(ids)))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if raised:
        raise raised[0]
    return [answers[n] for n in range(len(ids))]


def cmd_pause(client: Client, args: argparse.Namespace) -> int:
    return _steer(client, args, "pause")


def cmd_resume(client: Client, args: argparse.Namespace) -> int:
    return _steer(client, args, "resume")


def _steer(client: Client, args: argparse.Namespace, action: str) -> int:
    """Pause or resume the queue (no name) or one schedule."""
    if args.schedule is None:
        # Its `paused` alone: a server before the queue's caps answered nothing else.
        answer = offload_shaped(client.url, client.call("POST", f"/api/queue/{action}"),
                                "the queue", paused=bool)
        said = "paused: queued jobs wait" if answer.get("paused") else "running"
        what = f"queue {said}"
    else:
        if not args.schedule or re.search(r"[/\x00-\x1f\x7f]", args.schedule):  # no route
            # would take it (the server refuses a control character in a path): said so
            raise Failure(EXIT_NOT_FOUND, f"no schedule is named {args.schedule!r}; "
                          "see them with: offload schedules")
        name = urllib.parse.quote(args.schedule, safe="")
        answer = offload_shaped(client.url,
                                client.call("POST", f"/api/schedules/{name}/{action}"),
                                "a schedule", name=str, paused=bool)
        what = f"schedule {answer.get('name')} {'paused' if answer.get('paused') else 'running'}"
    if args.json:
        print_json(answer)
    else:
        sys.stdout.write(what + "\n")
    return EXIT_OK


def cmd_parallel(client: Client, args: argparse.Namespace) -> int:
    """Show the caps on runners alive at once (of all, and by kind), or change one while
    the server runs."""
    older = "this server is older: it cannot change how many jobs run at once"
    if args.kind is not None and not args.kind.strip():
        raise Failure(EXIT_USAGE, "--kind is empty: give a job kind, or leave --kind out")
    try:
        if args.kind is not None and "kind_caps" not in client.call("GET", "/api/queue"):
            raise Failure(EXIT_SERVER, older)  # it would refuse `kind` as a bad request
        if args.runners is None:
            answer = client.call("GET", "/api/queue")
            if args.kind is not None and args.kind not in answer.get("kinds", [args.kind]):
                # As the server refuses a cap for it: the caps of all said nothing of a typo.
                raise Failure(EXIT_USAGE, f"unknown job kind {args.kind!r}; known kinds: "
                                          f"{', '.join(answer['kinds'])}")
        else:
            cap = None if args.runners == "default" else _runners(args.runners)
            answer = client.call("PUT", "/api/queue/cap", {
                "max_concurrent": cap, **({"kind": args.kind} if args.kind is not None else {})})
    except Failure as exc:
        raise Failure(EXIT_SERVER, older) if exc.status == 404 else exc from None
    if "max_concurrent_set" not in answer:
        raise Failure(EXIT_SERVER, older)
    if args.json:
        print_json(answer)
    else:
        sys.stdout.write("\n".join([cap_said(answer), *kind_caps_said(answer)]) + "\n")
    return EXIT_OK


def _runners(text: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 4
            and 1 <= int(text) <= control.MAX_CAP):
        raise Failure(EXIT_USAGE, f"give a number of runners from 1 to {control.MAX_CAP}, "
                                  f"or default; not {text!r}")
    return int(text)


def cmd_schedules(client: Client, args: argparse.Namespace) -> int:
    answer = offload_shaped(client.url, client.call("GET", "/api/schedules"), "the schedules",
                            schedules=list)
    for each in answer["schedules"]:
        offload_shaped(client.url, each, "a schedule", name=str, kind=str)
    code = EXIT_SERVER if answer.get("error") else EXIT_OK  # the schedules run as last read
    if answer.get("error"):  # with --json too: an exit code 7 alone said nothing of why
        sys.stderr.write(f"offload: the schedules file cannot be used: {answer['error']}\n")
    schedules = answer.get("schedules") or []
    if args.json:
        print_json(answer)
    elif not schedules:
        sys.stdout.write("no schedules\n")
    else:
        rows = [["NAME", "KIND", "WHEN", "NEXT RUN (UTC)", "LAST JOB"]]
        rows += [[str(each.get("name")), str(each.get("kind")), _timing(each),
                  "paused" if each.get("paused") else when(each.get("next_run_at")),
                  f"{each.get('last_job_id') or '-'} {each.get('last_state') or ''}".rstrip()]
                 for each in schedules]
        table(rows, sys.stdout)
    if (not all(each.get("paused") for each in schedules)
            and queue_state(client).get("paused") is True):  # the times shown do not hold
        sys.stderr.write("the queue is paused: a schedule's job waits in it, and the schedule "
                         "makes no more until that one starts (offload resume)\n")
    return code


def _timing(schedule: dict[str, Any]) -> str:
    """`every 6h`'s seconds, or its cron expression and time zone."""
    every = schedule.get("every_s")
    if isinstance(every, (int, float)):
        # As a schedules file says it: 21600 s is "6h", 90 s stays "90s".
        for unit, seconds in (("d", 86400), ("h", 3600), ("m", 60)):
            if every >= seconds and every % seconds == 0:
                return f"every {every // seconds:g}{unit}"
        return f"every {every:g}s"
    return f"cron {schedule.get('cron')} {schedule.get('timezone') or 'UTC'}"
