"""A scripted OpenAI-compatible server, for what a real one will not do on demand:
record what it was sent, answer errors, retry-later, hang, cut or garble a stream."""

from __future__ import annotations

import json
import os
import threading
import time
from http.server import ThreadingHTTPServer
from typing import Any

from tests.http_fake import JSONHandler, ScriptedServer


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # a burst of 50 chats connects at once
    fake: FakeLLM


KNOWN_FIELDS = frozenset({"messages", "model", "stream", "max_tokens", "temperature"})


class _Handler(JSONHandler):
    server: _Server
    _body: dict[str, Any]

    def do_GET(self) -> None:
        fake = self.server.fake
        if not self._authorized():
            return
        if not self.path.endswith("/models"):
            self._json(404, {"error": {"message": "no such route"}})
            return
        self._json(200, {"object": "list", "data": [
            {"id": m, "object": "model"} for m in fake.models]})

    def do_POST(self) -> None:
        fake = self.server.fake
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        fake.requests.append({"path": self.path, "headers": dict(self.headers),
                              "body": body})
        self._body = body
        fake.request_times.append(time.monotonic())
        fake.request_wall.append(time.time())
        if not self._authorized():
            return
        failing = fake.status != 200 and (
            fake.fail_times is None or len(fake.requests) <= fake.fail_times)
        if failing:
            headers = {"Retry-After": fake.retry_after} if fake.retry_after else {}
            self._json(fake.status, fake.error_body.encode(), headers)
            return
        if fake.known_model and body.get("model") != fake.known_model:
            self._json(404, {"error": {"message": f"model {body.get('model')} "
                                                  "not found"}})
            return
        if fake.rejects_stream and body.get("stream"):
            self._json(400, {"error": {"message": "stream is not supported"}})
            return
        if fake.streaming_only and not body.get("stream"):
            self._json(400, {"error": {"message": "stream must be true: only streaming is "
                                                  "supported"}})
            return
        if fake.refuses_max_tokens and "max_tokens" in body:
            self._json(400, {"error": {"message": "Unsupported parameter: 'max_tokens' is not "
                                                  "supported with this model. Use "
                                                  "'max_completion_tokens' instead."}})
            return
        unknown = set(body) - KNOWN_FIELDS
        if fake.strict and unknown:
            self._json(400, {"error": {"message": f"unknown fields: {sorted(unknown)}"}})
            return
        time.sleep(fake.hang_s)
        if fake.non_streaming or not body.get("stream"):
            self._json(200, {"model": "fake-model", "choices": [{
                "message": {"role": "assistant", "content": "".join(fake.pieces)},
                "finish_reason": "stop"}]})
            return
        self._stream()

    def _authorized(self) -> bool:
        fake = self.server.fake
        if fake.auth is None or self.headers.get("Authorization") == fake.auth:
            return True
        self._json(401, {"error": {"message": "missing or wrong credentials"}})
        return False

    def _stream(self) -> None:
        fake = self.server.fake
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        until = time.monotonic() + fake.keepalive_s
        while time.monotonic() < until:  # comments only, as some servers send while busy
            self.wfile.write(b": keep-alive\n\n")
            self.wfile.flush()
            time.sleep(0.5)
        for i, piece in enumerate(fake.pieces):
            if fake.cut_after is not None and i == fake.cut_after and (
                    fake.cut_times is None or fake.cuts < fake.cut_times):
                fake.cuts += 1
                self.wfile.flush()
                self.connection.shutdown(2)  # cut midway: no [DONE]
                return
            if fake.malformed == "json" and i == 1:
                self.wfile.write(b"data: {\"choices\": [oops\n\n")
                continue
            if fake.malformed == "sse" and i == 1:
                self.wfile.write(b"this is not server-sent events\n\n")
                continue
            if fake.stream_error is not None and i == 1:
                self.wfile.write(f"data: {fake.stream_error}\n\n".encode())
                self.wfile.flush()
                self.close_connection = True
                return
            chunk = {"model": "fake-model", "choices": [{"delta": {"content": piece}}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
            if i == 0:
                fake.first_piece_sent.append(time.time())
                last = (self._body.get("messages") or [{}])[-1].get("content") or ""
                if fake.gated is not None and fake.gated in last:
                    fake.gate.wait(60)
            if i < len(fake.pieces) - 1:
                time.sleep(fake.delay_s)
        done = {"model": "fake-model", "choices": [{"delta": {}, "finish_reason": "stop"}]}
        fake.last_piece_sent.append(time.time())
        self.wfile.write(f"data: {json.dumps(done)}\n\n".encode())
        if fake.usage is not None and (self._body.get("stream_options") or {}).get(
                "include_usage"):
            usage = {"model": "fake-model", "choices": [], "usage": fake.usage}
            self.wfile.write(f"data: {json.dumps(usage)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self.close_connection = True


class FakeLLM(ScriptedServer):
    def __init__(self, pieces: list[str] | None = None, delay_s: float = 0.05,
                 status: int = 200, error_body: str = "", port: int = 0,
                 fail_times: int | None = None, retry_after: str | None = None,
                 cut_after: int | None = None, malformed: str | None = None,
                 hang_s: float = 0.0, keepalive_s: float = 0.0, non_streaming: bool = False,
                 rejects_stream: bool = False, models: list[str] | None = None,
                 known_model: str | None = None, auth: str | None = None,
                 usage: dict[str, int] | None = None, strict: bool = False,
                 gated: str | None = None, stream_error: str | None = None,
                 refuses_max_tokens: bool = False, streaming_only: bool = False,
                 cut_times: int | None = None) -> None:
        self.pieces = pieces or ["Hello", ", ", "world", "."]
        self.delay_s = delay_s
        self.status = status
        self.error_body = error_body
        self.fail_times = fail_times  # None: the error status every time
        self.retry_after = retry_after
        self.cut_after = cut_after
        self.cut_times = cut_times  # None: every stream cut (with cut_after); else the first n
        self.cuts = 0
        self.malformed = malformed  # "json" or "sse"
        self.hang_s = hang_s
        self.keepalive_s = keepalive_s  # then comments alone this long before the first piece
        self.non_streaming = non_streaming
        self.rejects_stream = rejects_stream
        self.models = models or ["fake-model"]
        self.known_model = known_model
        self.auth = auth  # the Authorization header every request must carry, else 401
        self.usage = usage  # sent after the reply when the request asks for it
        self.strict = strict  # a 400 for any field beyond KNOWN_FIELDS
        # A reply to a last message containing `gated` stops after its first piece until
        # `gate` is set.
        self.gated = gated
        self.stream_error = stream_error  # an event sent in place of the second piece
        self.refuses_max_tokens = refuses_max_tokens  # as OpenAI's reasoning models do
        self.streaming_only = streaming_only  # a 400 for a request that does not stream
        self.gate = threading.Event()
        self.requests: list[dict[str, Any]] = []
        self.request_times: list[float] = []
        self.first_piece_sent: list[float] = []  # time.time() of each stream's first piece
        self.last_piece_sent: list[float] = []
        self.request_wall: list[float] = []
        super().__init__(_Server(("127.0.0.1", port), _Handler))

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def main() -> None:
    """`python -m tests.fake_llm --port P`: serve until killed (benchmarks use it)."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pieces", type=int, default=40)
    parser.add_argument("--delay", type=float, default=0.1)
    parser.add_argument("--nice", type=int, default=0)
    args = parser.parse_args()
    if args.nice and hasattr(os, "nice"):
        os.nice(args.nice)
    fake = FakeLLM(pieces=["tok "] * args.pieces, delay_s=args.delay, port=args.port)
    fake.server.serve_forever()


if __name__ == "__main__":
    main()
