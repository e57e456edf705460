"""Jobs' ids as a user gives them: checked before anything is sent, and given by their
start (as the CLI's notes show them, 8 characters) made whole."""

from __future__ import annotations

import argparse

from jobs import protocol as p
from jobs.cli.client import EXIT_NOT_FOUND, EXIT_USAGE, Client, Failure

SHORTEST = 6  # hex characters of an id's start taken for the whole id


def job_id(text: str | None, flag: str | None, start: bool = False) -> str | None:
    """A job's id as given to `flag` (None: as an argument), in any case and with spaces
    around it; `start`: its start will do."""
    if text is None:
        return None
    given = text.strip().lower()
    if p.is_valid_id(given) or (start and _a_start(given)):
        return given
    said = "" if flag is None else f"{flag} wants a job's id: "
    start_said = f", or its first {SHORTEST} or more" if start else ""
    raise Failure(EXIT_USAGE, f"{said}{text[:80]!r} is no job's id (32 hex characters"
                              f"{start_said}, as offload list shows)")


def checked_ids(args: argparse.Namespace) -> None:
    """The ids given as arguments, to --after and to --before, each checked: an empty one,
    or one with a `/`, was sent as a path and answered as another route's. --after's, a
    list (`ID,ID` split). A command that takes ids or --state (`state_choices`): one of
    the two."""
    if getattr(args, "state_choices", None):
        *first, last = args.state_choices
        _ids_or_state(args, f"{', '.join(first)} or {last}")
    if isinstance(getattr(args, "id", None), str):
        args.id = job_id(args.id, None, start=True)
    if isinstance(getattr(args, "before", None), str):
        args.before = job_id(args.before, "--before", start=True)
    if isinstance(getattr(args, "ids", None), list):
        args.ids = [job_id(each, None, start=True) for each in args.ids]
    if isinstance(getattr(args, "after", None), list):
        if any(not given.strip(" ,") for given in args.after):  # a script's unset variable
            raise Failure(EXIT_USAGE, "--after is empty: give a job's id, or leave --after out")
        args.after = [job_id(each, "--after", start=True) for given in args.after
                      for each in given.split(",") if each.strip()]


def whole_ids(client: Client, args: argparse.Namespace) -> None:
    """The ids given by their start made whole, from one listing of every job: each
    must start one job's id alone."""
    given = [getattr(args, name) for name in ("id", "before")
             if isinstance(getattr(args, name, None), str)]
    given += [*(getattr(args, "ids", None) or []), *(getattr(args, "after", None) or [])]
    starts: dict[str, list[str]] = {each: [] for each in given if not p.is_valid_id(each)}
    if not starts:
        return
    for job in client.listed(None):
        for start, found in starts.items():
            if str(job[p.F_ID]).startswith(start):
                found.append(str(job[p.F_ID]))
    for start, found in starts.items():
        if not found:
            raise Failure(EXIT_NOT_FOUND, f"no job's id starts with {start!r} (offload list "
                                          "shows them)")
        if len(found) > 1:
            raise Failure(EXIT_USAGE, f"{start!r} starts the ids of {len(found)} jobs "
                                      f"({', '.join(found[:5])}): give more of the one meant")
    whole = {start: found[0] for start, found in starts.items()}
    for name in ("id", "before"):
        if isinstance(getattr(args, name, None), str):
            setattr(args, name, whole.get(getattr(args, name), getattr(args, name)))
    for name in ("ids", "after"):
        if isinstance(getattr(args, name, None), list):
            setattr(args, name, [whole.get(each, each) for each in getattr(args, name)])


def _ids_or_state(args: argparse.Namespace, states_said: str) -> None:
    """Job ids given, or --state (and --kind): one of the two, before an id is looked up."""
    if args.kind and not args.state:
        raise Failure(EXIT_USAGE, f"--kind goes with --state ({states_said}): give both to "
                                  f"{args.command} every job of that kind in that state")
    if bool(args.ids) == bool(args.state):
        raise Failure(EXIT_USAGE, f"give job ids, or --state ({states_said}; and --kind) "
                                  f"to {args.command} every job in it"
                                  f"{', not both' if args.ids else ''}")


def _a_start(text: str) -> bool:
    return SHORTEST <= len(text) < 32 and p.is_valid_id(text.ljust(32, "0"))
