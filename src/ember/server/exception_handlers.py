"""The app's exception handlers: whatever a route raises leaves as OpenAI's error body with
its status (errors.py), counted in the metrics; a bug is logged and answers 500."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ember.engine.async_engine import EngineUnavailableError, RequestFailedError
from ember.errors import EmberError
from ember.server.errors import APIError, as_api_error, error_response, internal_error
from ember.server.state import server_state

logger = logging.getLogger("ember.server")

MAX_REPORTED_ERRORS = 5  # validation errors listed in one message


def _respond(request: Request, err: APIError,
             headers: dict[str, str] | None = None) -> JSONResponse:
    return error_response(server_state(request).metrics, err, headers)


async def on_known_error(request: Request, e: Exception) -> JSONResponse:
    """The client's doing or the engine's state (`as_api_error`)."""
    err = as_api_error(e)
    assert err is not None
    # A full queue drains as requests finish: tell clients when to come back.
    return _respond(request, err, {"Retry-After": "1"} if err.status == 429 else None)


async def on_invalid(request: Request, e: RequestValidationError) -> JSONResponse:
    """pydantic's errors as one 400 (not FastAPI's 422), naming the first parameter."""
    parts, param = [], None
    errors = e.errors()
    for err in errors[:MAX_REPORTED_ERRORS]:
        if err.get("type") == "json_invalid":
            return _respond(request, APIError(400, "the request body is not valid JSON"))
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        param = param or loc or None
        msg = err.get("msg")
        if err.get("type") == "extra_forbidden":  # no field is silently ignored
            parts.append(f"unsupported parameter: {loc}")
        elif loc:
            parts.append(f"{loc}: {msg}")
        elif err.get("type") == "value_error":  # a check across fields
            parts.append(str(msg).removeprefix("Value error, "))
        else:
            parts.append(f"the request body must be a JSON object: {msg}")
    if len(errors) > MAX_REPORTED_ERRORS:
        parts.append(f"and {len(errors) - MAX_REPORTED_ERRORS} more errors")
    return _respond(request, APIError(400, "; ".join(parts) or "invalid request", None, param))


async def on_http(request: Request, e: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (404 no such path, 405 wrong method, a body FastAPI cannot
    parse) in OpenAI's shape."""
    message = str(e.detail)
    if isinstance(e.__cause__, UnicodeDecodeError):  # from FastAPI's JSON parsing
        message = "the request body is not valid UTF-8"
    elif isinstance(e.__cause__, RecursionError):
        message = "the request body's JSON is nested too deeply"
    return _respond(request, APIError(e.status_code, message), e.headers)  # 405: Allow


async def on_bug(request: Request, e: Exception) -> JSONResponse:
    logger.exception("internal error")
    return _respond(request, internal_error())


def add_exception_handlers(app: FastAPI) -> None:
    for known in (APIError, EmberError, EngineUnavailableError, RequestFailedError):
        app.add_exception_handler(known, on_known_error)
    app.add_exception_handler(RequestValidationError, on_invalid)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, on_bug)
