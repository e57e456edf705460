"""The CLI's way to the server: its address and token (as the server reads them), HTTP
requests and what their failures mean as exit codes."""

from __future__ import annotations

import http.client
import json
import os
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Any

from jobs import protocol as p
from jobs.protocol import trust

if TYPE_CHECKING:
    from collections.abc import Iterator


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
                  403: EXIT_REFUSED, 421: EXIT_REFUSED, 404: EXIT_NOT_FOUND, 409: EXIT_CONFLICT,
                  410: EXIT_CONFLICT}
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = "8001"
LIST_MAX = 1000  # the longest listing the API gives
STREAM_TIMEOUT_S = 60.0  # an event stream sends a keep-alive every 15 quiet seconds
REQUEST_TIMEOUT_S = 30.0  # a cancel waits on the server for the runner: its grace, then 10 s
# A batch's timeout grows by this much a job: a chat's turn takes up to ~35 ms to store
# with thousands of jobs kept; three times that leaves room for a slow disk.
BATCH_JOB_S = 0.1
# How Offload's 404s for a job or a schedule begin; any other 404 (its catch-all's "no API
# route", a page another server has not) says the address is not Offload's.
OFFLOADS_404S = ("no job with id", "no schedule named")
JOB_STATES = frozenset(state.value for state in p.JobState)
Filter = str | list[str] | None  # a listing's `state` or `kind`: one, any of several, or all


class Failure(Exception):
    """What ends a command early: one line for stderr and the exit code."""

    def __init__(self, code: int, message: str, status: int | None = None,
                 answer: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status  # the server's HTTP status, where it answered one
        self.answer = answer or {}  # and its JSON


def not_offload(url: str, why: str) -> Failure:
    """What answers at `url` is another program (or answers of another shape): said so,
    exit 7. `why`: what about its answer is not Offload's."""
    return Failure(EXIT_SERVER, f"the answer from {url} is not shaped as Offload's "
                                f"({why[:100]}): is it Offload?")


def offload_shaped(url: str, answer: Any, what: str, **fields: type) -> dict[str, Any]:
    """`answer` if it is a JSON object with each of `fields` of its type (what a command
    prints from it), else `not_offload`: `what` names what was asked for."""
    if not isinstance(answer, dict):
        raise not_offload(url, f"{what} expected, {type(answer).__name__} given")
    for name, kind in fields.items():
        if not isinstance(answer.get(name), kind):
            raise not_offload(url, f"{what} expected, its {name!r} is {answer.get(name)!r}")
    return answer


def offload_job(url: str, answer: Any) -> dict[str, Any]:
    """`answer` if it is a job as Offload gives one (its id, a known state), else
    `not_offload`: `{"id": 5, "status": "ok"}` is no job to print the id of."""
    job = offload_shaped(url, answer, "a job", **{p.F_ID: str})
    if not p.is_valid_id(job[p.F_ID]):
        raise not_offload(url, f"a job expected, its id is {job[p.F_ID][:40]!r}")
    if job.get(p.F_STATE) not in JOB_STATES:
        raise not_offload(url, f"a job expected, its state is {job.get(p.F_STATE)!r}")
    return job


class Unreachable(Failure):
    def __init__(self, message: str, reason: object = None) -> None:
        super().__init__(EXIT_UNREACHABLE, message)
        self.reason = reason  # why, when no connection was made or no answer came


def _env_file() -> dict[str, str | None]:
    try:
        return trust.env_file_values()  # as the server's
    except trust.UnsafeSettingsFile as exc:  # it could send the token to another's listener
        raise Failure(EXIT_USAGE, f"{exc}. It could send your token to another account's "
                      "server. Run from a folder of your own, or set OFFLOAD_ENV_FILE to a "
                      "file of yours") from None
    except trust.UnreadableSettingsFile as exc:
        raise Failure(EXIT_USAGE, str(exc)) from None


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
    return _checked(url, source), value("OFFLOAD_API_TOKEN")


def _checked(url: str, source: str) -> str:
    """`url` as the server's address, or a Failure that says what is wrong with it."""
    url = url.strip().rstrip("/")
    if "@" in url:  # looked at first, and not shown: however garbled, it may hold a password
        raise Failure(EXIT_USAGE, f"the server's address (from {source}) holds a user or "
                                  "password (an @), which Offload does not take: give the "
                                  "address alone, and the token in OFFLOAD_API_TOKEN (an @ "
                                  "of a path: write it %40)")
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
    return url


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
            if (isinstance(exc, (http.client.BadStatusLine, http.client.LineTooLong))
                    and not isinstance(exc, http.client.RemoteDisconnected)):  # not closed
                said = " ".join(str(exc).split())[:60]  # one line: the other program's words
                raise Failure(EXIT_SERVER, f"what answers at {self.url} does not speak HTTP "
                                           f"(it said {said!r}): is that Offload's "
                                           "address?") from None
            reason = getattr(exc, "reason", None) or exc
            if isinstance(reason, ssl.SSLError) and reason.reason == "WRONG_VERSION_NUMBER":
                raise Failure(EXIT_USAGE, f"{self.url} answers plain HTTP, not HTTPS: give its "
                                          "address with http://") from None
            if isinstance(reason, ssl.SSLCertVerificationError):  # it answers, untrusted
                raise Failure(EXIT_USAGE, f"no secure connection to {self.url}: {reason}. "
                                          "Give the server a certificate this machine trusts "
                                          "(or name its CA in SSL_CERT_FILE)") from None
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
        offloads = isinstance(detail, str)  # Offload's every refusal: JSON with a `detail`
        detail = detail if isinstance(detail, str) else f"HTTP {exc.code} {exc.reason}"
        if exc.headers.get("Retry-After"):  # a person reads no header
            detail = detail.replace("Retry-After seconds", f"{exc.headers['Retry-After']} s")
        code = EXIT_BY_STATUS.get(exc.code, EXIT_SERVER)
        if exc.code == 404 and not detail.startswith(OFFLOADS_404S):  # the address, not a job
            code, detail = EXIT_SERVER, (f"{detail} at {self.url}: is that Offload's address "
                                         "(as http://HOST:PORT, without /api)?")
        elif not offloads:  # another program's page (a 501 for a POST), or a proxy's
            code, detail = EXIT_SERVER, f"{detail} from {self.url}: is it Offload?"
        if exc.code == 401:  # a person gives no header: the setting that makes it
            detail += (" (OFFLOAD_API_TOKEN, from the environment or .env, is not the "
                       "server's token)" if self.token else
                       " (set OFFLOAD_API_TOKEN to the server's token)")
        return Failure(code, detail, exc.code, answer if isinstance(answer, dict) else None)

    def call(self, method: str, path: str, body: Any = None,
             headers: dict[str, str] | None = None, timeout: float = REQUEST_TIMEOUT_S) -> Any:
        with self._open(method, path, body, timeout, headers) as response:
            return self._read_json(response)

    def job(self, method: str, path: str, body: Any = None,
            headers: dict[str, str] | None = None,
            timeout: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
        """`call` for an answer that is one job: checked to be Offload's (`offload_job`)."""
        return offload_job(self.url, self.call(method, path, body, headers, timeout))

    def listed(self, state: Filter, fields: str | None = "summary", kind: Filter = None,
               start: str | None = None) -> Iterator[dict[str, Any]]:
        """Every job (in `state`, of `kind`, submitted before job `start`), newest first,
        page after page: summaries, or whole jobs (`fields="full"`); each once, though
        `pages` may start again from the top."""
        given: set[str] = set()
        for _, page in self.pages(state, fields, kind, start):
            for job in page:
                if job[p.F_ID] not in given:
                    given.add(job[p.F_ID])
                    yield job

    def pages(self, state: Filter, fields: str | None = "summary", kind: Filter = None,
              start: str | None = None) -> Iterator[tuple[str | None, list[dict[str, Any]]]]:
        """The listing's pages (`listed`), each with the `before` it was asked from. The job
        a page ended at, removed or pruned before the next page is asked for (a 400, as
        docs/contract.md says), the next is asked from the oldest job of that page still
        there (the nearest to it), or from the top (`start`) again once none is."""
        cursors: list[str] = []  # where the next page may start, best last
        while True:
            before = cursors[-1] if cursors else start
            try:
                jobs, last = self.listing(state, fields, before, kind=kind, paging=True)
            except Failure as exc:
                if exc.status != 400 or not cursors:  # `start` is the caller's: said
                    raise
                cursors.pop()  # gone: the job before it on the page
                continue
            yield before, jobs
            if not last:
                return
            cursors = [str(job[p.F_ID]) for job in jobs if job[p.F_ID] != last] + [last]

    def listing(self, state: Filter, fields: str | None, before: str | None,
                limit: int | None = LIST_MAX, kind: Filter = None,
                paging: bool = False) -> tuple[list[dict[str, Any]], str | None]:
        """A page of `GET /api/jobs` (`limit` None: the server's default): its jobs, and
        the `before` of the next (None: none). `paging`: the next is to be read too."""
        given = urllib.parse.urlencode({k: v for k, v in (
            ("state", state), ("kind", kind), ("limit", limit), ("fields", fields),
            ("before", before)) if v is not None}, doseq=True)
        page = offload_shaped(self.url, self.call("GET", f"/api/jobs?{given}"), "a listing",
                              jobs=list)
        jobs = [offload_job(self.url, job) for job in page["jobs"]]
        # A server before `next_before` takes the last `state` or `kind` given, quietly.
        if "next_before" not in page and any(isinstance(each, list) and len(set(each)) > 1
                                             for each in (state, kind)):
            raise Failure(EXIT_SERVER, "this server is older: it lists the jobs of one "
                                       "state and one kind at a time; give --state and "
                                       "--kind once each, or upgrade the server")
        # A server before `next_before` gives the top for any `before`, and no next page.
        if "next_before" not in page and (before is not None
                                          or (paging and limit is not None
                                              and len(jobs) >= limit)):
            raise Failure(EXIT_SERVER, f"this server is older: it lists no further than its "
                                       f"newest {LIST_MAX} jobs, and this command needs more; "
                                       "upgrade the server, or see those with offload list "
                                       "(without --before and --all)")
        last = page.get("next_before")
        return jobs, str(last) if last else None

    def text(self, path: str) -> str:
        """A text/plain answer (a job's log), as the API's PlainTextResponse sends it."""
        with self._open("GET", path) as response:
            kind = response.getheader("Content-Type") or ""
            if kind.split(";")[0].strip().lower() != "text/plain":
                raise not_offload(self.url, f"{kind[:40] or 'no Content-Type'} where a log "
                                            "is text/plain")
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
