"""A small client for OpenAI-compatible chat completions (standard library only).

OpenAI, Ollama, LM Studio, vLLM and llama.cpp's server all speak this: POST
`{base_url}/chat/completions` with `"stream": true`, answered by server-sent events
whose `data:` lines carry `choices[0].delta.content`, ending with `data: [DONE]`.
A server that does not stream gets the same request without `stream`.

Every failure becomes a `RunnerError` whose message says what happened and what to
do; the API key is never part of one, nor are credentials in the URL
(`https://user:password@host/v1`), which are sent as HTTP Basic authentication.
"""

from __future__ import annotations

import base64
import encodings.idna  # noqa: F401 (a host's codec: loaded once, in the fork server)
import http.client
import json
import math
import re
import select
import socket
import time
from urllib.parse import quote, unquote, urlsplit

from jobs import protocol as p
from jobs.protocol.urls import USERINFO_HELP, misplaced_userinfo, public_url, usable_key
from runners.base import RunnerError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping
    from typing import Any

CONNECT_TIMEOUT_S = 10.0
FIRST_TOKEN_TIMEOUT_S = 60.0  # from request sent to the first piece of the reply
ANSWER_WAIT_SLICE_S = 0.25  # a stop raised meanwhile is handled within this (_answer_awaited)
STALL_TIMEOUT_S = 60.0  # between two pieces of a streaming reply
RETRIES = 3  # for 429 and 5xx answers
RETRY_BASE_S = 1.0
# How servers word a refusal of a field they do not know (here `stream_options`).
UNKNOWN_FIELD_WORDS = ("stream_options", "include_usage", "unknown", "unrecognized",
                       "extra", "not permitted", "unexpected")
RETRY_MAX_S = 30.0
# A refusal about the prompt's length, in the servers' words (llama-server's "exceeds the
# available context size", llama-cpp-python's and vLLM's "maximum context length"):
# the only one an empty stream's probe keeps.
PROMPT_LENGTH_WORDS = ("context length", "context_length", "context size", "context window",
                       "prompt is too long", "too many tokens")
LOADING_RETRY_S = 1.0  # a server still loading its model (503): asked again this often
MIN_SECRET_PART = 6  # a key cut off in a message is redacted from this many characters
MIN_KEY_IN_NAME = 8  # shorter ("ollama"), a key is no secret to cut out of a model's name


class Config:
    __slots__ = ("base_url", "api_key", "model", "first_token_s", "setting", "_secret",
                 "_basic")

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None,
                 first_token_s: float = FIRST_TOKEN_TIMEOUT_S, setting: str | None = None
                 ) -> None:
        self.base_url = public_url(base_url).rstrip("/")  # shown in progress and errors
        self.setting = setting  # the setting that names the server, where one does
        self.api_key = api_key  # never printed, never stored
        self.model = model
        self.first_token_s = first_token_s
        self._secret, self._basic = _userinfo(base_url)

    def headers(self) -> dict[str, str]:
        """The API key as a bearer token, else the URL's user and password (HTTP Basic)."""
        if self.api_key:
            return {"Authorization": f"Bearer {self.api_key}"}
        return {"Authorization": f"Basic {self._basic}"} if self._basic else {}

    def redact(self, text: str) -> str:
        """`text` without the key, the URL's password or their Basic form, as they are or
        JSON-escaped (a body that could not be decoded, cut short), also where it ends
        partway into one (a body read only in part; quoted, as a repr shows it)."""
        for secret in (self.api_key, self._secret, self._basic):
            for form in _written_forms(secret):
                text = text.replace(form, "[redacted]")
                body = text.rstrip("'\"")
                for n in range(len(form) - 1, MIN_SECRET_PART - 1, -1):
                    if body.endswith(form[:n]):
                        text = body[:-n] + "[redacted]" + text[len(body):]
                        break
        return text

    def model_named(self, name: str) -> str:
        """A model's name as the server gave it, redacted only where a key of ours shows in
        it whole: not a short one (any key does for Ollama), nor a cut-off part, which
        would mangle names ("x" in "mixtral-8x7b")."""
        for secret in (self.api_key, self._secret, self._basic):
            if secret and len(secret) >= MIN_KEY_IN_NAME and any(
                    form in name for form in _written_forms(secret)):
                return self.redact(name)
        return name

    def __repr__(self) -> str:
        return f"Config(base_url={self.base_url!r}, model={self.model!r})"

    @classmethod
    def from_env(cls, env: Mapping[str, str], base_url: str | None = None) -> Config:
        url = (base_url or env.get("OPENAI_BASE_URL", "")).strip()
        if not url:
            raise RunnerError(
                "no LLM server configured: set OPENAI_BASE_URL to an OpenAI-compatible "
                "server (for example http://127.0.0.1:11434/v1 for Ollama), or start "
                "Offload with the embedded model", p.ErrorType.PROVIDER)
        if misplaced_userinfo(url):
            raise RunnerError(USERINFO_HELP, p.ErrorType.PROVIDER)
        try:  # a runner by hand takes it from the environment as it is
            key = usable_key(env.get("OPENAI_API_KEY"))
        except ValueError as exc:
            raise RunnerError(str(exc), p.ErrorType.PROVIDER) from None
        first = env.get("OFFLOAD_LLM_FIRST_TOKEN_S")
        return cls(url, key, env.get("OFFLOAD_LLM_MODEL") or None,
                   float(first) if first else FIRST_TOKEN_TIMEOUT_S,
                   None if base_url else "OPENAI_BASE_URL")


def _written_forms(secret: str | None) -> list[str]:
    """A secret as a server may send it back: as it is, escaped in JSON ("/" as "\\/",
    each character as \\uXXXX), percent-encoded or in base64, the longest first."""
    if not secret:
        return []
    quoted = quote(secret, safe="")
    forms = {secret, json.dumps(secret)[1:-1], secret.replace("/", "\\/"),
             "".join(f"\\u{ord(c):04x}" for c in secret), quoted,
             re.sub(r"%[0-9A-F]{2}", lambda escape: escape.group().lower(), quoted),
             base64.b64encode(secret.encode()).decode(), *_in_base64(secret)}
    return sorted(forms, key=len, reverse=True)


def _in_base64(secret: str) -> list[str]:
    """The secret's base64 wherever it stands in a longer text encoded whole (`user:key`,
    `Bearer key`): at each of the 3 offsets, less the characters its neighbours share."""
    raw, forms = secret.encode(), []
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + raw).decode().rstrip("=")
        shared_end = 1 if (shift + len(raw)) % 3 else 0
        form = encoded[(shift * 4 + 2) // 3:len(encoded) - shared_end]
        if len(form) >= MIN_SECRET_PART:  # a shorter one is in any text (a 1-character key's: "")
            forms.append(form)
    return forms


def _userinfo(url: str) -> tuple[str | None, str | None]:
    """The secret in `url`'s `user:password@` (the password, else a user that is a token)
    and the pair in base64, for HTTP Basic; (None, None) without one."""
    try:
        parts = urlsplit(url)
        user, password = unquote(parts.username or ""), unquote(parts.password or "")
    except ValueError:
        return None, None
    if not user and not password:
        return None, None
    return password or user, base64.b64encode(f"{user}:{password}".encode()).decode()


class Reply:
    def __init__(self) -> None:
        self.text = ""
        self.model: str | None = None
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None  # see `usage`
        self.streamed = True
        self.pieces = 0  # content pieces streamed: about one token each
        self.first_at: float | None = None  # time.monotonic() of the first piece
        self.last_at: float | None = None  # and of the last


class EmptyStream(RunnerError):
    """A stream that ended with no piece of a reply and no end to it: llama-cpp-python's
    server so answers a prompt longer than its model's context, which it names only to a
    request that does not stream."""


def _fail(message: str, transient: bool = False) -> RunnerError:
    """`transient`: the server refused, failed or stalled; another attempt may succeed."""
    return RunnerError(message, p.ErrorType.PROVIDER, transient)


def chat(config: Config, messages: list[dict[str, Any]], on_text: Callable[[str], None],
         **options: Any) -> Reply:
    """One chat completion, streamed into `on_text` when the server streams; its
    `usage` as `usage` says."""
    body: dict[str, Any] = {"messages": messages, "stream": True,
                            "stream_options": {"include_usage": True}, **options}
    if config.model:
        body["model"] = config.model
    try:
        try:
            reply = _ask(config, body, on_text)
        except EmptyStream as exc:
            raise _refusal_unstreamed(config, body) or exc from None
    except RunnerError as exc:
        # Every message goes through here, decoded (a key sent back JSON-escaped is
        # plain text only now): whatever the server echoed of the key, it is not kept.
        raise RunnerError(config.redact(exc.message), exc.error_type, exc.transient) from None
    reply.usage = usage(reply, reply.usage, messages)
    return reply


def _ask(config: Config, body: dict[str, Any], on_text: Callable[[str], None]) -> Reply:
    response, conn = _request_with_retries(config, body)
    try:
        if "text/event-stream" not in (response.getheader("Content-Type") or ""):
            return _whole(response, on_text)  # a server that ignored "stream"
        return _stream(config, response, on_text)
    finally:
        conn.close()


def _refusal_unstreamed(config: Config, body: dict[str, Any]) -> RunnerError | None:
    """The server's refusal of `body` asked again without streaming (a prompt too long for
    its context: the tokens it counted); None if it takes it, or refuses it for another
    reason (its `max_tokens`, a request that does not stream): then the empty stream is
    all there is to tell. For one token: a server that takes it makes no reply to pay for
    and throw away."""
    plain = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    plain["max_tokens"] = 1
    try:
        _, conn = _request_with_retries(config, plain)
    except RunnerError as exc:
        said = exc.message.lower()
        about_length = any(word in said for word in PROMPT_LENGTH_WORDS)
        return exc if about_length and not exc.transient else None
    conn.close()
    return None


def usage(reply: Reply, reported: Any, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """`prompt_tokens`, `completion_tokens` and `tokens_per_s` (decoding: the tokens after
    the first over the time from the first to the last). The server's counts when it
    reports them; else `counted`: the pieces streamed, the prompt estimated."""
    reported = reported if isinstance(reported, dict) else {}
    prompt, completion = reported.get("prompt_tokens"), reported.get("completion_tokens")
    counted = not (isinstance(prompt, int) and isinstance(completion, int))
    if counted:
        prompt = sum(estimate_tokens(str(m.get("content") or "")) + MESSAGE_TOKENS
                     for m in messages)
        completion = reply.pieces if reply.streamed else estimate_tokens(reply.text)
    rate = None
    if (reply.first_at is not None and reply.last_at is not None
            and reply.last_at > reply.first_at and completion > 1):
        rate = round((completion - 1) / (reply.last_at - reply.first_at), 1)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "tokens_per_s": rate,
            "counted": counted}


MESSAGE_TOKENS = 4  # a chat template's own tokens around each message


def estimate_tokens(text: str) -> int:
    """About four characters a token in Latin script, one in the others (CJK above all)."""
    wide = sum(1 for c in text if ord(c) > 0x24F)
    return math.ceil((len(text) - wide) / 4) + wide


def _request_with_retries(config: Config, body: dict[str, Any]
                          ) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
    attempt = 0
    started = time.monotonic()
    while True:
        attempt += 1
        conn = _connect(config)
        response = _send(config, conn, body)
        status = response.status
        if status == 200:
            return response, conn
        detail = config.redact(response.read(4000).decode("utf-8", errors="replace"))
        retry_after = response.getheader("Retry-After")
        conn.close()
        said = detail.lower()
        if status in (400, 422) and "stream_options" in body and any(
                word in said for word in UNKNOWN_FIELD_WORDS):
            # A server that refuses fields it does not know: the usage is counted instead.
            body = {k: v for k, v in body.items() if k != "stream_options"}
            continue
        if status in (400, 422) and body.get("stream") and "stream" in said:
            body = {k: v for k, v in body.items()  # it cannot stream
                    if k not in ("stream", "stream_options")}
            continue
        if status == 503 and "loading" in said:
            # llama-server's "Loading model": it answers once loaded, which a larger model
            # takes longer than three tries; waited for as for a first token.
            waited = time.monotonic() - started
            if waited < config.first_token_s:
                pause = max(LOADING_RETRY_S, _backoff(1, retry_after) if retry_after else 0.0)
                time.sleep(min(pause, config.first_token_s - waited))  # never a busy loop
                continue
            raise _fail(f"the LLM server at {config.base_url} was still loading its model "
                        f"after {waited:.0f} s (HTTP 503); try again in a moment "
                        "(OFFLOAD_LLM_FIRST_TOKEN_S sets how long a chat waits)", transient=True)
        if (status == 429 or status >= 500) and attempt < RETRIES:
            time.sleep(_backoff(attempt, retry_after))
            continue
        raise _fail(_status_message(config, status, detail, attempt),
                    transient=status == 429 or status >= 500)


def _backoff(attempt: int, retry_after: str | None) -> float:
    if retry_after:
        try:
            return min(RETRY_MAX_S, max(0.0, float(retry_after)))
        except ValueError:
            pass  # an HTTP date: fall back to our own backoff
    return float(min(RETRY_MAX_S, RETRY_BASE_S * 2.0 ** (attempt - 1)))


def _connect(config: Config) -> http.client.HTTPConnection:
    url = urlsplit(config.base_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise _fail(f"OPENAI_BASE_URL is not an http(s) URL: {config.base_url!r}")
    conn_class: type[http.client.HTTPConnection] = http.client.HTTPConnection
    if url.scheme == "https":
        conn_class = http.client.HTTPSConnection
    conn = conn_class(url.hostname, url.port, timeout=CONNECT_TIMEOUT_S)
    try:
        conn.connect()
    except OSError as exc:
        conn.close()
        named = f" ({config.setting})" if config.setting else ""
        raise _fail(f"LLM server not reachable at {config.base_url}{named}: {_reason(exc)}",
                    transient=True) from exc
    return conn


def _send(config: Config, conn: http.client.HTTPConnection,
          body: dict[str, Any]) -> http.client.HTTPResponse:
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream",
               **config.headers()}
    path = urlsplit(config.base_url).path.rstrip("/") + "/chat/completions"
    try:
        if conn.sock is not None:
            conn.sock.settimeout(config.first_token_s)
        conn.request("POST", path, json.dumps(body).encode(), headers)
        if conn.sock is not None:
            _answer_awaited(conn.sock, config.first_token_s)
        return conn.getresponse()
    except TimeoutError as exc:
        conn.close()
        raise _fail(f"the LLM server at {config.base_url} sent nothing within "
                    f"{config.first_token_s:g} s; it may be overloaded or still loading "
                    "its model (OFFLOAD_LLM_FIRST_TOKEN_S sets this limit)",
                    transient=True) from exc
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        raise _fail(f"the LLM server at {config.base_url} closed the connection before "
                    f"answering: {_reason(exc)}", transient=True) from exc
    except BaseException:  # a stop while it waits
        conn.close()
        raise


def _answer_awaited(sock: socket.socket, seconds: float) -> None:
    """Returns once the server's answer starts; TimeoutError after `seconds`. Waited for
    in slices: a stop raised from another thread (Windows' stop watch and deadline timer)
    runs in this one only between two, where one read would hold it until the first
    token (a long prompt: the supervisor killed the runner after the grace)."""
    deadline = time.monotonic() + seconds
    while not select.select([sock], [], [], min(ANSWER_WAIT_SLICE_S, seconds))[0]:
        if time.monotonic() >= deadline:
            raise TimeoutError


def _stream(config: Config, response: http.client.HTTPResponse,
            on_text: Callable[[str], None]) -> Reply:
    reply = Reply()
    parts: list[str] = []
    held = ""  # a character's first surrogate half, sent as a JSON escape: its second comes next
    finished = False
    try:
        for event in _events(response, _in_time(config, reply, parts)):
            if event == "[DONE]":
                finished = True
                break
            chunk = _parse(event)
            if "error" in chunk:
                raise _fail(f"the LLM server reported an error mid-reply: "
                            f"{config.redact(_error_text(chunk['error']))[:300]}", transient=True)
            reply.model = chunk.get("model") or reply.model
            reply.usage = chunk.get("usage") or reply.usage
            for choice in chunk.get("choices") or []:
                if not isinstance(choice, dict):
                    continue
                text, held = _held_back(held + _text_of(choice.get("delta")))
                if text:
                    if not parts and response.fp is not None:
                        _set_timeout(response, STALL_TIMEOUT_S)
                    reply.last_at = time.monotonic()
                    reply.first_at = reply.first_at or reply.last_at
                    parts.append(text)
                    on_text(text)
                reply.finish_reason = choice.get("finish_reason") or reply.finish_reason
    except TimeoutError as exc:
        if not parts:
            raise _fail(f"no first token from the LLM server at {config.base_url} within "
                        f"{config.first_token_s:g} s (OFFLOAD_LLM_FIRST_TOKEN_S sets this "
                        "limit)", transient=True) from exc
        raise _fail(f"the LLM server stopped sending for {STALL_TIMEOUT_S:g} s after "
                    f"{len(parts)} pieces", transient=True) from exc
    except (OSError, http.client.HTTPException) as exc:
        raise _fail(f"the LLM server's stream was cut after {len(parts)} pieces "
                    f"({_reason(exc)})", transient=True) from exc
    if not finished and reply.finish_reason is None:
        ended = EmptyStream if not parts else RunnerError
        raise ended(f"the LLM server's stream ended before the reply was complete (after "
                    f"{len(parts)} pieces)", p.ErrorType.PROVIDER, transient=True)
    tail = p.readable(held)  # a first half never followed by its second: U+FFFD, or none
    on_text(tail)
    reply.text = "".join(parts) + tail
    reply.pieces = len(parts)
    return reply


def _held_back(text: str) -> tuple[str, str]:
    """`text` readable, less a last character's first surrogate half: its second half
    comes in the next piece."""
    held = text[-1] if text and "\ud800" <= text[-1] <= "\udbff" else ""
    return p.readable(text[:len(text) - len(held)]), held


def _text_of(message: object) -> str:
    """The text of a message or a stream's delta: its content, a string, or the text of
    its parts (`[{"type": "text", "text": ...}]`, as some servers send it); else none."""
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):
        return "".join(part["text"] for part in content
                       if isinstance(part, dict) and isinstance(part.get("text"), str))
    return content if isinstance(content, str) else ""


def _whole(response: http.client.HTTPResponse, on_text: Callable[[str], None]) -> Reply:
    """The non-streaming answer: one JSON chat completion."""
    try:
        data = _parse(response.read().decode("utf-8", errors="replace"))
        choice = (data.get("choices") or [{}])[0]
        text = p.readable(_text_of(choice.get("message")))
    except (OSError, http.client.HTTPException, AttributeError, IndexError) as exc:
        raise _fail(f"the LLM server's answer could not be read: {_reason(exc)}") from exc
    reply = Reply()
    reply.streamed = False
    reply.text = text
    reply.model = data.get("model")
    reply.usage = data.get("usage")
    reply.finish_reason = choice.get("finish_reason")
    if text:
        on_text(text)
    return reply


def _parse(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise _fail(f"the LLM server sent malformed data (not JSON): {text[:80]!r}") from exc
    if not isinstance(data, dict):
        raise _fail(f"the LLM server sent malformed data (not a JSON object): {text[:80]!r}")
    return data


def _in_time(config: Config, reply: Reply, parts: list[str]) -> Callable[[], None]:
    """What raises TimeoutError once the first piece is late, or the next one: the
    limits on the clock, not only on the socket, as a server's comments (sent while it is
    busy) would keep a silent reply going."""
    started = time.monotonic()

    def in_time() -> None:
        now = time.monotonic()
        if (now - started > config.first_token_s if not parts
                else now - (reply.last_at or started) > STALL_TIMEOUT_S):
            raise TimeoutError

    return in_time


def _events(response: http.client.HTTPResponse, in_time: Callable[[], None]
            ) -> Iterator[str]:
    """The `data:` payloads of a server-sent event stream; `in_time()` after each line
    raises TimeoutError when the reply is too slow."""
    data: list[str] = []
    while True:
        raw = response.readline()
        in_time()
        if not raw:
            if data:
                yield "\n".join(data)
            return
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
        elif not line.startswith((":", "event:", "id:", "retry:")):
            raise _fail(f"the LLM server sent malformed server-sent events: {line[:80]!r}")


def _set_timeout(response: http.client.HTTPResponse, seconds: float) -> None:
    sock = getattr(getattr(response.fp, "raw", None), "_sock", None)
    if isinstance(sock, socket.socket):
        sock.settimeout(seconds)


def list_models(config: Config) -> list[str]:
    """The model ids the server offers (empty when it will not say)."""
    try:
        conn = _connect(config)
    except RunnerError:
        return []
    try:
        conn.request("GET", urlsplit(config.base_url).path.rstrip("/") + "/models",
                     headers=config.headers())
        response = conn.getresponse()
        if response.status != 200:
            return []
        data = json.loads(response.read())
        return [str(m.get("id")) for m in data.get("data", []) if isinstance(m, dict)]
    except (OSError, ValueError, AttributeError, http.client.HTTPException):
        return []
    finally:
        conn.close()


def _status_message(config: Config, status: int, detail: str, attempts: int) -> str:
    where = config.base_url
    if status in (401, 403):
        return (f"the LLM server at {where} rejected the API key (HTTP {status}); "
                "check OPENAI_API_KEY (or the user and password in OPENAI_BASE_URL)")
    text = config.redact(_error_text(_json_error(detail) or detail.strip()))[:300]
    if status == 404:
        offered = list_models(config) if config.model else []
        if config.model and (config.model in text or (offered and config.model not in offered)):
            hint = f"; it offers: {', '.join(offered[:10])}" if offered else ""
            return (f"the LLM server at {where} does not know the model {config.model!r} "
                    f"(HTTP 404){hint}; set OFFLOAD_LLM_MODEL to one it has")
        # Not the model: the address (Ollama answers "404 page not found" without /v1).
        return (f"the LLM server at {where} has no chat API there (HTTP 404: {text}); "
                "OPENAI_BASE_URL is the API's address, which usually ends in /v1 (e.g. "
                "http://127.0.0.1:11434/v1)")
    if status == 429 or status >= 500:
        kind = "is overloaded" if status == 429 else "failed"
        return (f"the LLM server at {where} {kind} (HTTP {status}) on {attempts} attempts: "
                f"{text}; try again later")
    return f"the LLM server at {where} refused the request (HTTP {status}): {text}"


def _json_error(detail: str) -> Any:
    try:
        data = json.loads(detail)
    except ValueError:
        return None
    return data.get("error", data.get("detail")) if isinstance(data, dict) else None


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the server running?)"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
