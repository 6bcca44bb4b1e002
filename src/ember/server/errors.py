"""The API's errors: OpenAI's body `{"error": {"message", "type", "param", "code"}}` with the
right status: 400 bad input, 401 bad key, 404 unknown model or path, 405 wrong method, 413
body too large, 429 queue full, 503 engine loading/dead/shutting down, 500 only for bugs.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from ember.engine.async_engine import EngineUnavailableError, RequestFailedError
from ember.errors import EmberError, InvalidRequestError, QueueFullError
from ember.server.metrics import ServerMetrics

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                404: "not_found_error", 429: "rate_limit_error",
                503: "service_unavailable_error", 500: "internal_server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        def text(s: str | None) -> str | None:  # lone surrogates cannot be encoded as UTF-8
            return None if s is None else s.encode("utf-8", "replace").decode("utf-8")

        error_type = _ERROR_TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": text(self.message), "type": error_type,
                          "param": text(self.param), "code": self.code}}


def as_api_error(e: Exception) -> APIError | None:
    """The API error for an exception that is the client's doing or the engine's state."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFullError):
        return APIError(429, str(e), "queue_full")
    if isinstance(e, EngineUnavailableError):
        return APIError(503, str(e), "engine_unavailable")
    if isinstance(e, RequestFailedError):  # the engine logged it; the other requests go on
        return APIError(500, "the engine failed this request; see the server log",
                        "request_failed")
    if isinstance(e, (InvalidRequestError, EmberError)):
        return APIError(400, str(e))
    return None


def internal_error() -> APIError:
    return APIError(500, "internal server error; see the server log")


def error_response(metrics: ServerMetrics, err: APIError,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """`err` as a response, counted in the metrics."""
    metrics.record_error(err.status)
    return JSONResponse(err.body(), status_code=err.status, headers=headers)
