"""What the scripted servers share: a quiet HTTP/1.1 handler that answers JSON or a page."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

S = TypeVar("S", bound="ScriptedServer")


class JSONHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None,
              ) -> None:
        """`payload` as JSON; bytes and str are sent as they are."""
        if isinstance(payload, str):
            payload = payload.encode()
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self._answer(status, body, "application/json", headers)

    def _html(self, page: str) -> None:
        """`page` as a 200 HTML page: another site's, or another program's."""
        self._answer(200, page.encode(), "text/html", None)

    def _answer(self, status: int, body: bytes, content_type: str,
                headers: dict[str, str] | None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


class ScriptedServer:
    """A scripted server on a loopback port, served from a thread: `with` starts and
    stops it. Its handler reaches it as `self.server.fake`."""

    def __init__(self, server: ThreadingHTTPServer) -> None:
        self.server = server
        server.fake = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def __enter__(self: S) -> S:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
