"""A scripted OpenAI-compatible server, for what a real one will not do on demand:
record the headers it was sent, answer an error, stream slowly."""

from __future__ import annotations

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # a burst of 50 chats connects at once


class FakeLLM:
    def __init__(self, pieces: list[str] | None = None, delay_s: float = 0.05,
                 status: int = 200, error_body: str = "", port: int = 0) -> None:
        self.pieces = pieces or ["Hello", ", ", "world", "."]
        self.delay_s = delay_s
        self.status = status
        self.error_body = error_body
        self.requests: list[dict[str, Any]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                payload = json.dumps({"object": "list", "data": [
                    {"id": "fake-model", "object": "model"}]}).encode()
                self.send_response(200 if self.path.endswith("/models") else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                fake.requests.append({"path": self.path, "headers": dict(self.headers),
                                      "body": body})
                if fake.status != 200:
                    payload = fake.error_body.encode()
                    self.send_response(fake.status)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for piece in fake.pieces:
                    chunk = {"model": "fake", "choices": [{"delta": {"content": piece}}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                    time.sleep(fake.delay_s)
                done = {"model": "fake", "choices": [{"delta": {}, "finish_reason": "stop"}]}
                self.wfile.write(f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n".encode())

        self.server = _Server(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> FakeLLM:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


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
