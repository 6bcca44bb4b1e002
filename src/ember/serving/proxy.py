"""An HTTP request carried to a replica's ember app, and its response carried back.

Each replica runs the whole single-engine app (`ember.server.app.build_app`: the same routes,
validation, errors, auth, metrics and streams), called in-process through ASGI. The ingress
only forwards: it reads the body, names the text that routing keys on, and relays the
replica's ASGI messages (the response start, then the body chunks) to its client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message

# The ASGI messages of a response that can leave before the client has read the last one: a
# small bound, so that a replica's app feels a slow client (ember's --send-timeout) as it would
# directly.
MAX_PENDING_MESSAGES = 16


@dataclass
class ForwardedRequest:
    """One HTTP request, as the ingress received it. `prompt` is what the prefix-aware router
    matches replicas on (Ray Serve's PrefixCacheAffinityRouter reads an argument's `prompt`)."""

    method: str
    path: str
    query_string: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    client: tuple[str, int] | None = None
    prompt: str = ""

    @classmethod
    def create(cls, method: str, path: str, query_string: bytes,
               headers: list[tuple[bytes, bytes]], body: bytes,
               client: tuple[str, int] | None) -> "ForwardedRequest":
        return cls(method, path, query_string, headers, body, client,
                   routing_text(path, body) if method == "POST" else "")


def routing_text(path: str, body: bytes) -> str:
    """The text a generation request's prompt starts with, for routing by shared prefixes:
    the chat messages' contents in order (roles and template markers would make every
    conversation look alike), or a completion's prompt. "" for anything else: routing then
    goes by load alone."""
    if path not in ("/v1/chat/completions", "/v1/completions"):
        return ""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return ""  # the replica answers 400
    if not isinstance(data, dict):
        return ""
    if path == "/v1/chat/completions":
        messages = data.get("messages")
        if not isinstance(messages, list):
            return ""
        return "".join(_text(m.get("content")) for m in messages if isinstance(m, dict))
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return " ".join(map(str, prompt))  # token ids: a shared id prefix is a shared prefix
    return prompt if isinstance(prompt, str) else ""


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content
                       if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


async def run_asgi(app: ASGIApp, req: ForwardedRequest) -> AsyncIterator[Message]:
    """Call `app` with `req`; yield its `http.response.start` and `http.response.body`
    messages as it sends them. Closing the iterator early is the client disconnecting: the app
    sees `http.disconnect` (ember then aborts the request and frees its KV blocks)."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
        "method": req.method, "scheme": "http", "path": req.path,
        "raw_path": req.path.encode(), "query_string": req.query_string, "root_path": "",
        "headers": req.headers, "client": req.client, "server": None,
    }
    sent: asyncio.Queue[Message | None] = asyncio.Queue(MAX_PENDING_MESSAGES)
    gone = asyncio.Event()
    body_given = False

    async def receive() -> Message:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if gone.is_set():
            raise OSError("the client has disconnected")  # as a server's send would
        await sent.put(message)

    async def call() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await sent.put(None)

    task = asyncio.ensure_future(call())
    try:
        while (message := await sent.get()) is not None:
            yield message
            if message["type"] == "http.response.body" and not message.get("more_body"):
                break
        else:
            task.result()  # the app ended without a response: its error, if it raised
    finally:
        gone.set()
        while not sent.empty():  # unblock a send waiting for room
            sent.get_nowait()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=30)
