"""`offload`: see and steer the jobs of a running Offload from a terminal.

    offload status | list | show ID | log ID [--follow] | wait [ID...] |
            submit KIND --input JSON [--wait] | cancel ID... | retry ID [--wait] |
            remove ID... | pause [SCHEDULE] | resume [SCHEDULE] | schedules |
            parallel N

It speaks the HTTP API only (docs/contract.md, "The `offload` command line"), so it
works with any server it can reach: the address is `--url`, else OFFLOAD_URL, else the one
OFFLOAD_HOST and OFFLOAD_PORT give the server (environment, then `.env` in the working
folder, as the server reads them); the token is OFFLOAD_API_TOKEN, never an argument.
The standard library only (an import contract checks it), bar python-dotenv for `.env`:
a command starts without loading the server's libraries.

Its exit codes say why it stopped: EXIT_* in client.py, listed by `offload --help`.
The commands live in look.py (looking), wait.py (waiting), submit.py (submitting) and
steer.py (changing); command_line.py parses the command line and runs one. This module
imports none of them until `main` runs: the console script imports it outside any
handler, so a Ctrl+C while the command loads would be a traceback. One after this module
has loaded, before `main` runs (the console script's own lines), has no handler either:
it ends the process unsaid (`_unsaid_interrupt`).
"""

import sys
import types


def _unsaid_interrupt(kind: type[BaseException], value: BaseException,
                      trace: types.TracebackType | None) -> None:
    """A Ctrl+C no handler caught is no error to show; Python then ends the process by
    SIGINT, as a shell expects of an interrupted command. Anything else, as before."""
    if not issubclass(kind, KeyboardInterrupt):
        _said_before(kind, value, trace)


_said_before, sys.excepthook = sys.excepthook, _unsaid_interrupt


def main(argv: list[str] | None = None) -> int:
    try:
        from jobs.cli.command_line import run

        return run(argv)
    except KeyboardInterrupt:  # while it loads or parses, as while it runs
        return 130  # EXIT_INTERRUPTED, which lives in what was loading
