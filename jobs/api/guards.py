"""Request guards: the API token, the caller's account, the Host and Origin checks,
another site's page (Fetch Metadata)."""

from __future__ import annotations

import hmac
import json
import re
from urllib.parse import unquote_to_bytes

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobs.api.peer import CLOSED, UNKNOWN, PeerLookup, this_account
from jobs.settings import Settings, host_name, is_loopback

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_PORTS = {"http": ":80", "https": ":443"}
WEB_SCHEMES = {"ws": "http", "wss": "https"}
# Offload registers no service worker: one the browser asks to update here was left by a
# page another program served at this address, and would see every request of the
# dashboard's. Asked for its script (a browser checks it a few seconds after a page it
# controls opens; a 404 leaves it in place), this one takes its place, removes itself and
# reloads the pages it held.
WORKER_REMOVER = b"""\
self.addEventListener("install", () => self.skipWaiting());
self.addEventListener("activate", (event) => event.waitUntil((async () => {
  await self.registration.unregister();
  for (const client of await self.clients.matchAll({ type: "window" })) client.navigate(client.url);
})()));
"""
# The page launch.py opens (`/?opened=...`) empties the browser's cache of this address:
# a page another program served here before Offload ran, cached for long, would be shown
# in its place and read the API as this address's own. Only then: Chromium searches its
# whole disk cache for it, and it empties the cache of every server of this host name.
CLEAR_CACHE = (b"clear-site-data", b'"cache"')
OPENED_BY_LAUNCHER = re.compile(rb"(^|&)opened=")
NO_STORE = (b"cache-control", b"no-store")
# A log or a job's text is never taken for a page or a script, whatever it holds.
NO_SNIFF = (b"x-content-type-options", b"nosniff")
CLOSED_DETAIL = "the connection closed before its account could be told"
UNKNOWN_DETAIL = ("this Offload answers only the account that runs it, and could not tell "
                  "whose this connection is just now (the server is short of file "
                  "descriptors: too many connections open); retry in a moment")
_CONTROL = re.compile("[\x00-\x1f\x7f]")
_ONCE = (b"origin", b"authorization")


# In the scope of a HEAD answered as its GET: a route whose GET never ends by itself (an
# event stream) answers a HEAD with its headers alone.
HEAD_ASKED = "offload.head"


def asked_head(scope: Scope) -> bool:
    return bool(scope.get(HEAD_ASKED))


REFUSAL_HEADERS = {401: [(b"www-authenticate", b"Bearer")], 503: [(b"retry-after", b"1")]}
WRONG_TOKEN = ("missing or wrong API token: send the header 'Authorization: Bearer <token>' "
               "with the server's OFFLOAD_API_TOKEN")


class RequestGuard:
    """On every path (API, page, /docs): without a token only requests that arrive on a
    loopback address from the account that runs the server are answered (403 otherwise;
    the account is known on Linux), and only a Host naming loopback or listed in
    OFFLOAD_ALLOWED_HOSTS, so a rebound DNS name reaches nothing (421); with one, every
    /api/* and /metrics request needs `Authorization: Bearer <token>` (401), checked
    before its body is read. A state-changing request, a call of the API or a WebSocket
    handshake from another site's page is refused (403), and no page shows in its
    frames. A HEAD is answered as its GET (the server leaves out the body). A service
    worker's script, on any path, is WORKER_REMOVER."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.check_host = settings.api_token is None  # with a token, the token protects
        self.token = (settings.api_token.get_secret_value().encode()
                      if settings.api_token is not None else None)
        self.peers = PeerLookup()
        self.owner = this_account()
        self.allowed_hosts = frozenset(settings.allowed_host_list)
        self.origins = frozenset(settings.cors_origin_list)
        self._host_ok: dict[bytes, bool] = {}  # verdicts by Host header, bounded below
        # No page of ours shows in another site's frame, where that site could lure clicks
        # onto its buttons (clickjacking), but in those of OFFLOAD_CORS_ORIGINS, which may
        # change things anyway. X-Frame-Options: for browsers without CSP, which deny all.
        ancestors = " ".join(each for each in settings.cors_origin_list
                             if each not in ("*", "null")) or "'none'"
        self.frame_headers = [(b"content-security-policy", f"frame-ancestors {ancestors}".encode()),
                              (b"x-frame-options", b"DENY"), NO_SNIFF]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope, dict(scope["headers"]))
        if refusal is not None:
            status, detail = refusal
            if scope["type"] == "websocket":
                await _refuse_websocket(scope, send, status, detail)
            else:
                await send_detail(send, status, detail, REFUSAL_HEADERS.get(status))
            return
        if scope["type"] == "websocket":  # no route takes one: routing closes it
            await self.app(scope, receive, send)
            return
        if scope["method"] == "GET" and (b"service-worker", b"script") in scope["headers"]:
            await _send(send, 200, WORKER_REMOVER, b"text/javascript; charset=utf-8",
                        [NO_STORE])
            return
        if scope["method"] == "HEAD":  # a copy: the server still knows it for a HEAD
            # (routes such as /docs take GET only)
            scope = {**scope, "method": "GET", HEAD_ASKED: True}
        if _api_path(scope):  # JSON and event streams: nothing to click
            await self.app(scope, receive, _not_stored(send))
            return

        clear_cache = bool(OPENED_BY_LAUNCHER.search(scope.get("query_string", b"")))

        async def send_page_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", ()), *self.frame_headers]
                if clear_cache and (b"content-type", b"text/html; charset=utf-8") in headers:
                    headers.append(CLEAR_CACHE)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_page_headers)

    def _refusal(self, scope: Scope, headers: dict[bytes, bytes]) -> tuple[int, str] | None:
        """The status and detail a request is refused with, if it is."""
        if _CONTROL.search(scope["path"]):  # `/metrics%0A`: a route's `$` matches before a
            return 400, "the path holds a control character"  # final newline, `==` not
        if not _utf8_path(scope):  # `%FF` was read as U+FFFD: another session's id
            return 400, ("the path is not UTF-8: percent-encode the UTF-8 bytes of each "
                         "character (é is %C3%A9)")
        sent = [name for name, _ in scope["headers"] if name in _ONCE]
        if len(sent) != len(set(sent)):  # this guard reads the last, the framework the first
            return 400, "send at most one Origin and one Authorization header"
        host, origin = headers.get(b"host", b""), headers.get(b"origin")
        refusal = (self._not_the_owner(scope, b"x-forwarded-for" in headers)
                   if self.check_host else None)
        if refusal:
            return (503 if refusal == UNKNOWN_DETAIL else 403), refusal
        if self.check_host and not host_name(host.decode("latin-1")):
            # None (HTTP/1.0 may leave it out), or no name and port: none to allow either.
            said = f" ({host.decode('latin-1')[:100]!r} is no host name and port)" if host else ""
            return 421, ("this server has no OFFLOAD_API_TOKEN, so it answers only requests "
                         f"that name it{said}: send a Host header (Host: 127.0.0.1, "
                         "localhost or [::1], with the port)")
        if self.check_host and not self._host_allowed(host):
            return 421, (
                "this server has no OFFLOAD_API_TOKEN, so it answers only requests for "
                f"localhost, 127.0.0.1 or [::1], not for {host.decode('latin-1')[:100]!r}; "
                "add that name to OFFLOAD_ALLOWED_HOSTS to serve it (or set OFFLOAD_API_TOKEN)")
        refusal = self._from_another_site(scope, headers, host.decode("latin-1"), origin)
        if refusal:
            return 403, refusal
        # A browser's CORS preflight never carries a token: OFFLOAD_CORS_ORIGINS answers it.
        preflight = (scope.get("method") == "OPTIONS" and bool(self.origins) and bool(origin)
                     and b"access-control-request-method" in headers)
        if (self.token is not None and not preflight and _api_path(scope)
                and not self._token_matches(headers.get(b"authorization", b""))):
            return 401, WRONG_TOKEN
        return None

    def _from_another_site(self, scope: Scope, headers: dict[bytes, bytes], host: str,
                           origin: bytes | None) -> str | None:
        """Why a request a browser sent for another site's page is refused, if it is: it
        may change nothing, and it may not call the API (an `<img>` of a long poll or of
        an event stream needs no answer read to hold one of its slots). A page of an
        origin in OFFLOAD_CORS_ORIGINS may; a link to here, followed, may."""
        websocket = scope["type"] == "websocket"  # a handshake is never a CORS request
        changes = websocket or scope["method"] not in SAFE_METHODS
        api = _api_path(scope)
        # `null` (a sandboxed frame, a file:// page) and an empty one are an origin too.
        listed = origin is not None and self._origin_allowed(
            scope["scheme"], host, origin.decode("latin-1"))
        if origin is not None and not listed and (changes or api):
            asked = ("open a WebSocket here" if websocket else
                     "change anything here" if changes else "call this API")
            return (f"refused: a page from {origin.decode('latin-1')[:100]!r} may not "
                    f"{asked}; list its origin in OFFLOAD_CORS_ORIGINS to allow it")
        # Fetch Metadata: what the browser says of the page that asked (no header: no
        # browser, such as curl or the CLI, or one too old to send it).
        site = headers.get(b"sec-fetch-site", b"")
        if site not in (b"cross-site", b"same-site") or listed:
            return None
        # Not one the page asked for ahead (Sec-Purpose: a prefetch, a prerender).
        navigation = (headers.get(b"sec-fetch-mode") == b"navigate"
                      and b"sec-purpose" not in headers)
        # A link followed to a page, or to the API in the window (not in a frame, where a
        # page could hold many unseen); a page's frames are its frame-ancestors' to allow.
        if navigation and not changes and (
                not api or headers.get(b"sec-fetch-dest") == b"document"):
            return None
        return (f"refused: a page of another site (Sec-Fetch-Site: {site.decode()}) may "
                "not call this server; open the dashboard at this server's own address, "
                "call the API from a program (curl, offload), or list that page's origin "
                "in OFFLOAD_CORS_ORIGINS for its fetch() calls")

    def _not_the_owner(self, scope: Scope, forwarded: bool) -> str | None:
        """Why a request is refused for its caller, if it is: without a token only the
        account that runs the server is answered, as every account on the machine can
        reach loopback and chats are their owner's only."""
        server = scope.get("server")
        if server and not is_loopback(str(server[0])):
            # However it was started (uvicorn --host 0.0.0.0, gunicorn -b ...).
            return ("this server has no OFFLOAD_API_TOKEN, so it answers only on 127.0.0.1; "
                    "set OFFLOAD_API_TOKEN to serve others")
        client = scope.get("client")
        if self.owner is None or not server:
            return None
        if not client:  # reset before it was accepted: it has no peer address left
            return CLOSED_DETAIL
        if forwarded:
            # uvicorn puts the address the header names in the place of the connection's
            # own, from loopback: any account could name one of the owner's connections.
            return ("this Offload has no OFFLOAD_API_TOKEN, so it answers only its owner's "
                    "own connections, not requests through a proxy (X-Forwarded-For); set "
                    "OFFLOAD_API_TOKEN to serve through one")
        uid = self.peers.account((str(client[0]), int(client[1])),
                                 (str(server[0]), int(server[1])))
        if uid == CLOSED:  # closed before it was looked up: nobody waits for an answer
            return CLOSED_DETAIL
        if uid == UNKNOWN:
            return UNKNOWN_DETAIL
        if uid is not None and uid != self.owner:
            return ("this Offload answers only the account that runs it, as it has no "
                    "OFFLOAD_API_TOKEN; to share it, its owner sets OFFLOAD_API_TOKEN and "
                    "gives you the token")
        return None

    def _token_matches(self, authorization: bytes) -> bool:
        assert self.token is not None
        scheme, _, value = authorization.partition(b" ")
        # compare_digest: the time taken does not tell how much of the token was right.
        return scheme.lower() == b"bearer" and hmac.compare_digest(value.strip(), self.token)

    def _host_allowed(self, host: bytes) -> bool:
        verdict = self._host_ok.get(host)
        if verdict is None:
            name = host_name(host.decode("latin-1"))
            verdict = bool(name) and (is_loopback(name) or name in self.allowed_hosts)
            if len(self._host_ok) < 256:  # any Host header can be sent: keep the cache small
                self._host_ok[host] = verdict
        return verdict

    def _origin_allowed(self, scheme: str, host: str, origin: str) -> bool:
        origin, host = origin.lower().rstrip("/"), host.lower()
        scheme = WEB_SCHEMES.get(scheme, scheme)  # a WebSocket's page is http(s)
        default = DEFAULT_PORTS.get(scheme, "")
        if default and host.endswith(default):  # a browser's Origin leaves it out
            host = host[:-len(default)]
        return origin == f"{scheme}://{host}" or origin in self.origins or "*" in self.origins


def route_path(scope: Scope) -> str:
    """The path as the app's routes match it: without the `--root-path` uvicorn puts in
    front of it (Starlette's rule)."""
    path, root = str(scope["path"]), str(scope.get("root_path", ""))
    if root and path.startswith(root) and path[len(root):len(root) + 1] in ("", "/"):
        return path[len(root):]
    return path


def _not_stored(send: Send) -> Send:
    """`send`, with answers the browser keeps no copy of: a page brought back by Back
    read a conversation's turns from its cache, without the turns taken since."""

    async def send_not_stored(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [*message.get("headers", ()), NO_SNIFF]
            if not any(name.lower() == b"cache-control" for name, _ in headers):
                headers.append(NO_STORE)
            message = {**message, "headers": headers}
        await send(message)

    return send_not_stored


def _api_path(scope: Scope) -> bool:
    path = route_path(scope)
    return path.startswith("/api/") or path == "/metrics"


async def send_detail(send: Send, status: int, detail: str,
                       headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await _send(send, status, json.dumps({"detail": detail}).encode(), b"application/json",
                headers or [])


async def _refuse_websocket(scope: Scope, send: Send, status: int, detail: str) -> None:
    """A handshake refused as a request would be, where the server can say so (else a
    close before it is accepted, which the server answers with a bare 403)."""
    if "websocket.http.response" not in (scope.get("extensions") or {}):
        await send({"type": "websocket.close", "code": 1008})
        return
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "websocket.http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            *REFUSAL_HEADERS.get(status, [])]})
    await send({"type": "websocket.http.response.body", "body": body})


def _utf8_path(scope: Scope) -> bool:
    try:
        unquote_to_bytes(scope.get("raw_path") or b"").decode("utf-8")
    except UnicodeDecodeError:  # a byte of no character, or half of a surrogate pair
        return False
    return True


async def _send(send: Send, status: int, body: bytes, content_type: bytes,
                headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type),
                            (b"content-length", str(len(body)).encode()), NO_SNIFF,
                            *headers]})
    await send({"type": "http.response.body", "body": body})
