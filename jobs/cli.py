"""`offload`: see and steer the jobs of a running Offload from a terminal.

    offload status | list | show ID | log ID [--follow] | wait ID... |
            submit KIND --input JSON [--wait] | cancel ID... | retry ID [--wait] |
            remove ID... | pause [SCHEDULE] | resume [SCHEDULE] | schedules |
            parallel N

It speaks the HTTP API only (docs/contract.md, "The `offload` command line"), so it
works with any server it can reach: the address is `--url`, else OFFLOAD_URL, else the one
OFFLOAD_HOST and OFFLOAD_PORT give the server (environment, then `.env` in the working
folder, as the server reads them); the token is OFFLOAD_API_TOKEN, never an argument.
The standard library only (an import contract checks it), bar python-dotenv for `.env`:
a command starts without loading the server's libraries.

Its exit codes say why it stopped: EXIT_* below, listed by `offload --help`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import re
import secrets
import shlex
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import IO, TYPE_CHECKING, Any

from jobs import protocol as p
from jobs.protocol import control

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_REFUSED = 4
EXIT_NOT_FOUND = 5
EXIT_CONFLICT = 6
EXIT_SERVER = 7
EXIT_INTERRUPTED = 130

EXIT_BY_STATUS = {400: EXIT_USAGE, 413: EXIT_USAGE, 422: EXIT_USAGE, 401: EXIT_REFUSED,
                  403: EXIT_REFUSED, 421: EXIT_REFUSED, 404: EXIT_NOT_FOUND, 409: EXIT_CONFLICT}
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = "8001"
REQUEST_TIMEOUT_S = 30.0  # a cancel waits on the server for the runner: its grace, then 10 s
# A batch's timeout grows by this much a job: a chat's turn takes up to ~35 ms to store
# with thousands of jobs kept; three times that leaves room for a slow disk.
BATCH_JOB_S = 0.1
# How Offload's 404s for a job or a schedule begin; any other 404 (its catch-all's "no API
# route", a page another server has not) says the address is not Offload's.
OFFLOADS_404S = ("no job with id", "no schedule named")
# The request's fields the options set, as the server names them in its errors.
OPTION_OF = {"run_at": "--at", "delay_s": "--delay", "timeout_s": "--timeout",
             "max_attempts": "--max-attempts", "depends_on": "--after", "priority": "--priority",
             "query.limit": "--limit", "query.before": "--before", "`before`": "--before"}
OPTION_FIELDS = re.compile(rf"(?<![\w.])({'|'.join(map(re.escape, OPTION_OF))})(?!\w)")
INPUT_EXAMPLE = '{"seconds": 2}'
STREAM_TIMEOUT_S = 60.0  # an event stream sends a keep-alive every 15 quiet seconds
RECONNECT_S = 60.0  # a dropped event stream is resumed for this long (an API restart), then not
POLL_S = 0.5  # how often a followed job is read where the server has no event stream to spare
STREAM_AGAIN_S = 10.0  # and how long, before its event stream is asked for again
WAIT_S = 25  # each long poll's wait (`GET /api/jobs/{id}?wait_s=`): within proxies' 30 s
STATES = [state.value for state in p.JobState]
ENDED = [state for state in STATES if state in p.FINAL_STATES]
LIST_MAX = 1000  # the longest listing the API gives


class Failure(Exception):
    """What ends a command early: one line for stderr and the exit code."""

    def __init__(self, code: int, message: str, status: int | None = None,
                 answer: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status  # the server's HTTP status, where it answered one
        self.answer = answer or {}  # and its JSON


class Unreachable(Failure):
    def __init__(self, message: str, reason: object = None) -> None:
        super().__init__(EXIT_UNREACHABLE, message)
        self.reason = reason  # why, when no connection was made or no answer came


def _env_file() -> dict[str, str | None]:
    path = p.env_file()  # as the server's
    problem = p.unsafe_settings_file(path)
    if problem is not None:  # it could send the token to another account's listener
        raise Failure(EXIT_USAGE, f"refusing to read {path}: {problem}. It could send your "
                      "token to another account's server. Run from a folder of your own, "
                      "or set OFFLOAD_ENV_FILE to a file of yours")
    if not os.path.isfile(path):
        return {}
    from dotenv import dotenv_values  # the parser the server's settings use

    try:
        return dotenv_values(path)
    except (OSError, UnicodeError) as exc:
        raise Failure(EXIT_USAGE, f"cannot read .env ({exc}); it must be UTF-8 text") from None


def configured(url: str | None) -> tuple[str, str | None]:
    """The server's address and the token: what is given, else what the server itself
    would read (the environment, then `.env`, read only if a value is still missing)."""
    env_files: list[dict[str, str | None]] = []  # `.env`, once read

    def value(name: str) -> str | None:
        found = os.environ.get(name)
        if not (found and found.strip()):
            if not env_files:
                env_files.append(_env_file())
            found = env_files[0].get(name)
        return found.strip() if found and found.strip() else None

    source = "--url"
    if url is None:
        url, source = value("OFFLOAD_URL"), "OFFLOAD_URL"
    if url is None:
        source = "OFFLOAD_HOST and OFFLOAD_PORT"
        host = value("OFFLOAD_HOST") or DEFAULT_HOST
        if host in ("0.0.0.0", "::"):  # serving on every address: loopback is one of them
            host = DEFAULT_HOST
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # an IPv6 address in a URL
        url = f"http://{host}:{value('OFFLOAD_PORT') or DEFAULT_PORT}"
    url = url.strip().rstrip("/")
    address = f"the server's address {url!r} (from {source})"
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - read for its ValueError: a port that is no number
        if re.search(r"[\s\x00-\x1f\x7f]", url):  # http.client refuses it as it sends
            raise ValueError("it holds a space or a control character")
    except ValueError as exc:  # an unclosed [, say
        raise Failure(EXIT_USAGE, f"{address} is not a URL ({exc}); like "
                                  "http://127.0.0.1:8001") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Failure(EXIT_USAGE, f"{address} is not an http:// or https:// URL; like "
                                  "http://127.0.0.1:8001")
    if parts.query or parts.fragment:  # the paths of the API are put after it
        raise Failure(EXIT_USAGE, f"{address} has a query or fragment; give its start "
                                  "alone, like http://127.0.0.1:8001")
    return url, value("OFFLOAD_API_TOKEN")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> urllib.request.Request | None:
        return None  # the 3xx is raised as an HTTPError, for `_refusal` to say


class Client:
    """The API over urllib: JSON in, JSON out, and an event stream read line by line."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url = url
        self.token = token
        # Offload is reached directly: a proxy set for the web must not see the token, nor
        # any host a redirect names (urllib sends a request's headers on with it).
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                                   _NoRedirects)

    def _open(self, method: str, path: str, body: Any = None, timeout: float = REQUEST_TIMEOUT_S,
              headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
        data = None if body is None else json.dumps(body).encode()
        headers = dict(headers or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        for name, value in headers.items():
            _check_header(name, value)
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers=headers)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            response: http.client.HTTPResponse = self._opener.open(request, timeout=timeout)
            return response
        except urllib.error.HTTPError as exc:
            raise self._refusal(exc) from None
        except UnicodeError as exc:  # a host name IDNA cannot encode (a label too long)
            raise Failure(EXIT_USAGE, f"the server's address {self.url!r} cannot be "
                                      f"used ({exc})") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise Unreachable(f"cannot reach Offload at {self.url}: {reason}. Is it running "
                              "(python launch.py)? Else give its address: --url or "
                              "OFFLOAD_URL", reason) from None

    def _refusal(self, exc: urllib.error.HTTPError) -> Failure:
        if 300 <= exc.code < 400:
            where = str(exc.headers.get("Location", "elsewhere"))[:200]
            return Failure(EXIT_USAGE, f"{self.url} redirected to {where} (not followed: "
                                       "the token would go with it); give Offload's own "
                                       "address with --url or OFFLOAD_URL")
        try:
            answer = json.loads(exc.read())
            detail = answer.get("detail")
        except (ValueError, AttributeError, OSError):
            answer, detail = None, None
        detail = detail if isinstance(detail, str) else f"HTTP {exc.code} {exc.reason}"
        if exc.headers.get("Retry-After"):  # a person reads no header
            detail = detail.replace("Retry-After seconds", f"{exc.headers['Retry-After']} s")
        code = EXIT_BY_STATUS.get(exc.code, EXIT_SERVER)
        if exc.code == 404 and not detail.startswith(OFFLOADS_404S):  # the address, not a job
            code, detail = EXIT_SERVER, (f"{detail} at {self.url}: is that Offload's address "
                                         "(as http://HOST:PORT, without /api)?")
        if exc.code == 401 and not self.token:
            detail += " (set OFFLOAD_API_TOKEN to the server's token)"
        return Failure(code, detail, exc.code, answer if isinstance(answer, dict) else None)

    def call(self, method: str, path: str, body: Any = None,
             headers: dict[str, str] | None = None, timeout: float = REQUEST_TIMEOUT_S) -> Any:
        with self._open(method, path, body, timeout, headers) as response:
            return self._read_json(response)

    def text(self, path: str) -> str:
        with self._open("GET", path) as response:
            try:
                return str(response.read().decode("utf-8", "replace"))
            except (OSError, http.client.HTTPException) as exc:
                raise Unreachable(f"the connection to {self.url} broke: {exc}") from None

    def _read_json(self, response: http.client.HTTPResponse) -> Any:
        try:
            return json.loads(response.read())
        except (OSError, http.client.HTTPException) as exc:
            raise Unreachable(f"the connection to {self.url} broke: {exc}") from None
        except ValueError:
            raise Failure(EXIT_SERVER, f"{self.url} did not answer JSON: is it Offload?") from None

    def events(self, job_id: str, after: str | None) -> Iterator[tuple[str | None, dict[str, Any]]]:
        """A job's events as (id, fields), resuming after `after` (docs/contract.md)."""
        headers = {"Accept": "text/event-stream"}
        if after is not None:
            headers["Last-Event-ID"] = after
        event_id = None
        with self._open("GET", f"/api/jobs/{job_path(job_id)}/events", timeout=STREAM_TIMEOUT_S,
                        headers=headers) as response:
            if "text/event-stream" not in (response.getheader("Content-Type") or ""):
                raise Failure(EXIT_SERVER, f"{self.url} answered no event stream: is it "
                                           "Offload?")
            try:
                for raw in response:
                    line = raw.decode("utf-8").rstrip("\r\n")
                    if line.startswith("id: "):
                        event_id = line[4:]
                    elif line.startswith("data: "):
                        yield event_id, json.loads(line[6:])
                        event_id = None
            except (OSError, http.client.HTTPException) as exc:  # socket.timeout too
                raise Unreachable(f"the event stream from {self.url} broke: {exc}") from None
            except ValueError:
                raise Failure(EXIT_SERVER, f"{self.url} sent events that are not Offload's: "
                                           "is it Offload?") from None


def _check_header(name: str, value: str) -> None:
    """A header a request can carry: Latin-1, on one line (http.client would raise)."""
    try:
        value.encode("latin-1")
    except UnicodeError:
        pass
    else:
        if not any(c in value for c in "\r\n\0"):
            return
    what = "OFFLOAD_API_TOKEN" if name == "Authorization" else name
    raise Failure(EXIT_USAGE, f"{what} holds characters a header cannot carry (letters "
                              "beyond Latin-1, a line break); use ASCII")


def job_path(job_id: str) -> str:
    return urllib.parse.quote(job_id.strip(), safe="")


def follow(client: Client, job_id: str,
           on_event: Callable[[dict[str, Any], dict[str, Any]], None]) -> dict[str, Any]:
    """Follow a job's event stream until its final state, resuming a dropped connection
    with Last-Event-ID; `on_event(event, job)` sees each event and the job after it."""
    job: dict[str, Any] = {}
    last_id: str | None = None
    dropped_at: float | None = None
    pause = 0.0
    while True:
        try:
            for event_id, fields in _events_or_reads(client, job_id, last_id, job):
                dropped_at = None
                if not fields:
                    continue  # a read that found nothing new: the server answers
                _apply(job, fields)
                if event_id is not None:
                    last_id = event_id
                on_event(fields, job)
                if job.get(p.F_STATE) in p.FINAL_STATES:
                    return job
        except Unreachable:
            if not job or (dropped_at is not None
                           and time.monotonic() - dropped_at > RECONNECT_S):
                raise
        if dropped_at is not None and time.monotonic() - dropped_at > RECONNECT_S:
            raise Unreachable(f"the event stream from {client.url} kept ending before job "
                              f"{job_id} did; see it with: offload show {job_id}")
        # Dropped, or closed before the final state: resume where it stopped.
        if dropped_at is None:
            dropped_at, pause = time.monotonic(), 0.25
        time.sleep(pause)
        pause = min(pause * 2, 2.0)


def until_ended(client: Client, job_id: str) -> dict[str, Any]:
    """The job once it has ended, by long polls (`?wait_s=`), resumed for RECONNECT_S
    across a dropped connection (an API restart). Where the server cannot wait (a 503:
    its worker's streams and waits all taken, or it is stopping) or answers at once (a
    server before `wait_s`, another program), the job's event stream is followed instead,
    which reads the job every POLL_S where the server has no stream to spare."""
    dropped_at: float | None = None
    while True:
        asked = time.monotonic()
        try:
            try:
                job: dict[str, Any] | None = dict(client.call(
                    "GET", f"/api/jobs/{job_path(job_id)}?wait_s={WAIT_S}",
                    timeout=WAIT_S + REQUEST_TIMEOUT_S))
            except Failure as exc:
                if exc.status != 503:
                    raise
                job, dropped_at = None, None  # it answers: a restart's minute starts anew
            if job is not None and job.get(p.F_STATE) in p.FINAL_STATES:
                return job
            if job is None or time.monotonic() - asked < WAIT_S / 2:
                follow(client, job_id, lambda event, job: None)
                return dict(client.call("GET", f"/api/jobs/{job_path(job_id)}"))  # in full
            dropped_at = None
        except Unreachable:
            now = time.monotonic()  # from the failure: a request can take WAIT_S to fail
            dropped_at = dropped_at or now
            if now - dropped_at > RECONNECT_S:
                raise
            time.sleep(1.0)


def _apply(job: dict[str, Any], fields: dict[str, Any]) -> None:
    """An event's fields applied to the job as known so far."""
    if p.F_OUTPUT in fields:  # the whole output: the first event, or a restart
        job[p.F_OUTPUT] = fields[p.F_OUTPUT] or ""
    elif p.OUTPUT_DELTA in fields:
        job[p.F_OUTPUT] = str(job.get(p.F_OUTPUT) or "") + fields[p.OUTPUT_DELTA]
    job.update({k: v for k, v in fields.items() if k not in (p.F_OUTPUT, p.OUTPUT_DELTA)})


def _events_or_reads(client: Client, job_id: str, after: str | None,
                     job: dict[str, Any]) -> Iterator[tuple[str | None, dict[str, Any]]]:
    """The job's events after `after`; where every event stream the server allows is
    taken (503), reads of the job every POLL_S for STREAM_AGAIN_S instead, each as an
    event would bring what changed since `job` (empty: nothing), then it ends, and the
    stream is asked for again."""
    try:
        yield from client.events(job_id, after)
        return
    except Failure as exc:
        if exc.status != 503:
            raise
    until = time.monotonic() + STREAM_AGAIN_S
    while True:
        now = dict(client.call("GET", f"/api/jobs/{job_path(job_id)}"))
        fields = {k: v for k, v in now.items() if k != p.F_OUTPUT and job.get(k) != v}
        fields.update(p.output_change(job, now) if p.F_OUTPUT in job
                      else {p.F_OUTPUT: str(now.get(p.F_OUTPUT) or "")})
        yield p.event_id(now), fields  # the id the stream would give: resumed there
        if now.get(p.F_STATE) in p.FINAL_STATES or time.monotonic() > until:
            return
        time.sleep(POLL_S)


# What people read ------------------------------------------------------------------------


def _when(value: object) -> str:
    """'2026-01-31T12:00:00.123Z' -> '2026-01-31 12:00:00' (UTC, as the API gives it)."""
    return str(value)[:19].replace("T", " ") if value else "-"


def _took(job: dict[str, Any]) -> str:
    started = job.get(p.F_STARTED_AT)
    if not started:
        return "-"
    finished = job.get(p.F_FINISHED_AT)
    end = p.parse_iso(str(finished)) if finished else time.time()
    return f"{max(0.0, end - p.parse_iso(str(started))):.1f}s"


def _note(job: dict[str, Any]) -> str:
    error = job.get(p.F_ERROR)
    if isinstance(error, dict) and error.get("message"):
        return f"{error.get('type')}: {error['message']}"
    progress = job.get(p.F_PROGRESS)
    if isinstance(progress, dict):
        fraction = progress.get("fraction")
        percent = f"{fraction:.0%} " if isinstance(fraction, (int, float)) else ""
        return f"{percent}{progress.get('message') or ''}".strip()
    position = job.get(p.F_QUEUE_POSITION)
    start_at = p.run_at(job)
    if job.get(p.F_STATE) == p.JobState.QUEUED and start_at is not None and start_at > time.time():
        return f"starts {_when(p.iso(start_at))} UTC"
    dependencies = p.dependencies(job)
    if position is None and job.get(p.F_STATE) == p.JobState.QUEUED and dependencies:
        return (f"after {dependencies[0][:8]}" if len(dependencies) == 1
                else f"after {len(dependencies)} jobs")
    return "" if position is None else f"{position} ahead in the queue"


def _one_line(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def table(rows: list[list[str]], out: IO[str]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        out.write(_shown("  ".join(cells).rstrip() + "\n", out))


def job_table(jobs: list[dict[str, Any]], out: IO[str]) -> None:
    if not jobs:
        out.write("no jobs\n")
        return
    rows = [["ID", "KIND", "STATE", "CREATED (UTC)", "TOOK", "NOTE"]]
    rows += [[str(job.get(p.F_ID)), str(job.get(p.F_KIND)), str(job.get(p.F_STATE)),
              _when(job.get(p.F_CREATED_AT)), _took(job), _one_line(_note(job), 60)]
             for job in jobs]
    table(rows, out)


def job_details(job: dict[str, Any], out: IO[str]) -> None:
    def compact(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False)

    lines = [("id", job.get(p.F_ID)), ("kind", job.get(p.F_KIND)), ("state", job.get(p.F_STATE)),
             ("created", _when(job.get(p.F_CREATED_AT))),
             ("started", _when(job.get(p.F_STARTED_AT))),
             ("finished", _when(job.get(p.F_FINISHED_AT))), ("took", _took(job)),
             ("timeout", f"{job.get(p.F_TIMEOUT_S)}s")]
    queued = job.get(p.F_STATE) == p.JobState.QUEUED
    for name in ("queue_position", "attempt", "max_attempts", "priority", "run_at", "schedule",
                 "depends_on", "rerun_of", "after", "launcher", "host", "exit_code"):
        if name == "run_at" and not queued:
            continue  # when a queued job starts (a retry's backoff left it in the file)
        if name == "depends_on" and job.get(name) is not None:
            lines.append(("depends on", ", ".join(p.dependencies(job))))
        elif job.get(name) is not None:
            lines.append((name.replace("_", " "), job[name]))
    if job.get(p.F_ERROR) or job.get(p.F_PROGRESS):
        lines.append(("error" if job.get(p.F_ERROR) else "progress", _note(job)))
    for earlier in job.get(p.F_EARLIER_ERRORS) or []:
        lines.append((f"attempt {earlier.get('attempt')}",
                      f"{earlier.get('type')}: {earlier.get('message')}"))
    lines.append(("input", compact(job.get(p.F_INPUT))))
    if job.get(p.F_RESULT) is not None:
        lines.append(("result", compact(job[p.F_RESULT])))
    for name, value in lines:
        out.write(_shown(f"{name + ':':<16}{value}\n", out))
    if job.get(p.F_OUTPUT):
        out.write(_shown(f"output:\n{job[p.F_OUTPUT]}\n", out))


# Control characters but tab, newline and carriage return (a progress line).
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _shown(text: str, stream: IO[str]) -> str:
    """`text` for `stream`: on a terminal, control characters written out (`\\x1b`), as
    a model's reply or a job's log can hold escape sequences that retitle the window or
    clear the screen; into a file or a pipe, as it is."""
    if not stream.isatty():
        return text
    return _CONTROL.sub(lambda found: f"\\x{ord(found.group()):02x}", text)


# Commands ------------------------------------------------------------------------------


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    health = client.call("GET", "/api/health")
    counts = client.call("GET", "/api/history?seconds=5&jobs=0")
    running = client.call("GET", "/api/jobs?state=running&limit=1000")["jobs"]
    if args.json:
        _print_json({"url": client.url, "health": health, "counts": counts["counts"],
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
        cap = f", {_cap_said(queue)}" if "max_concurrent_set" in queue else ""
        rows.append(["queue", f"{'paused' if queue.get('paused') else 'running'}{cap}"])
        rows.extend(["", line] for line in _kind_caps_said(queue))
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
    before = _job_id(args.before, "--before")
    while True:  # with --all, page after page: a listing gives at most LIST_MAX
        query = {"state": args.state, "kind": args.kind, "before": before,
                 "limit": LIST_MAX if args.all else args.limit}
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
        jobs += page["jobs"]
        before = page.get("next_before")
        if not (args.all and before):
            break
    if args.json:
        _print_json(jobs)
    else:
        job_table(jobs, sys.stdout)
    if not jobs:
        _known_kind(client, args.kind)
    if any(job.get(p.F_STATE) == p.JobState.QUEUED for job in jobs) and _queue_paused(client):
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


def _known_kind(client: Client, kind: str | None) -> None:
    """Where --kind matched no job: say so on stderr when it names no kind of the
    server's (a typo; jobs of a kind removed since are still matched: no error)."""
    if kind is None:
        return
    try:
        kinds = client.call("GET", "/api/queue").get("kinds")
    except Failure:  # an older server: nothing to say
        return
    if isinstance(kinds, list) and kind not in kinds:
        sys.stderr.write(f"offload: this server runs no job kind {kind!r} (its kinds: "
                         f"{', '.join(map(str, kinds))})\n")


def cmd_show(client: Client, args: argparse.Namespace) -> int:
    job = client.call("GET", f"/api/jobs/{job_path(args.id)}")
    if args.json:
        _print_json(job)
    else:
        job_details(job, sys.stdout)
    return EXIT_OK


def cmd_wait(client: Client, args: argparse.Namespace) -> int:
    """As `pueue wait ID...`: until each job has ended; a table of them (or their JSON)."""
    return _wait_all(client, list(dict.fromkeys(job_path(each) for each in args.ids)), args)


def _wait_all(client: Client, ids: list[str], args: argparse.Namespace) -> int:
    # An unknown id exits 5 before any wait; a job ended already is kept as it is now
    # (by the end of a long wait for another, it may have been pruned).
    finals = [client.call("GET", f"/api/jobs/{job_id}") for job_id in ids]
    for n, job in enumerate(finals):
        if job.get(p.F_STATE) not in p.FINAL_STATES:
            finals[n] = until_ended(client, ids[n])
    if args.json:
        _print_json(finals)
    else:
        job_table(finals, sys.stdout)
    return max(_outcome(job) for job in finals)


def _outcome(job: dict[str, Any]) -> int:
    """EXIT_OK for a completed job; else its error on stderr and EXIT_JOB_FAILED."""
    if job.get(p.F_STATE) == p.JobState.COMPLETED:
        return EXIT_OK
    error = job.get(p.F_ERROR) or {}
    reason = error.get("message") or error.get("type") or "no reason given"
    sys.stderr.write(_shown(f"offload: job {job.get(p.F_ID)} {job.get(p.F_STATE)}: {reason}\n",
                            sys.stderr))
    return EXIT_JOB_FAILED


def cmd_log(client: Client, args: argparse.Namespace) -> int:
    if not args.follow:
        text = client.text(f"/api/jobs/{job_path(args.id)}/log")
        if args.json:
            _print_json({"id": args.id, "log": text})
        elif text:
            sys.stdout.write(_shown(text, sys.stdout))
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
            sys.stderr.write(_shown(said, sys.stderr))
            line_open[0] = False
        attempt_shown[0] = attempt
        if args.json:
            sys.stdout.write(json.dumps(event, ensure_ascii=False) + "\n")
        elif p.F_OUTPUT in event or p.OUTPUT_DELTA in event:
            text = event.get(p.F_OUTPUT, event.get(p.OUTPUT_DELTA)) or ""
            sys.stdout.write(_shown(text, sys.stdout))
            if text:
                line_open[0] = not text.endswith("\n")
        sys.stdout.flush()
        progress = job.get(p.F_PROGRESS)
        if not args.json and progress and progress != progress_seen[0]:
            progress_seen[0] = progress
            if not job.get(p.F_OUTPUT):  # never inside a reply being written
                sys.stderr.write(_shown(f"[{_note({p.F_PROGRESS: progress})}]\n", sys.stderr))

    job = follow(client, args.id, show)
    if not args.json and job.get(p.F_OUTPUT) and not str(job[p.F_OUTPUT]).endswith("\n"):
        sys.stdout.write("\n")
    return _outcome(job)


def _wait_and_report(client: Client, job: dict[str, Any], args: argparse.Namespace) -> int:
    if not args.wait:
        if args.json:
            _print_json(job)
        else:
            sys.stdout.write(f"{job[p.F_ID]}\n")
        return EXIT_OK
    # Said first: Ctrl-C while it waits leaves the job running, and its id is how to reach it.
    sys.stderr.write(f"{job[p.F_ID]} submitted; waiting for it to end (Ctrl-C stops the "
                     "waiting, not the job)\n")
    if job.get(p.F_STATE) == p.JobState.QUEUED and _queue_paused(client):
        sys.stderr.write("offload: the queue is paused: it starts once resumed "
                         "(offload resume)\n")
    final = until_ended(client, job[p.F_ID])
    if args.json:
        _print_json(final)
    else:
        job_details(final, sys.stdout)
    return _outcome(final)


def _queue_paused(client: Client) -> bool:
    try:
        return client.call("GET", "/api/queue").get("paused") is True
    except Failure:  # an older server, without the route: not paused
        return False


def _read(given: str, option: str) -> tuple[str, str]:
    """The text `option` names: `-` for stdin's, a file's (`@file` too); where it was, said
    as such. UTF-8, with or without the BOM Notepad writes."""
    where = "stdin" if given == "-" else given.removeprefix("@")
    try:
        if given == "-":
            if sys.stdin is None:  # `<&-`: no stdin at all
                raise Failure(EXIT_USAGE, f"{option} - reads stdin, which is closed: give "
                                          f"{option} a file")
            return where, sys.stdin.buffer.read().decode("utf-8-sig")
        with open(where, encoding="utf-8-sig") as file:
            return where, file.read()
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


def _job_id(text: str | None, flag: str | None) -> str | None:
    """A job's id as given to `flag` (None: as an argument), in any case and with spaces
    around it."""
    if text is None:
        return None
    job_id = text.strip().lower()
    if not p.is_valid_id(job_id):
        said = "" if flag is None else f"{flag} wants a job's id: "
        raise Failure(EXIT_USAGE, f"{said}{text[:80]!r} is no job's id (32 hex characters, "
                                  "as offload list shows)")
    return job_id


def _checked_ids(args: argparse.Namespace) -> None:
    """The ids given as arguments, each checked: an empty one, or one with a `/`, was
    sent as a path and answered as another route's."""
    if isinstance(getattr(args, "id", None), str):
        args.id = _job_id(args.id, None)
    if isinstance(getattr(args, "ids", None), list):
        args.ids = [_job_id(each, None) for each in args.ids]


def cmd_submit(client: Client, args: argparse.Namespace) -> int:
    if any(not given.strip(" ,") for given in args.after or ()):  # a script's unset variable
        raise Failure(EXIT_USAGE, "--after is empty: give a job's id, or leave --after out")
    after = [job_id for given in args.after or () for each in given.split(",")
             if each.strip() and (job_id := _job_id(each, "--after")) is not None]
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
        return _wait_and_report(client, client.call("POST", "/api/jobs", body, headers), args)
    return _submit_batch(client, body, args)


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
        exc.message = _by_line(exc.message, [line for line, _ in inputs], where)
        # The server's words for a batch too large, said for this command.
        fewer = ("send fewer lines at a time" if where == "stdin"
                 else f"split {where} into files of fewer lines")
        for said in ("send a smaller input, or a batch of fewer jobs", "send them in several"):
            exc.message = exc.message.replace(said, fewer)
        stored = exc.answer.get("stored")
        if isinstance(stored, list) and stored:  # before the job it names: said, as if done
            if args.json:
                _print_json(stored)
            else:
                sys.stdout.write("".join(f"{job_id}\n" for job_id in stored))
            # The server's words (BatchStopped in jobs/api/service.py) said for this command.
            exc.message = exc.message.replace("(their ids are in `stored`)", "(their ids above)")
            exc.message = exc.message.replace(
                "send the batch again with the same Idempotency-Key to store the rest",
                f"run the same command again with --key {key} to store the rest")
        raise
    ids = [str(job[p.F_ID]) for job in jobs]
    if not args.wait:
        if args.json:
            _print_json(jobs)
        else:
            sys.stdout.write("".join(f"{job_id}\n" for job_id in ids))
        return EXIT_OK
    # Their ids first: a Ctrl-C while it waits leaves them running, and ids reach them.
    sys.stderr.write(f"{len(ids)} jobs submitted ({' '.join(ids)}); waiting for them to end "
                     "(Ctrl-C stops the waiting, not the jobs)\n")
    if _queue_paused(client):
        sys.stderr.write("offload: the queue is paused: they start once resumed "
                         "(offload resume)\n")
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


def cmd_retry(client: Client, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    if args.input is not None:
        body["input"] = parse_input(args.input)
    if args.timeout is not None:
        body["timeout_s"] = args.timeout
    job = client.call("POST", f"/api/jobs/{job_path(args.id)}/rerun", body or None)
    return _wait_and_report(client, job, args)


def _matching(client: Client, states: list[str], kind: str | None) -> tuple[list[str], bool]:
    """The ids of the jobs in `states` (of `kind`), as the API lists them now, newest
    first; and whether some listing was cut at LIST_MAX (older ones are left)."""
    ids: list[str] = []
    cut = False
    for state in states:
        given = urllib.parse.urlencode({k: v for k, v in (("state", state), ("kind", kind),
                                                          ("limit", LIST_MAX)) if v is not None})
        listed = client.call("GET", f"/api/jobs?{given}")["jobs"]
        ids += [job[p.F_ID] for job in listed]
        cut = cut or len(listed) >= LIST_MAX
    return list(dict.fromkeys(ids)), cut  # one that started between the listings: once


def cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    def cancel(job_id: str) -> Any:
        job = client.call("DELETE", f"/api/jobs/{job_path(job_id)}")
        state = job[p.F_STATE]  # another shape: a KeyError or TypeError, told as not Offload
        if state not in p.FINAL_STATES:  # the server's wait ended first: not done yet
            raise Failure(EXIT_SERVER, f"{job_id}: cancel asked, but the job is still {state} "
                          "after the server's wait: is the supervisor running (offload "
                          "status)? It is cancelled once it stops", answer=job)
        return job

    return _each_job(client, args, "queued, running or live", {"live": ["queued", "running"]},
                     cancel, lambda job: str(job.get(p.F_STATE)), (EXIT_CONFLICT, "had finished"))


def cmd_remove(client: Client, args: argparse.Namespace) -> int:
    def remove(job_id: str) -> Any:
        try:
            return client.call("POST", f"/api/jobs/{job_path(job_id)}/remove")
        except Failure as exc:
            if exc.status == 404 and exc.message.startswith("no API route"):
                raise Failure(EXIT_SERVER, "this server is older: it cannot remove jobs (they "
                                           "go with pruning)") from None
            raise

    return _each_job(client, args, "completed, failed, cancelled, timeout or finished",
                     {"finished": ENDED}, remove, lambda job: "removed",
                     (EXIT_NOT_FOUND, "was gone already"))  # pruned, or removed by another


def _each_job(client: Client, args: argparse.Namespace, states_said: str,
              groups: dict[str, list[str]], act: Callable[[str], Any],
              said: Callable[[dict[str, Any]], str], moved_on: tuple[int, str]) -> int:
    """`act` on the jobs given by id, or on every job in --state (of --kind), saying how
    each went; `moved_on`: the exit code of a failure that means a job listed in that
    state changed since, leaving nothing to do, and the words for it. The exit code."""
    if args.kind and not args.state:
        raise Failure(EXIT_USAGE, f"--kind goes with --state ({states_said}): give both to "
                                  f"{args.command} every job of that kind in that state")
    if bool(args.ids) == bool(args.state):
        raise Failure(EXIT_USAGE, f"give job ids, or --state ({states_said}; and --kind) "
                                  f"to {args.command} every job in it"
                                  f"{', not both' if args.ids else ''}")
    done: list[dict[str, Any]] = []
    if args.ids:
        code = _act(args, list(dict.fromkeys(args.ids)), act, said, moved_on, done)
    else:
        states = groups.get(args.state, [args.state])
        tried: set[str] = set()
        code, cut = EXIT_OK, True
        while cut:  # a listing holds the newest LIST_MAX: those done, older ones next
            ids, cut = _matching(client, states, args.kind)
            ids = [job_id for job_id in ids if job_id not in tried]
            if not ids:
                if not tried:
                    _known_kind(client, args.kind)
                break
            tried.update(ids)
            acted = _act(args, ids, act, said, moved_on, done)  # each page, whatever came before
            code = code or acted
    if args.json:
        _print_json(done)
    return code


def _act(args: argparse.Namespace, ids: list[str], act: Callable[[str], Any],
         said: Callable[[dict[str, Any]], str], moved_on: tuple[int, str],
         done: list[dict[str, Any]]) -> int:
    """`act` on `ids`, saying how each went (for --json: appended to `done`); the exit code."""
    def one(job_id: str) -> dict[str, Any] | Failure:
        try:
            return dict(act(job_id))
        except Failure as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(one, ids))
    code = EXIT_OK
    for job_id, answer in zip(ids, answers, strict=True):
        if isinstance(answer, Failure) and args.state and answer.code == moved_on[0]:
            if not args.json:  # it changed since it was listed: nothing left to do
                sys.stdout.write(f"{job_id} {moved_on[1]}\n")
        elif isinstance(answer, Failure):
            named = "" if job_id in answer.message else f"{job_id}: "
            sys.stderr.write(f"offload: {named}{answer.message}\n")
            code = code or answer.code
        elif not args.json:
            sys.stdout.write(f"{job_id} {said(answer)}\n")
    for job_id, answer in zip(ids, answers, strict=True):
        if not isinstance(answer, Failure):
            done.append(answer)
        elif answer.answer.get(p.F_ID) == job_id:  # it failed, yet carries the job as it is
            done.append(answer.answer)
    return code


def cmd_pause(client: Client, args: argparse.Namespace) -> int:
    return _steer(client, args, "pause")


def cmd_resume(client: Client, args: argparse.Namespace) -> int:
    return _steer(client, args, "resume")


def _steer(client: Client, args: argparse.Namespace, action: str) -> int:
    """Pause or resume the queue (no name) or one schedule."""
    if args.schedule is None:
        answer = client.call("POST", f"/api/queue/{action}")
        said = "paused: queued jobs wait" if answer.get("paused") else "running"
        what = f"queue {said}"
    else:
        if not args.schedule or "/" in args.schedule:  # no route would take it: said so
            raise Failure(EXIT_NOT_FOUND, f"no schedule is named {args.schedule!r}; "
                          "see them with: offload schedules")
        name = urllib.parse.quote(args.schedule, safe="")
        answer = client.call("POST", f"/api/schedules/{name}/{action}")
        what = f"schedule {answer.get('name')} {'paused' if answer.get('paused') else 'running'}"
    if args.json:
        _print_json(answer)
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
        else:
            cap = None if args.runners == "default" else _runners(args.runners)
            answer = client.call("PUT", "/api/queue/cap", {
                "max_concurrent": cap, **({"kind": args.kind} if args.kind is not None else {})})
    except Failure as exc:
        raise Failure(EXIT_SERVER, older) if exc.status == 404 else exc from None
    if "max_concurrent_set" not in answer:
        raise Failure(EXIT_SERVER, older)
    if args.json:
        _print_json(answer)
    else:
        sys.stdout.write("\n".join([_cap_said(answer), *_kind_caps_said(answer)]) + "\n")
    return EXIT_OK


def _kind_caps_said(queue: dict[str, Any]) -> list[str]:
    """A line for each kind with a cap of its own: its cap, and where it comes from."""
    caps, defaults = queue.get("kind_caps") or {}, queue.get("kind_caps_default") or {}
    lines = []
    for kind, cap in sorted(caps.items()):
        if kind not in (queue.get("kind_caps_set") or []):
            lines.append(f"{kind} at once: {cap} (OFFLOAD_KIND_CAPS)")
        else:
            default = defaults.get(kind)
            lines.append(f"{kind} at once: {cap} (set while running, kept across restarts; "
                         + (f"OFFLOAD_KIND_CAPS says {default})" if default is not None
                            else "without it, no cap of its own)"))
    return lines


def _cap_said(queue: dict[str, Any]) -> str:
    said = f"runners at once: {queue['max_concurrent']}"
    if not queue.get("max_concurrent_set"):
        return f"{said} (OFFLOAD_MAX_CONCURRENT)"
    return (f"{said} (set while running, kept across restarts; OFFLOAD_MAX_CONCURRENT is "
            f"{queue['max_concurrent_default']})")


def _runners(text: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 4
            and 1 <= int(text) <= control.MAX_CAP):
        raise Failure(EXIT_USAGE, f"give a number of runners from 1 to {control.MAX_CAP}, "
                                  f"or default; not {text!r}")
    return int(text)


def cmd_schedules(client: Client, args: argparse.Namespace) -> int:
    answer = client.call("GET", "/api/schedules")
    code = EXIT_SERVER if answer.get("error") else EXIT_OK  # the schedules run as last read
    if args.json:
        _print_json(answer)
        return code
    if answer.get("error"):
        sys.stderr.write(f"offload: the schedules file cannot be used: {answer['error']}\n")
    schedules = answer.get("schedules") or []
    if not schedules:
        sys.stdout.write("no schedules\n")
        return code
    rows = [["NAME", "KIND", "WHEN", "NEXT RUN (UTC)", "LAST JOB"]]
    rows += [[str(each.get("name")), str(each.get("kind")), _timing(each),
              "paused" if each.get("paused") else _when(each.get("next_run_at")),
              f"{each.get('last_job_id') or '-'} {each.get('last_state') or ''}".rstrip()]
             for each in schedules]
    table(rows, sys.stdout)
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


# The parser --------------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--json", action="store_true", default=default,
                        help="print JSON for scripts instead of a table")
    parser.add_argument("--url", default=default,
                        help="the server (default: OFFLOAD_URL, else OFFLOAD_HOST and "
                             "OFFLOAD_PORT, else http://127.0.0.1:8001)")


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {text}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, 0 or more, not {text}")
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
        sub = commands.add_parser(name, help=text, description=text)
        _common(sub, argparse.SUPPRESS)  # after the command as before it
        sub.set_defaults(run=run)
        return sub

    command("status", cmd_status, "health, counts by state, runners, the model (the default)")
    listing = command("list", cmd_list, "jobs, newest first")
    listing.add_argument("--state", choices=STATES)
    listing.add_argument("--kind")
    listing.add_argument("--limit", type=int, help="at most this many (1-1000; default 100)")
    listing.add_argument("--before", metavar="ID", help="those submitted before this job: "
                                                        "the next page")
    listing.add_argument("--all", action="store_true", help="every one, however many")
    command("show", cmd_show, "one job in full").add_argument("id")
    command("wait", cmd_wait, "wait until jobs have ended, show them; exits 1 unless they "
                              "all completed").add_argument("ids", nargs="+", metavar="id")
    log = command("log", cmd_log, "a job's log (its runner's stdout and stderr)")
    log.add_argument("id")
    log.add_argument("--follow", "-f", action="store_true",
                     help="instead, the job's output (a chat's reply) as it streams, and its "
                          "progress, until it ends; exits 1 unless it completed")
    cancel = command("cancel", cmd_cancel, "cancel jobs: queued ones never start, running "
                                           "ones are stopped")
    cancel.add_argument("ids", nargs="*", metavar="id")
    cancel.add_argument("--state", choices=["queued", "running", "live"],
                        help="instead of ids: every job in this state (live: both), up to "
                             "1000 of each")
    cancel.add_argument("--kind", help="with --state: of this kind only")
    remove = command("remove", cmd_remove, "delete finished jobs now, with their input, "
                                           "output and log (as pruning does later)")
    remove.add_argument("ids", nargs="*", metavar="id")
    remove.add_argument("--state", choices=[*ENDED, "finished"],
                        help="instead of ids: every job in this state (finished: all four), "
                             "as Pueue's clean")
    remove.add_argument("--kind", help="with --state: of this kind only")
    for name, run, text in (("submit", cmd_submit, "submit a job; prints its id"),
                            ("retry", cmd_retry, "run a finished job again as a new job; "
                                                 "prints the new id")):
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
                                                              "many seconds from now")
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
            sub.add_argument("id")
            sub.add_argument("--input", help="another input: JSON, @file.json or -")
        sub.add_argument("--timeout", type=_positive, help="its deadline, seconds")
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


def _quiet_broken_pipe() -> int:
    """`offload list | head`: the reader left; no traceback, no second error on exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
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
    try:
        _checked_ids(args)
        client = Client(*configured(args.url or None))
        code = int(args.run(client, args))
        sys.stdout.flush()  # a reader that left (`| head`) is found here, not at exit
        return code
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
        sys.stderr.write(f"offload: the answer from {where} is not shaped as Offload's "
                         f"({type(exc).__name__}: {str(exc)[:100]}): is it Offload?\n")
        return EXIT_SERVER
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except OSError as exc:  # its output cannot be written: a full disk, say (`> /dev/full`)
        _quiet_broken_pipe()
        sys.stderr.write(f"offload: cannot write its output ({exc.strerror or exc}); what it "
                         "did before is done: offload list shows the jobs\n")
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
