"""The OpenAPI document (/openapi.json) says what the server does, so that it can be fuzzed:
every status and body a route answers (`ERROR_RESPONSES`, `generation_responses`: event
streams included), the bearer scheme, and token ids bounded by the vocabulary."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from ember.server.protocol import (
    TOKEN_ID_MARK, ChatCompletionChunk, CompletionStreamResponse, ErrorResponse,
)
from ember.server.state import ServerState

_ERROR_STATUSES = (400, 401, 404, 413, 429, 500, 503)
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in _ERROR_STATUSES
}


def _ref(model: type) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _event_schema(chunk: type) -> dict[str, Any]:
    """One server-sent event of a stream: a JSON chunk, an error, or the final [DONE]."""
    return {"type": "object", "required": ["data"], "properties": {
        "event": {"type": "string"},
        "data": {"anyOf": [
            {"const": "[DONE]"},
            {"type": "string", "contentMediaType": "application/json",
             "contentSchema": {"anyOf": [_ref(chunk), _ref(ErrorResponse)]}},
        ]},
    }}


def generation_responses(model: type, chunk: type) -> dict[int | str, dict[str, Any]]:
    """A completion route's responses: `model`, or a stream of `chunk`s; the errors."""
    return {200: {"model": model, "description": "the response, or with `stream: true` "
                  "server-sent events (one JSON chunk each, then `[DONE]`)",
                  "content": {"text/event-stream": {"schema": _event_schema(chunk)}}},
            **ERROR_RESPONSES}


def install_openapi(app: FastAPI, open_paths: Collection[str] | None) -> None:
    """Serve `openapi_schema` as the app's document; `open_paths`: the paths that need no
    key, None when the server has no keys."""
    app.openapi = lambda: openapi_schema(app, open_paths)  # type: ignore[method-assign]


def openapi_schema(app: FastAPI, open_paths: Collection[str] | None) -> dict[str, Any]:
    """FastAPI's schema, made to say what the server does.

    - validation errors answer 400 (declared), not FastAPI's 422;
    - the stream chunks and errors that event streams carry are in the components;
    - with API keys, every operation but the open ones declares the bearer scheme;
    - once the model is loaded, token ids are bounded by the vocabulary (cached from then).
    """
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version,
                         description=app.description, routes=app.routes)
    components = schema.setdefault("components", {})
    models = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        models.pop(name, None)
    for model in (ChatCompletionChunk, CompletionStreamResponse, ErrorResponse):
        definition = model.model_json_schema(ref_template="#/components/schemas/{model}",
                                             mode="serialization")
        for name, sub in definition.pop("$defs", {}).items():
            models.setdefault(name, sub)
        models.setdefault(model.__name__, definition)
    if open_paths is not None:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, operations in schema["paths"].items():
        for op in operations.values():
            op.get("responses", {}).pop("422", None)
            if open_paths is not None and path not in open_paths:
                op["security"] = [{"bearer": []}]
    state: ServerState = app.state.server
    engine = state.engine
    if not engine.is_ready:
        return schema  # not cached: the vocabulary is not known yet
    top = engine.vocab_size - 1
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get(TOKEN_ID_MARK):
                node["maximum"] = top
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    app.openapi_schema = schema
    return schema
