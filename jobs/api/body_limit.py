"""The request body limit: a body over it is a 413, whether or not it declares its
length."""

from __future__ import annotations

import asyncio

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobs.api.guards import send_detail

# A body over the limit is read and dropped, up to this many times the limit and for up
# to DRAIN_S, before the 413: a client that reads no answer before its body is sent
# (urllib, Python's requests) heard a broken pipe instead. A larger one is cut off.
DRAIN_FACTOR = 16
DRAIN_S = 5.0
# Once an answer is given, the rest of a body sent in chunks is read only while it comes:
# a client that stalls is not waited for.
DRAIN_IDLE_S = 0.25


def _declared_length(scope: Scope) -> int:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


class _TooLarge(HTTPException):
    # An HTTPException, so FastAPI's body parsing passes it on as it is (a 413). `whole`:
    # the body was read to its end, so the connection may serve the next request.
    def __init__(self, max_bytes: int, whole: bool) -> None:
        super().__init__(413, _too_large(max_bytes), None if whole else CLOSE)
        self.whole = whole


CLOSE = {"Connection": "close"}
CLOSE_HEADER = (b"connection", b"close")


async def _drained(receive: Receive, budget: int, idle_s: float | None = None) -> bool:
    """The rest of a request's body read and dropped: True if it ended within `budget`
    bytes and DRAIN_S (and with `idle_s`, no pause longer than that)."""
    async def drain() -> bool:
        left = budget
        while left >= 0:
            message = await asyncio.wait_for(receive(), idle_s)
            if message["type"] != "http.request":  # the client left
                return False
            left -= len(message.get("body", b""))
            if not message.get("more_body"):
                return True
        return False

    try:
        return await asyncio.wait_for(drain(), DRAIN_S)
    except TimeoutError:
        return False


def _sends_in_chunks(scope: Scope) -> bool:
    return any(name == b"transfer-encoding" for name, _ in scope.get("headers", []))


def _expects_continue(scope: Scope) -> bool:
    """The client sends its body only once told to (curl, for a large file): no need."""
    return any(name == b"expect" and value.lower() == b"100-continue"
               for name, value in scope.get("headers", []))


def _too_large(max_bytes: int) -> str:
    return (f"request body too large: at most {max_bytes} bytes; send a smaller input, or "
            "a batch of fewer jobs")


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413, whether or not they declare a length."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        if declared > self.max_bytes:
            whole = (not _expects_continue(scope) and declared <= DRAIN_FACTOR * self.max_bytes
                     and await _drained(receive, declared))
            await self._refuse(send, whole)
            return
        request = _CountedBody(receive, send, self.max_bytes, scope, declared)
        try:
            await self.app(scope, request.receive, request.send)
        except _TooLarge as exc:
            if not request.started:
                await self._refuse(send, exc.whole)

    async def _refuse(self, send: Send, whole: bool) -> None:
        await send_detail(send, 413, _too_large(self.max_bytes),
                           None if whole else [CLOSE_HEADER])


class _CountedBody:
    """One request's body, counted as the app reads it, and its answer, watched."""

    def __init__(self, receive: Receive, send: Send, max_bytes: int, scope: Scope,
                 declared: int) -> None:
        self._receive, self._send, self._max_bytes = receive, send, max_bytes
        self.received = 0
        # The server reads the rest of a body of a declared length after the answer, if
        # the app did not (it is no longer than the limit); one sent in chunks may not end.
        self.chunked = not declared and _sends_in_chunks(scope)
        self.body_read = not (declared or self.chunked)  # to its end
        self.started = False  # the answer
        self.given_up = False  # on reading the rest of the body
        # Whether its client sends the body: one waiting for "100 Continue" is told so
        # only by a read before the answer starts.
        self.body_comes = not _expects_continue(scope)

    async def receive(self) -> Message:
        message = await self._read()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self._max_bytes:
                whole = self.body_read or await self._drain()
                if not self.started:
                    raise _TooLarge(self._max_bytes, whole)
                # Too late for a 413 (an event stream, a file: they read only to hear their
                # client leave). Read to its end and dropped, the body is done with: the
                # answer goes on, and its connection closes after it. Else the answer ends
                # here, as when its client leaves.
                if whole:
                    await asyncio.Event().wait()
                return {"type": "http.disconnect"}
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            if self.chunked and not self.body_read:  # read after it, it may never end
                message = {**message, "headers": [*message.get("headers", ()), CLOSE_HEADER]}
        elif message["type"] == "http.response.body" and self.chunked and self.body_comes \
                and not (self.body_read or self.given_up or message.get("more_body")):
            # Its connection closes after this: a socket closed with data unread resets the
            # connection, and the client loses what it had not read of the answer.
            await self._drain(DRAIN_IDLE_S)
        await self._send(message)

    async def _read(self) -> Message:
        self.body_comes |= not self.started
        message = await self._receive()
        if message["type"] == "http.request" and not message.get("more_body"):
            self.body_read = True
        return message

    async def _drain(self, idle_s: float | None = None) -> bool:
        whole = await _drained(self._read, DRAIN_FACTOR * self._max_bytes, idle_s)
        self.given_up = not whole  # a body without end is waited for once
        return whole
