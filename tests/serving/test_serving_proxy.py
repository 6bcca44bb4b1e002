"""ember.serving.proxy without Ray: the routing text of a request, and one request run through
an ASGI app in-process, streams and disconnects included."""

from __future__ import annotations

import asyncio
import contextlib
import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ember.serving.proxy import ForwardedRequest, routing_text, run_asgi


def test_routing_text_of_chat_and_completions():
    chat = {"messages": [{"role": "system", "content": "You are terse."},
                         {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}
    assert routing_text("/v1/chat/completions", json.dumps(chat).encode()) == "You are terse.Hi"
    assert routing_text("/v1/completions", b'{"prompt": "Once upon"}') == "Once upon"
    assert routing_text("/v1/completions", b'{"prompt": ["Once upon"]}') == "Once upon"
    assert routing_text("/v1/completions", b'{"prompt": [1, 2, 3]}') == "1 2 3"
    # anything else goes by load alone
    assert routing_text("/v1/completions", b"not json") == ""
    assert routing_text("/v1/completions", b"[1, 2]") == ""
    assert routing_text("/tokenize", b'{"prompt": "x"}') == ""
    get = ForwardedRequest.create("GET", "/v1/models", b"", [], b"", None)
    assert get.prompt == ""


async def _echo(request: Request) -> JSONResponse:
    return JSONResponse({"body": (await request.body()).decode(), "q": request.url.query,
                         "auth": request.headers.get("authorization")}, status_code=201)


def _app(events: list[str]) -> Starlette:
    async def stream(request: Request) -> StreamingResponse:
        async def chunks():
            try:
                for i in range(1000):
                    yield f"data: {i}\n\n"
                    await asyncio.sleep(0)
            finally:
                events.append("closed")

        return StreamingResponse(chunks(), media_type="text/event-stream")

    async def wait_for_disconnect(request: Request) -> JSONResponse:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        events.append("disconnect seen")
        return JSONResponse({})

    return Starlette(routes=[Route("/echo", _echo, methods=["POST"]),
                             Route("/stream", stream), Route("/wait", wait_for_disconnect)])


def test_a_request_and_its_response_travel_whole():
    async def main():
        req = ForwardedRequest.create("POST", "/echo", b"x=1", [(b"authorization", b"Bearer k")],
                                      b"hello", ("127.0.0.1", 5))
        return [m async for m in run_asgi(_app([]), req)]

    start, body = asyncio.run(main())
    assert start["type"] == "http.response.start" and start["status"] == 201
    assert json.loads(body["body"]) == {"body": "hello", "q": "x=1", "auth": "Bearer k"}


def test_closing_the_stream_early_is_a_disconnect():
    events: list[str] = []

    async def main():
        app = _app(events)
        gen = run_asgi(app, ForwardedRequest.create("GET", "/stream", b"", [], b"", None))
        start = await anext(gen)
        first = await anext(gen)
        await gen.aclose()  # the client left after one chunk
        waiting = run_asgi(app, ForwardedRequest.create("GET", "/wait", b"", [], b"", None))
        task = asyncio.ensure_future(anext(waiting))
        await asyncio.sleep(0.05)
        assert not task.done()  # the app waits for the client...
        task.cancel()  # ...which leaves (Ray cancels the replica's generator): the app is told
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return start, first

    start, first = asyncio.run(main())
    assert start["status"] == 200 and first["body"] == b"data: 0\n\n"
    assert sorted(events) == ["closed", "disconnect seen"]  # both apps saw the client go
