"""ASGI middleware against hostile or broken clients: the API key first, then the body.

`KeyCheck` refuses a request without a valid key before anything of its body is read.
`BodyLimit` reads a body only for the routes that take one (the API's POSTs), up to a limit;
every other request (a GET, an open path such as /health, a wrong method) reaches the app
with its body unread and invisible: no route reads it, and uvicorn discards what the client
sends once the response is out, holding at most its read buffer meanwhile. So a body sent
where none belongs costs no memory, however large or slow.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Collection, Sequence

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ember.server.errors import APIError, error_response
from ember.server.metrics import ServerMetrics


class KeyCheck:
    """Every path but `open_paths` needs `Authorization: Bearer <key>`.

    The given key is hashed and compared with the hash of every key, with no early exit
    (`hmac.compare_digest` on equal-length digests): the time taken tells nothing about the
    keys. Keys are never logged.
    """

    def __init__(self, app: ASGIApp, keys: Sequence[str], open_paths: Collection[str],
                 metrics: ServerMetrics) -> None:
        self.app = app
        self.digests = [hashlib.sha256(k.encode()).digest() for k in keys]
        self.open_paths = open_paths
        self.metrics = metrics

    def authorized(self, scope: Scope) -> bool:
        scheme, _, given = Headers(scope=scope).get("authorization", "").partition(" ")
        digest = hashlib.sha256(given.strip().encode()).digest()
        ok = False
        for d in self.digests:
            ok |= hmac.compare_digest(digest, d)
        return ok and scheme.lower() == "bearer"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope["path"] not in self.open_paths
                and not self.authorized(scope)):
            err = APIError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                           "invalid_api_key")
            response = error_response(self.metrics, err, {"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """For a request to one of `body_routes` ((method, path) pairs): read its body, up to
    `max_bytes` (else 413), then hand it on. A declared Content-Length over the limit is
    refused before anything is read. Any other request is handed on with no body."""

    def __init__(self, app: ASGIApp, max_bytes: int, body_routes: Collection[tuple[str, str]],
                 metrics: ServerMetrics) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.body_routes = body_routes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
        elif (scope["method"], scope["path"]) not in self.body_routes:
            await self.app(scope, _without_body(receive), send)
        else:
            await self.read_body(scope, receive, send)

    async def read_body(self, scope: Scope, receive: Receive, send: Send) -> None:
        too_large = APIError(413, f"the request body is larger than {self.max_bytes} bytes",
                             "request_too_large")
        close = {"Connection": "close"}  # the rest of the body is left unread
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(self.metrics, too_large, close)(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left while sending
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await error_response(self.metrics, too_large, close)(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        pending: list[Message] = [{"type": "http.request", "body": bytes(body),
                                   "more_body": False}]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)


def _without_body(receive: Receive) -> Receive:
    """`receive` as the app sees it for a request that takes no body: an empty body first,
    then only what is not body (the client's disconnect); body chunks are dropped unseen."""
    started = False

    async def no_body() -> Message:
        nonlocal started
        if not started:
            started = True
            return {"type": "http.request", "body": b"", "more_body": False}
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return message

    return no_body
