"""The server's middleware in process, without a model (the engine is never started): a body
is read only by the routes that take one; a request elsewhere (a GET, an open path, a wrong
method) is answered without reading a byte of its body, however much the client sends."""

from __future__ import annotations

import asyncio
import json

import pytest

from ember.config import DEFAULT_MAX_BODY_BYTES
from ember.engine.async_engine import AsyncLLMEngine
from ember.server import build_app

KEY = "sk-middleware-test"


class EndlessBody:
    """An ASGI `receive` whose client sends body chunks forever; counts what was read."""

    def __init__(self, chunk: bytes = b"x" * 65536) -> None:
        self.chunk = chunk
        self.bytes_read = 0

    async def __call__(self) -> dict:
        self.bytes_read += len(self.chunk)
        return {"type": "http.request", "body": self.chunk, "more_body": True}


def call(app, method: str, path: str, receive, headers: dict[str, str] | None = None
         ) -> tuple[int, bytes]:
    """One request through the ASGI app: its status and body."""
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": b"", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], body


@pytest.fixture(scope="module")
def app():
    return build_app(AsyncLLMEngine(lambda: None), "m", [KEY], metrics_require_key=True)


AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.mark.parametrize("method, path, headers, status", [
    ("GET", "/health", {}, 503),  # open; 503: the model is not loaded
    ("GET", "/", {}, 200),  # the chat page: open
    ("GET", "/metrics", AUTH, 200),
    ("GET", "/v1/models", AUTH, 200),
    ("POST", "/health", {}, 405),  # an open path, the wrong method
    ("GET", "/v1/completions", AUTH, 405),  # a body route, the wrong method
    ("POST", "/v1/no/such/path", AUTH, 404),
])
def test_a_body_where_none_belongs_is_not_read(app, method, path, headers, status):
    body = EndlessBody()
    code, _ = call(app, method, path, body, {"Transfer-Encoding": "chunked", **headers})
    assert code == status
    assert body.bytes_read == 0


def test_a_declared_body_over_the_limit_on_a_get_is_not_refused(app):
    # Nothing is read: the declared length does not matter.
    too_long = {"Content-Length": str(DEFAULT_MAX_BODY_BYTES + 1), **AUTH}
    assert call(app, "GET", "/metrics", EndlessBody(), too_long)[0] == 200


def test_the_routes_that_take_a_body_read_it_up_to_the_limit(app):
    body = EndlessBody()
    code, reply = call(app, "POST", "/v1/completions", body, AUTH)
    assert code == 413 and json.loads(reply)["error"]["code"] == "request_too_large"
    assert DEFAULT_MAX_BODY_BYTES < body.bytes_read <= DEFAULT_MAX_BODY_BYTES + 65536


def test_no_key_no_body_read(app):
    body = EndlessBody()
    code, reply = call(app, "POST", "/v1/completions", body)
    assert code == 401 and json.loads(reply)["error"]["code"] == "invalid_api_key"
    assert body.bytes_read == 0
