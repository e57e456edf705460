"""A runner run by hand, without a job file: its options parsed (argparse, loaded only
now: the launcher's form skips it), the `.env` the server reads, the output on the terminal."""

from __future__ import annotations

import os
import sys

from jobs import protocol as p
from jobs.protocol import trust
from runners.execution import EXIT_FAILED, EXIT_USAGE, Stopper, run
from runners.job import Job, RunnerError
from runners.job_file import run_job_file
from runners.sinks import ConsoleSink

# Every runner pays for its imports at start: typing stays out of run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable
    from contextlib import AbstractContextManager
    from typing import Any, TypeAlias

    from runners.execution import Execute

    DirectParser: TypeAlias = Callable[[argparse.ArgumentParser], None]
    DirectInput: TypeAlias = Callable[[argparse.Namespace], dict[str, Any]]
    DirectContext: TypeAlias = Callable[[argparse.Namespace], AbstractContextManager[Any]]


def run_by_hand(kind: str, execute: Execute, add_arguments: DirectParser,
                direct_input: DirectInput, argv: list[str],
                direct_context: DirectContext | None) -> int:
    """The options of `python -m runners.<kind> ...` parsed, and the job they give run."""
    problem = read_env_file()  # before the parser: its defaults may come from it
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    import argparse

    spec = getattr(sys.modules.get("__main__"), "__spec__", None)  # a kind of one's own too
    parser = argparse.ArgumentParser(prog=f"python -m {spec.name if spec else 'runners.' + kind}")
    parser.add_argument("--job-file", help="run this job file in the foreground")
    parser.add_argument("--force", action="store_true",
                        help="with --job-file: run it again even if it has finished")
    parser.add_argument("--timeout", type=_deadline, default=None,
                        help="seconds (direct mode)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.job_file is not None:
        # A job file runs as it is: its options were taken for it, unsaid (--data-dir too).
        given = [action.option_strings[0] if action.option_strings else action.dest
                 for action in parser._actions
                 if action.dest not in ("help", "job_file", "force")
                 and getattr(args, action.dest) != action.default]
        if given:
            parser.error(f"{', '.join(given)} cannot go with --job-file: a job file runs "
                         "with its own input and timeout, in the data folder it is in")
        return run_job_file(args.job_file, execute, kind, force=args.force)
    try:  # before anything starts (the chat's model server): bad usage, exit 2
        job_input = direct_input(args)
    except (ValueError, RunnerError) as exc:
        parser.error(str(exc))
    data = p.new_job("0" * 32, kind, job_input, args.timeout or 0)
    if direct_context is None:
        return run(Job(data, ConsoleSink()), execute, Stopper(None), args.timeout)
    try:
        with direct_context(args):
            return run(Job(data, ConsoleSink()), execute, Stopper(None), args.timeout)
    except RunnerError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_FAILED


def _deadline(text: str) -> float:
    """--timeout: seconds above 0, as the API's timeout_s (not NaN, not infinite)."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {text}")
    return value


def read_env_file() -> str | None:
    """By hand, the settings of the `.env` the server reads (the environment first, even
    where it sets one empty): the model server and its key, say; only the names the server
    reads (OFFLOAD_*, OPENAI_*; any case, as it reads them), and never the API's token,
    which no runner is given. Why it is not read, if it is not to be."""
    try:
        values = trust.env_file_values()
    except trust.UnsafeSettingsFile as exc:  # it could send the chat to another's listener
        return f"{exc}. Run from a folder of your own, or set OFFLOAD_ENV_FILE to a file of yours"
    except trust.UnreadableSettingsFile as exc:
        return str(exc)
    for name, value in values.items():
        name = name.upper()
        if (value is not None and name.startswith(("OFFLOAD_", "OPENAI_"))
                and name != "OFFLOAD_API_TOKEN" and name not in os.environ):
            try:
                os.environ[name] = value
            except ValueError:  # a NUL in it: no environment can hold it
                return f"{trust.env_file()} sets {name} to a value with a NUL character in it"
    return None
