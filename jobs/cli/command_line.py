"""`offload`'s command line parsed, one command run, its exit code (see `jobs.cli`)."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
from typing import TYPE_CHECKING, Any

from jobs import protocol as p
from jobs.cli.client import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    Client,
    Failure,
    configured,
    not_offload,
)
from jobs.cli.ids import checked_ids, whole_ids
from jobs.cli.look import ENDED, GROUPS, STATES, cmd_list, cmd_log, cmd_show, cmd_status
from jobs.cli.steer import (
    cmd_cancel,
    cmd_parallel,
    cmd_pause,
    cmd_remove,
    cmd_resume,
    cmd_retry,
    cmd_schedules,
)
from jobs.cli.submit import cmd_submit
from jobs.cli.wait import cmd_wait

if TYPE_CHECKING:
    from collections.abc import Callable

# The request's fields the options set, as the server names them in its errors.
OPTION_OF = {"run_at": "--at", "delay_s": "--delay", "timeout_s": "--timeout",
             "max_attempts": "--max-attempts", "depends_on": "--after", "priority": "--priority",
             "query.limit": "--limit", "query.before": "--before", "`before`": "--before",
             "header.Idempotency-Key": "--key"}
OPTION_FIELDS = re.compile(rf"(?<![\w.])({'|'.join(map(re.escape, OPTION_OF))})(?!\w)")


# Other names a command answers to: the API's (`/rerun`) and Pueue's (`restart`).
ALIASES = {"retry": ["rerun", "restart"]}


# The parser --------------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--json", action="store_true", default=default,
                        help="print JSON for scripts instead of a table")
    parser.add_argument("--url", default=default,
                        help="the server (default: OFFLOAD_URL, else OFFLOAD_HOST and "
                             "OFFLOAD_PORT, else http://127.0.0.1:8001)")


def _positive(text: str) -> float:
    return _seconds_where(text, "above 0", lambda value: 0 < value < math.inf)


def _seconds(text: str) -> float:
    return _seconds_where(text, "0 or more", lambda value: 0 <= value < math.inf)


def _seconds_where(text: str, bounds: str, fits: Callable[[float], bool]) -> float:
    """Seconds, or a length of time as a schedule's `every` takes it (`90s`, `30m`, `6h`,
    `1d`, as Pueue's --delay)."""
    try:
        value = float(text)
    except ValueError:  # argparse would say "invalid _seconds value": this function's name
        given = p.duration_s(text)
        value = math.nan if given is None else given
    if not fits(value):  # nan fits none
        raise argparse.ArgumentTypeError(f"must be a number of seconds, {bounds}, or a "
                                         f"length such as 90s, 30m, 6h or 1d, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="offload", description="See and steer the jobs of a running Offload. The token "
        "comes from OFFLOAD_API_TOKEN (or .env), never from an argument.",
        epilog="exit codes: 0 done, 1 the job failed, was cancelled or timed out, 2 bad "
        "usage, 3 server unreachable, 4 refused (token), 5 no such job, 6 not in a state "
        "for it, 7 server busy or failing, 130 interrupted")
    _common(parser, False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, run: Callable[[Client, argparse.Namespace], int],
                text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text,
                                  aliases=ALIASES.get(name, []))
        _common(sub, argparse.SUPPRESS)  # after the command as before it
        sub.set_defaults(run=run)
        return sub

    command("status", cmd_status, "health, counts by state, runners, the model (the default)")
    listing = command("list", cmd_list, "jobs, newest first")
    listing.add_argument("--state", choices=[*STATES, *GROUPS], action="append",
                         help="again for any of several (live: queued and running; "
                              "finished: the four that have ended)")
    listing.add_argument("--kind", action="append", help="again for any of several")
    listing.add_argument("--limit", type=int, help="at most this many (1-1000; default 100)")
    listing.add_argument("--before", metavar="ID", help="those submitted before this job: "
                                                        "the next page")
    listing.add_argument("--all", action="store_true", help="every one, however many")
    command("show", cmd_show, "one job in full").add_argument("id")
    command("wait", cmd_wait, "wait until jobs have ended, show them; exits 1 unless they "
                              "all completed").add_argument(
        "ids", nargs="*", metavar="id", help="the jobs (default: every job queued or running "
                                             "now, as Pueue's wait)")
    log = command("log", cmd_log, "a job's log (its runner's stdout and stderr)")
    log.add_argument("id")
    log.add_argument("--follow", "-f", action="store_true",
                     help="instead, the job's output (a chat's reply) as it streams, and its "
                          "progress, until it ends; exits 1 unless it completed")
    cancel = command("cancel", cmd_cancel, "cancel jobs: queued ones never start, running "
                                           "ones are stopped")
    cancel.add_argument("ids", nargs="*", metavar="id")
    cancel.set_defaults(state_choices=cancel.add_argument(
        "--state", choices=[*GROUPS["live"], "live"],
        help="instead of ids: every job in this state (live: both)").choices)
    cancel.add_argument("--kind", action="append",
                        help="with --state: of this kind only (again for any of several)")
    remove = command("remove", cmd_remove, "delete finished jobs now, with their input, "
                                           "output and log (as pruning does later)")
    remove.add_argument("ids", nargs="*", metavar="id")
    remove.set_defaults(state_choices=remove.add_argument(
        "--state", choices=[*ENDED, "finished"],
        help="instead of ids: every job in this state (finished: all four), as Pueue's "
             "clean").choices)
    remove.add_argument("--kind", action="append",
                        help="with --state: of this kind only (again for any of several)")
    for name, run, text in (("submit", cmd_submit, "submit a job; prints its id"),
                            ("retry", cmd_retry, "run finished jobs again, each as a new "
                                                 "job; prints the new id")):
        sub = command(name, run, text)
        if name == "submit":
            sub.add_argument("kind", help="chat, sleep, train, or a kind of your own")
            given = sub.add_mutually_exclusive_group()
            given.add_argument("--input",
                               help="the input: JSON, @file.json, or - for stdin (default {})")
            given.add_argument("--inputs", metavar="FILE",
                               help="several jobs in one request, one input a line (JSON "
                                    "lines; - for stdin): prints their ids in that order")
            sub.add_argument("--priority", type=int, help="higher runs first")
            start = sub.add_mutually_exclusive_group()
            start.add_argument("--delay", type=_seconds, help="start no sooner than this "
                                                              "many seconds from now (or 90s, "
                                                              "30m, 6h, 1d)")
            start.add_argument("--at", help="start no sooner than this time (ISO 8601, "
                                            "UTC unless it says its zone)")
            sub.add_argument("--max-attempts", type=int,
                             help="attempts on transient failures (default: the kind's)")
            sub.add_argument("--key", help="an Idempotency-Key: the same key again gets "
                                           "the same job (or jobs)")
            sub.add_argument("--after", metavar="ID", action="append",
                             help="start once job ID has completed, fail if it ends otherwise; "
                                  "again (or ID,ID) for several")
        else:
            sub.add_argument("ids", nargs="*", metavar="id")
            sub.set_defaults(state_choices=sub.add_argument(
                "--state", choices=ENDED,
                help="instead of ids: every job in this state not run again already, oldest "
                     "first (as Pueue's restart --all-failed)").choices)
            sub.add_argument("--kind", action="append",
                             help="with --state: of this kind only (again for any of "
                                  "several)")
            sub.add_argument("--input", help="another input: JSON, @file.json or -")
        sub.add_argument("--timeout", type=_positive, help="its deadline, seconds (or 90s, "
                                                           "30m, 6h, 1d)")
        sub.add_argument("--wait", action="store_true",
                         help="wait until it ends, show it; exits 1 unless it completed")
    for name, run, text in (("pause", cmd_pause, "pause the queue (running jobs finish, "
                                                 "queued ones wait), or one schedule"),
                            ("resume", cmd_resume, "let queued jobs start again, or resume "
                                                   "one schedule")):
        command(name, run, text).add_argument("schedule", nargs="?",
                                              help="a schedule's name (default: the queue)")
    command("schedules", cmd_schedules, "the periodic schedules, their next and last runs")
    parallel = command("parallel", cmd_parallel, "how many jobs run at once, of all and by "
                                                 "kind; with a number, change it (kept across "
                                                 "restarts)")
    parallel.add_argument("runners", nargs="?", help="a number from 1 to 1024, or default "
                                                     "(back to OFFLOAD_MAX_CONCURRENT, or with "
                                                     "--kind to OFFLOAD_KIND_CAPS's)")
    parallel.add_argument("--kind", help="of this kind only (as Pueue's groups)")
    return parser


def _as_options(message: str) -> str:
    """The server's names for the fields the options set, said as those options."""
    return OPTION_FIELDS.sub(lambda match: OPTION_OF[match.group(1)], message)


def _quiet_broken_pipe(stream: Any = None) -> None:
    """`offload list | head`: the reader left; no traceback, no second error on exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, (stream or sys.stdout).fileno())


class _ReaderMayLeave:
    """stdout, whose reader may leave (`offload wait | true`): the command then goes on to
    its end unheard, and exits with its own code (a failed job's 1, a stalled supervisor's
    7), its errors said on stderr. Where it `streams`, it stops there instead
    (`offload log --follow | head`, `list --all | head`)."""

    def __init__(self, stream: Any, streams: bool) -> None:
        self._stream = stream
        self._streams = streams
        self.left = False

    def write(self, text: str) -> int:
        if not self.left:
            try:
                return int(self._stream.write(text))
            except BrokenPipeError:
                self._reader_gone()
        return len(text)

    def flush(self) -> None:
        if not self.left:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._reader_gone()

    def _reader_gone(self) -> None:
        self.left = True
        _quiet_broken_pipe(self._stream)  # what is still buffered goes nowhere, quietly
        if self._streams:
            raise BrokenPipeError

    def __getattr__(self, name: str) -> Any:  # encoding, isatty, fileno: the stream's
        return getattr(self._stream, name)


def _reader_left(args: argparse.Namespace) -> int:
    """Quiet, as `offload list | head` wants, unless the ids of jobs just stored were lost."""
    _quiet_broken_pipe()
    if args.run not in (cmd_submit, cmd_retry) or args.wait:  # --wait: ids said on stderr
        return EXIT_OK
    with contextlib.suppress(OSError):  # `2>&1 | head`: stderr has no reader either
        sys.stderr.write("offload: its output was not read (the reader left); the jobs are "
                         "stored: offload list shows them\n")
    return EXIT_USAGE


def _code_unread(args: argparse.Namespace, code: int) -> int:
    """The exit code of a command whose reader left: its own, and the ids of jobs it just
    stored said lost whatever it is (`_reader_left`)."""
    said = _reader_left(args)
    return said if code == EXIT_OK else code


def run(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a reply's characters on any console
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    if not hasattr(args, "run"):
        args.run = cmd_status
    client = None
    if sys.stdout is None and sys.stderr is not None:  # `>&-`: nowhere to say an id or a
        # result, so nothing is done (under pythonw neither is there: it runs, unheard)
        sys.stderr.write("offload: its standard output is closed: give it one (> file, or "
                         "> /dev/null to drop what it says)\n")
        return EXIT_USAGE
    sys.stdout = sys.stdout or open(os.devnull, "w")  # noqa: SIM115 (for the process's life)
    sys.stderr = sys.stderr or open(os.devnull, "w")  # noqa: SIM115 (`2>&-`: unheard)
    out = _ReaderMayLeave(sys.stdout, args.run is cmd_list or (
        args.run is cmd_log and getattr(args, "follow", False)))
    sys.stdout = out
    sys.stderr = _ReaderMayLeave(sys.stderr, False)  # `2>&1 | head -1`: each failed job's line
    try:
        checked_ids(args)
        if isinstance(args.url, str) and not args.url.strip():  # `--url "$UNSET"`: not the
            # default server, which a cancel or remove would then act on
            raise Failure(EXIT_USAGE, "--url is empty: give the server's address, like "
                                      "http://127.0.0.1:8001, or leave --url out")
        client = Client(*configured(args.url or None))
        whole_ids(client, args)
        code = int(args.run(client, args))
        sys.stdout.flush()  # a reader that left (`| head`) is found here, not at exit
        return _code_unread(args, code) if out.left else code
    except Failure as exc:
        sys.stdout.flush()
        sys.stderr.write(f"offload: {_as_options(exc.message)}\n")
        return exc.code
    except UnicodeError as exc:  # an argument of bytes the terminal could not decode, say
        sys.stdout.flush()
        sys.stderr.write(f"offload: an argument holds characters that cannot be sent: {exc}\n")
        return EXIT_USAGE
    except (KeyError, TypeError, AttributeError, ValueError, RecursionError) as exc:
        # JSON of another shape than Offload's: another program answers at that address.
        sys.stdout.flush()
        where = client.url if client is not None else "the server"
        said = not_offload(where, f"{type(exc).__name__}: {exc}")
        sys.stderr.write(f"offload: {said.message}\n")
        return said.code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return _reader_left(args)
    except OSError as exc:  # its output cannot be written: a full disk, say (`> /dev/full`)
        _quiet_broken_pipe()
        sys.stderr.write(f"offload: cannot write its output ({exc.strerror or exc}); what it "
                         "did before is done: offload list shows the jobs\n")
        return EXIT_USAGE

