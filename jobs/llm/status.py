"""Which LLM server chats go to, and whether it answers (for /api/health)."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from jobs.protocol import embedded
from jobs.settings import Settings
from runners import llm_client

MAX_ANSWER = 1 << 20  # bytes of a /models answer read; a longer one reads as not JSON


class LLMStatus:
    def __init__(self, settings: Settings) -> None:
        self.data_dir = settings.data_dir
        self.provider = "openai-compatible" if settings.openai_base_url else "embedded"
        key = settings.openai_api_key
        self._server = llm_client.Config(settings.openai_base_url or "",
                                         key.get_secret_value() if key else None)
        self.base_url = self._server.base_url  # without the credentials it may carry
        self.model: str | None = settings.llm_model or None  # None: not known yet
        self.ready = False
        self.detail = "not checked yet"

    @property
    def probe_every_s(self) -> float:
        return 2.0 if self.provider == "embedded" else 15.0

    def now(self) -> dict[str, Any]:
        """`as_dict`, the embedded model's state read afresh (a small local file, not a
        request): the last probe's said "ready" for up to 2 s after its server died.
        Blocking, so call it from a worker thread."""
        if self.provider == "embedded":
            return {"provider": self.provider, **self._embedded()}
        return self.as_dict()

    def probe(self) -> bool:
        """Blocking, so call it from a worker thread. The embedded model: what the
        supervisor running it wrote; another server: GET {base_url}/models."""
        if self.provider == "embedded":
            state = self._embedded()
            self.base_url, self.model, self.ready, self.detail = (
                state["base_url"], state["model"], state["ready"], state["detail"])
            return self.ready
        if not self.base_url:
            self.ready, self.detail = False, "no LLM server configured or started"
            return False
        try:
            request = urllib.request.Request(f"{_ascii_host(self.base_url)}/models",
                                             headers=self._server.headers())
            with _NO_REDIRECTS.open(request, timeout=3) as response:
                body = response.read(MAX_ANSWER)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc  # URLError wraps the socket error
            reason = getattr(reason, "strerror", None) or reason
            # The server's own words may quote the key it was sent.
            self.ready, self.detail = False, self._server.redact(
                f"not reachable at {self.base_url}: {reason}")
            return False
        models = _models(body)
        if not isinstance(models, list):
            self.ready, self.detail = False, self._server.redact(
                f"the LLM server answered /models with {models}, not "
                '{"data": [...]}; is OPENAI_BASE_URL an OpenAI-compatible API (ending in /v1)?')
            return False
        if not self.model and models and isinstance(models[0], dict):
            # The server's own words, as an error's: a model's name that quotes the key it
            # was sent (an echoing proxy, a misconfigured gateway) goes to /api/health and
            # `offload status` without it.
            self.model = self._server.model_named(str(models[0].get("id", ""))) or None
        self.ready, self.detail = True, "ok"
        return True

    def _embedded(self) -> dict[str, Any]:
        """The embedded model's state, as the supervisor running it wrote it, read whole
        (health and metrics read it from threads beside the timer's probe)."""
        status = embedded.read_status(str(self.data_dir)) or {}
        return {"base_url": str(status.get("base_url") or ""),
                "model": str(status.get("model") or "") or None,
                "ready": bool(status.get("ready")),
                "detail": str(status.get("detail") or "the supervisor is starting")}

    def as_dict(self) -> dict[str, Any]:
        return {"provider": self.provider, "base_url": self.base_url, "model": self.model,
                "ready": self.ready, "detail": self.detail}


def _ascii_host(url: str) -> str:
    """`url` with its host in IDNA (`xn--...`), as a chat's client sends it: urllib puts the
    host in the Host header as it is, and one beyond Latin-1 failed every probe."""
    parts = urllib.parse.urlsplit(url)
    if parts.netloc.isascii():
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.encode("idna").decode()))


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """urllib would follow a redirect with the key in its headers, to any host."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> urllib.request.Request | None:
        raise urllib.error.HTTPError(
            req.full_url, code, f"redirected to {newurl[:200]} (not followed, with the key "
            "in its headers); set OPENAI_BASE_URL to where the server is", headers, fp)


_NO_REDIRECTS = urllib.request.build_opener(_RefuseRedirects)


def _models(body: bytes) -> list[Any] | str:
    """The model list of a /models answer, or what the answer was instead."""
    try:
        answer = json.loads(body)
    except ValueError:  # UnicodeDecodeError too
        return "something that is not JSON"
    if isinstance(answer, dict):
        models = answer.get("data")
        return models if isinstance(models, list) else 'a JSON object without a "data" list'
    names = {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return f"a JSON {names.get(type(answer), 'null')}"
