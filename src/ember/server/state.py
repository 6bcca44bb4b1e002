"""What the routes share, on `app.state.server`: the engine, the served name, the metrics and
the streaming settings. Handlers reach it through their request (`server_state`)."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import HTTPConnection

from ember.engine.async_engine import AsyncLLMEngine
from ember.server.errors import APIError
from ember.server.metrics import ServerMetrics


@dataclass(frozen=True)
class ServerState:
    engine: AsyncLLMEngine
    served_model_name: str
    metrics: ServerMetrics
    send_timeout: float  # seconds a stream may wait on a client that reads nothing

    def check_model(self, name: str | None) -> None:
        """Refuse a request for a model other than the served one (None: the served one)."""
        if name is not None and name != self.served_model_name:
            raise APIError(404, f"The model `{name}` does not exist.", "model_not_found", "model")


def server_state(conn: HTTPConnection) -> ServerState:
    return conn.app.state.server
