"""The OpenAI-compatible HTTP API over an AsyncLLMEngine: `build_app` assembles it.

- routes/: the endpoints (completions, models, tokenization, operations), page.py the chat
  page; what they share is a `ServerState` on `app.state.server` (state.py);
- middleware.py: the API key (checked in constant time, before the body is read), then the
  body, read only where a route takes one and up to `max_body_bytes`;
- exception_handlers.py: every error leaves in OpenAI's shape with its status (errors.py);
- openapi.py: /openapi.json describes every status and body, streams included, so that it
  can be fuzzed;
- streams.py: a request whose client goes away, or stops reading a stream for
  `send_timeout` seconds, is aborted.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute

from ember import __version__
from ember.config import DEFAULT_MAX_BODY_BYTES, DEFAULT_SEND_TIMEOUT
from ember.engine.async_engine import AsyncLLMEngine
from ember.server.exception_handlers import add_exception_handlers
from ember.server.metrics import ServerMetrics
from ember.server.middleware import BodyLimit, KeyCheck
from ember.server.openapi import install_openapi
from ember.server.page import PAGE_PATHS, add_page
from ember.server.routes import generation, models, operations, tokenization
from ember.server.state import ServerState


def build_app(
    engine: AsyncLLMEngine, served_model_name: str, api_keys: Sequence[str] = (), *,
    metrics_require_key: bool = False, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    send_timeout: float = DEFAULT_SEND_TIMEOUT,
) -> FastAPI:
    """The FastAPI app. Starting and stopping `engine` is the caller's job (see launch.py).

    With `api_keys`, every path but /health, the chat page's static files (page.py) and
    /metrics (unless `metrics_require_key`) needs one of them.
    """
    metrics = ServerMetrics(served_model_name)
    app = FastAPI(title="ember", version=__version__,
                  description="OpenAI-compatible LLM inference server")
    app.state.server = ServerState(engine, served_model_name, metrics, send_timeout)
    add_exception_handlers(app)

    routers = (generation.router, models.router, tokenization.router, operations.router)
    for router in routers:
        app.include_router(router)
    add_page(app)

    # Middleware runs last added first: the key, then the body.
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, body_routes=_body_routes(routers),
                       metrics=metrics)
    open_paths = {"/health", *PAGE_PATHS}  # the page is static: its API calls need the key
    if not metrics_require_key:
        open_paths.add("/metrics")
    if api_keys:
        app.add_middleware(KeyCheck, keys=api_keys, open_paths=open_paths, metrics=metrics)

    install_openapi(app, open_paths if api_keys else None)
    return app


def _body_routes(routers: Sequence[APIRouter]) -> set[tuple[str, str]]:
    """(method, path) of every route that reads a request body."""
    return {(method, route.path) for router in routers for route in router.routes
            if isinstance(route, APIRoute) and route.body_field is not None
            for method in route.methods}
