"""Responses that end with their client: a request is aborted when its client goes away
(`until_disconnect`) or, streaming, stops reading (`EventStream`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask
from starlette.types import Message, Send

logger = logging.getLogger("ember.server")
T = TypeVar("T")


class ClientGone(Exception):
    pass


async def until_disconnect(raw: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (which aborts its request) if the client goes away
    (then raise ClientGone)."""

    async def disconnected() -> None:
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler is cancelled itself
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ClientGone()
    return task.result()


class _ClientStalled(Exception):
    pass


class EventStream(StreamingResponse):
    """Server-sent events whose client must keep reading: a send that waits more than
    `send_timeout` seconds for the client (the socket's buffers are full) ends the response:
    the request is aborted and the connection closed (uvicorn logs that the response was not
    completed). Either way the body is closed, which aborts an unfinished request; on a
    disconnect Starlette cancels the body, which closes it too."""

    def __init__(self, body: AsyncIterator[str], request_id: str, send_timeout: float,
                 headers: dict[str, str]) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", **headers},
                         background=BackgroundTask(body.aclose))  # type: ignore[attr-defined]
        self.request_id = request_id
        self.send_timeout = send_timeout

    async def stream_response(self, send: Send) -> None:
        async def timed_send(message: Message) -> None:
            try:
                async with asyncio.timeout(self.send_timeout):
                    await send(message)
            except TimeoutError:
                raise _ClientStalled() from None

        try:
            await super().stream_response(timed_send)
        except _ClientStalled:
            logger.warning("request %s: the client accepted no data for %.1f s; aborting the "
                           "request and closing the connection", self.request_id,
                           self.send_timeout)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
