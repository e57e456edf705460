"""A small streaming client for OpenAI-compatible chat completions (standard library).

OpenAI, Ollama, LM Studio, vLLM and llama.cpp's server all speak this: POST
`{base_url}/chat/completions` with `"stream": true`, answered by server-sent events
whose `data:` lines carry `choices[0].delta.content`, ending with `data: [DONE]`.
"""

from __future__ import annotations

import http.client
import json
import socket
from urllib.parse import urlsplit

from jobs import protocol as p
from runners.base import RunnerError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 120.0


class Config:
    __slots__ = ("base_url", "api_key", "model")

    def __init__(self, base_url: str, api_key: str | None = None,
                 model: str | None = None) -> None:
        self.base_url = base_url
        self.api_key = api_key  # never printed, never stored
        self.model = model

    def __repr__(self) -> str:
        return f"Config(base_url={self.base_url!r}, model={self.model!r})"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Config:
        base_url = env.get("OPENAI_BASE_URL", "").strip()
        if not base_url:
            raise RunnerError(
                "no LLM server configured: set OPENAI_BASE_URL to an OpenAI-compatible "
                "server (for example http://127.0.0.1:11434/v1 for Ollama)",
                p.ERR_PROVIDER,
            )
        return cls(base_url.rstrip("/"), env.get("OPENAI_API_KEY") or None,
                   env.get("OFFLOAD_LLM_MODEL") or None)


class Reply:
    def __init__(self) -> None:
        self.text = ""
        self.model: str | None = None
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None


def stream_chat(config: Config, messages: list[dict[str, Any]], on_text: Callable[[str], None],
                **options: Any) -> Reply:
    body: dict[str, Any] = {"messages": messages, "stream": True, **options}
    if config.model:
        body["model"] = config.model
    response, conn = _post(config, "/chat/completions", body)
    reply = Reply()
    parts: list[str] = []
    finished = False
    try:
        for event in _events(response):
            if event == "[DONE]":
                finished = True
                break
            try:
                chunk = json.loads(event)
            except ValueError as exc:
                raise RunnerError(f"the LLM server sent malformed data: {event[:80]!r}",
                                  p.ERR_PROVIDER) from exc
            reply.model = chunk.get("model") or reply.model
            reply.usage = chunk.get("usage") or reply.usage
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    parts.append(text)
                    on_text(text)
                reply.finish_reason = choice.get("finish_reason") or reply.finish_reason
    except (OSError, http.client.HTTPException) as exc:
        raise RunnerError(f"the LLM server's stream was cut after {len(parts)} pieces: {exc}",
                          p.ERR_PROVIDER) from exc
    finally:
        conn.close()
    if not finished and reply.finish_reason is None:
        raise RunnerError(f"the LLM server's stream ended before the reply was complete "
                          f"(after {len(parts)} pieces)", p.ERR_PROVIDER)
    reply.text = "".join(parts)
    return reply


def _post(config: Config, path: str,
          body: dict[str, Any]) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
    url = urlsplit(config.base_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise RunnerError(f"OPENAI_BASE_URL is not an http(s) URL: {config.base_url!r}",
                          p.ERR_PROVIDER)
    conn_class: type[http.client.HTTPConnection] = http.client.HTTPConnection
    if url.scheme == "https":
        conn_class = http.client.HTTPSConnection
    conn = conn_class(url.hostname, url.port, timeout=CONNECT_TIMEOUT_S)
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    where = f"{url.scheme}://{url.netloc}"
    try:
        conn.connect()
        if conn.sock is not None:
            conn.sock.settimeout(READ_TIMEOUT_S)
        conn.request("POST", url.path.rstrip("/") + path, json.dumps(body).encode(), headers)
        response = conn.getresponse()
    except (ConnectionRefusedError, socket.gaierror, TimeoutError, OSError) as exc:
        conn.close()
        reason = exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)
        raise RunnerError(f"LLM server not reachable at {where}: {reason}",
                          p.ERR_PROVIDER) from exc
    if response.status != 200:
        detail = response.read(2000).decode("utf-8", errors="replace")
        conn.close()
        if config.api_key:
            detail = detail.replace(config.api_key, "[redacted]")  # some servers echo it
        raise RunnerError(_status_message(response.status, where, detail), p.ERR_PROVIDER)
    return response, conn


def _status_message(status: int, where: str, detail: str) -> str:
    if status in (401, 403):
        return (f"the LLM server at {where} rejected the API key (HTTP {status}); "
                "check OPENAI_API_KEY")
    try:
        message = json.loads(detail).get("error", {})
        message = message.get("message") if isinstance(message, dict) else str(message)
    except (ValueError, AttributeError):
        message = detail.strip()
    return f"the LLM server at {where} answered HTTP {status}: {(message or '')[:300]}"


def _events(response: http.client.HTTPResponse) -> Any:
    """The `data:` payloads of a server-sent event stream."""
    data: list[str] = []
    while True:
        raw = response.readline()
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
