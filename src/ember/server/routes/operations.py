"""For operators: /health (200 once the model serves, else 503 with the reason, never a
traceback) and /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from ember.server.errors import APIError, error_response
from ember.server.protocol import ErrorResponse
from ember.server.state import server_state

router = APIRouter()


@router.get("/health", response_class=Response, responses={
    200: {"description": "ready (no body)"}, 503: {"model": ErrorResponse}})
async def health(raw: Request) -> Response:
    state = server_state(raw)
    engine = state.engine
    if engine.is_ready:
        return Response(status_code=200)
    reason = engine.error or ("shutting down" if engine.wait_ready(0) else "loading")
    return error_response(state.metrics,
                          APIError(503, f"not ready: {reason}", "engine_unavailable"))


@router.get("/metrics", response_class=Response, responses={
    200: {"description": "Prometheus text format",
          "content": {"text/plain": {"schema": {"type": "string"}}}},
    401: {"model": ErrorResponse}})
async def prometheus_metrics(raw: Request) -> Response:
    state = server_state(raw)
    state.metrics.update_engine(state.engine.stats(), state.engine.num_in_flight)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
