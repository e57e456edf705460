"""Request guards: the API token and the body size limit."""

from __future__ import annotations

import hmac
import json
from typing import Any

from fastapi import HTTPException, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobs.settings import Settings, is_loopback


async def require_token(request: Request) -> None:
    """With OFFLOAD_API_TOKEN set, every /api/* call needs `Authorization: Bearer <token>`."""
    settings: Settings = request.app.state.settings
    if settings.api_token is None:
        server = request.scope.get("server")
        if server and not is_loopback(str(server[0])):
            # However it was started (uvicorn --host 0.0.0.0, gunicorn -b ...), without a
            # token it answers only on loopback.
            raise HTTPException(403, "this server has no OFFLOAD_API_TOKEN, so it answers "
                                     "only on 127.0.0.1; set OFFLOAD_API_TOKEN to serve others")
        return
    expected = settings.api_token.get_secret_value().encode()
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    # compare_digest: the time taken does not tell how much of the token was right.
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), expected):
        raise HTTPException(
            401, "missing or wrong API token: send the header "
                 "'Authorization: Bearer <token>' with the server's OFFLOAD_API_TOKEN",
            headers={"WWW-Authenticate": "Bearer"})


def _declared_length(scope: Scope) -> int:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


class _TooLarge(HTTPException):
    # An HTTPException, so FastAPI's body parsing passes it on as it is (a 413).
    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, _too_large(max_bytes))


def _too_large(max_bytes: int) -> str:
    return f"request body too large: at most {max_bytes} bytes; send less"


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413, whether or not they declare a length."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _declared_length(scope) > self.max_bytes:
            await self._refuse(send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge(self.max_bytes)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body: dict[str, Any] = {"detail": _too_large(self.max_bytes)}
        payload = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
