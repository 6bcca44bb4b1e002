"""The OpenAI-compatible HTTP API over an AsyncLLMEngine.

Every error leaves as OpenAI's body `{"error": {"message", "type", "param", "code"}}` with the
right status: 400 bad input (pydantic's 422 included), 401 bad key, 404 unknown model or path,
405 wrong method, 413 body too large, 429 queue full, 503 engine loading/dead/shutting down,
500 only for bugs (logged).

Against hostile or broken clients: the API key is checked (in constant time) before the body
is read; a body is read up to `max_body_bytes`; a request holds one pending output however
slowly its client reads (async_engine._Stream), and a stream whose client accepts nothing for
`send_timeout` seconds is dropped, its request aborted. The OpenAPI schema (/openapi.json)
describes every status and body, streams included, so that it can be fuzzed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.background import BackgroundTask
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ember import __version__
from ember.config import DEFAULT_MAX_BODY_BYTES, DEFAULT_SEND_TIMEOUT
from ember.engine.async_engine import AsyncLLMEngine, EngineUnavailableError, RequestFailedError
from ember.engine.input_processor import ProcessedRequest
from ember.errors import EmberError, InvalidRequestError, QueueFullError
from ember.outputs import RequestOutput, merge_outputs
from ember.sampling_params import StructuredOutputsParams
from ember.server import tools
from ember.server.cost import cost_comment, cost_headers
from ember.server.metrics import RequestProgress, ServerMetrics
from ember.server.page import PAGE_PATHS, add_page
from ember.server.protocol import (
    TOKEN_ID_MARK, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
    CompletionRequest, CompletionResponse, CompletionStreamResponse, DetokenizeRequest,
    DetokenizeResponse, ErrorResponse, ModelCard, ModelList, NamedToolChoice, TokenizeChatRequest,
    TokenizeCompletionRequest, TokenizeResponse,
)
from ember.server.serving import ResponseBuilder, sse
from ember.server.tools import ToolPlan

logger = logging.getLogger("ember.server")
T = TypeVar("T")

MAX_REPORTED_ERRORS = 5  # validation errors listed in one message

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


def _as_api_error(e: Exception) -> APIError | None:
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


Reject = Callable[[APIError, dict[str, str] | None], Response]


class _KeyCheck:
    """ASGI middleware: every path but `open_paths` needs `Authorization: Bearer <key>`.

    It runs before the body is read. The given key is hashed and compared with the hash of
    every key, with no early exit (`hmac.compare_digest` on equal-length digests): the time
    taken tells nothing about the keys. Keys are never logged.
    """

    def __init__(self, app: ASGIApp, keys: Sequence[str], open_paths: set[str],
                 reject: Reject) -> None:
        self.app = app
        self.digests = [hashlib.sha256(k.encode()).digest() for k in keys]
        self.open_paths = open_paths
        self.reject = reject

    def authorized(self, scope: Scope) -> bool:
        scheme, _, given = Headers(scope=scope).get("authorization", "").partition(" ")
        digest = hashlib.sha256(given.strip().encode()).digest()
        ok = False
        for d in self.digests:
            ok |= hmac.compare_digest(digest, d)
        return ok and scheme.lower() == "bearer"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope["path"] not in self.open_paths
                and not self.authorized(scope)):
            err = APIError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                           "invalid_api_key")
            await self.reject(err, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        await self.app(scope, receive, send)


class _BodyLimit:
    """ASGI middleware: read the request body, up to `max_bytes` (else 413), then hand it on.

    A declared Content-Length over the limit is refused before anything is read.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, reject: Reject) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.reject = reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = APIError(413, f"the request body is larger than {self.max_bytes} bytes",
                             "request_too_large")
        close = {"Connection": "close"}  # the rest of the body is left unread
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self.reject(too_large, close)(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left while sending
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self.reject(too_large, close)(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        pending: list[Message] = [{"type": "http.request", "body": bytes(body),
                                   "more_body": False}]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)


class _ClientStalled(Exception):
    pass


class _EventStream(StreamingResponse):
    """Server-sent events whose client must keep reading: a send that waits more than
    `send_timeout` seconds for the client (the socket's buffers are full) ends the response:
    the request is aborted and the connection closed (uvicorn logs that the response was not
    completed). Either way the body is closed, which aborts an unfinished request."""

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


class _ClientGone(Exception):
    pass


async def _until_disconnect(raw: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (which aborts its request) if the client goes away."""

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
        raise _ClientGone()
    return task.result()


async def _whole(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    """A request's deltas, merged once it has finished."""
    deltas = [out async for out in outputs]
    assert deltas and deltas[-1].finished
    return merge_outputs(deltas)


# ---- the schema's responses --------------------------------------------------------------
_ERROR_STATUSES = (400, 401, 404, 413, 429, 500, 503)
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
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


def _generation_responses(model: type, chunk: type) -> dict[int | str, dict[str, Any]]:
    return {200: {"model": model, "description": "the response, or with `stream: true` "
                  "server-sent events (one JSON chunk each, then `[DONE]`)",
                  "content": {"text/event-stream": {"schema": _event_schema(chunk)}}},
            **_ERROR_RESPONSES}


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
    app.state.engine, app.state.metrics = engine, metrics

    # ---- errors --------------------------------------------------------------------------
    def error_response(err: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
        metrics.record_error(err.status)
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(APIError)
    @app.exception_handler(EmberError)
    @app.exception_handler(EngineUnavailableError)
    @app.exception_handler(RequestFailedError)
    async def _on_known_error(_: Request, e: Exception) -> JSONResponse:
        err = _as_api_error(e)
        assert err is not None
        # A full queue drains as requests finish: tell clients when to come back.
        return error_response(err, {"Retry-After": "1"} if err.status == 429 else None)

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        parts, param = [], None
        errors = e.errors()
        for err in errors[:MAX_REPORTED_ERRORS]:
            if err.get("type") == "json_invalid":
                return error_response(APIError(400, "the request body is not valid JSON"))
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
        return error_response(APIError(400, "; ".join(parts) or "invalid request", None, param))

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        message = str(e.detail)
        if isinstance(e.__cause__, UnicodeDecodeError):  # from FastAPI's JSON parsing
            message = "the request body is not valid UTF-8"
        elif isinstance(e.__cause__, RecursionError):
            message = "the request body's JSON is nested too deeply"
        return error_response(APIError(e.status_code, message), e.headers)  # 405: Allow

    @app.exception_handler(Exception)
    async def _on_bug(_: Request, e: Exception) -> JSONResponse:
        logger.exception("internal error")
        return error_response(APIError(500, "internal server error; see the server log"))

    # ---- hostile clients: keys first, then the body's size -------------------------------
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes, reject=error_response)
    open_paths = {"/health", *PAGE_PATHS}  # the page is static: its API calls need the key
    if not metrics_require_key:
        open_paths.add("/metrics")
    if api_keys:
        app.add_middleware(_KeyCheck, keys=api_keys, open_paths=open_paths,
                           reject=error_response)

    # ---- shared checks -------------------------------------------------------------------
    api = APIRouter()

    def check_model(name: str | None) -> None:
        if name is not None and name != served_model_name:
            raise APIError(404, f"The model `{name}` does not exist.", "model_not_found", "model")

    def render_chat(req: ChatCompletionRequest | TokenizeChatRequest,
                    plan: ToolPlan | None = None) -> str:
        """The conversation as the prompt text, its tools rendered (call it off the event
        loop)."""
        tok = engine.tokenizer
        fmt = tools.detect_format(tok.chat_template)
        tool_defs = [t.model_dump(exclude_none=True) for t in getattr(req, "tools", None) or ()]
        parallel = plan.parallel if plan is not None else True
        messages = tools.render_messages([m.to_template_dict() for m in req.messages], fmt,
                                         tool_defs or None, parallel)
        text = tok.apply_chat_template(messages, req.add_generation_prompt,
                                       tools=tool_defs if fmt != "generic" else None)
        engine.input_processor.check_text(text, "messages")
        return text

    def plan_tools(req: ChatCompletionRequest) -> ToolPlan | None:
        choice = req.tool_choice
        if isinstance(choice, NamedToolChoice):
            choice = choice.model_dump()
        return tools.plan_tools(
            tools.detect_format(engine.tokenizer.chat_template),
            [t.model_dump(exclude_none=True) for t in req.tools or ()], choice,
            bool(req.parallel_tool_calls))

    # ---- generation ----------------------------------------------------------------------
    async def tracked(progress: RequestProgress, outputs: AsyncIterator[RequestOutput]
                      ) -> AsyncIterator[RequestOutput]:
        """Record metrics per output, and the finish line once the request has run."""
        reason: str | None = "abort"
        started = False
        try:
            async for out in outputs:
                started = True
                metrics.record_output(progress, out)
                if out.finished:
                    reason = out.outputs[0].finish_reason
                yield out
        except (EmberError, EngineUnavailableError, RequestFailedError):
            if not started:  # refused or failed before it ran: the error handler counts it
                reason = None
            raise
        finally:
            await outputs.aclose()  # type: ignore[attr-defined]
            if reason is not None:
                metrics.record_finished(progress, reason)

    async def generate(
        raw: Request, kind: Literal["chat", "completion"],
        req: ChatCompletionRequest | CompletionRequest, request: ProcessedRequest,
        plan: ToolPlan | None = None, echo: str | None = None,
    ) -> Response:
        request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        params = request.params
        builder = ResponseBuilder(
            kind, request_id, served_model_name, engine.token_bytes, params.logprobs,
            bool(req.stream_options and req.stream_options.include_usage),
            tool_plan=plan, echo=echo)
        outputs = tracked(RequestProgress(request_id, len(request.prompt_token_ids)),
                          engine.generate(request_id, request))
        try:
            if not req.stream:
                final = await _until_disconnect(raw, _whole(outputs))
                return JSONResponse(builder.response(final).model_dump(mode="json"),
                                    headers=cost_headers(final.metrics and final.metrics.cost,
                                                         "request"))
            # Wait for the first output before answering 200, so that refusals keep their code.
            first = await _until_disconnect(raw, anext(outputs))
        except _ClientGone:
            return Response(status_code=499)
        except BaseException:
            await outputs.aclose()
            raise

        async def events() -> AsyncIterator[str]:
            last = first
            try:
                for event in builder.start(params.n) + builder.delta(first):
                    yield event
                async for last in outputs:
                    for event in builder.delta(last):
                        yield event
                *tail, done = builder.end(last)
                for event in (*tail, cost_comment(last.metrics and last.metrics.cost), done):
                    yield event
            except Exception as e:  # the headers are sent: report it in the stream
                err = _as_api_error(e)
                if err is None:
                    logger.exception("internal error while streaming %s", request_id)
                    err = APIError(500, "internal server error; see the server log")
                metrics.record_error(err.status)
                yield sse(err.body())
                yield "data: [DONE]\n\n"
            finally:
                await outputs.aclose()

        # On a disconnect Starlette cancels the body; closing it aborts the request.
        return _EventStream(events(), request_id, send_timeout,
                            cost_headers(first.metrics and first.metrics.cost, "first-token"))

    @api.post("/v1/chat/completions", response_model=None,
              responses=_generation_responses(ChatCompletionResponse, ChatCompletionChunk))
    async def chat_completions(req: ChatCompletionRequest, raw: Request) -> Response:
        check_model(req.model)
        plan = plan_tools(req)
        params = req.to_sampling_params(None)
        if plan is not None and plan.grammar is not None:
            params.structured_outputs = StructuredOutputsParams(grammar=plan.grammar)

        def process() -> ProcessedRequest:
            ids = engine.tokenizer.encode(render_chat(req, plan), add_special_tokens=False)
            return engine.input_processor.process(ids, params, "messages")

        return await generate(raw, "chat", req, await asyncio.to_thread(process), plan)

    @api.post("/v1/completions", response_model=None,
              responses=_generation_responses(CompletionResponse, CompletionStreamResponse))
    async def completions(req: CompletionRequest, raw: Request) -> Response:
        check_model(req.model)
        prompt = req.prompt_input()
        request = await asyncio.to_thread(engine.input_processor.process, prompt,
                                          req.to_sampling_params(None))
        echo = None
        if req.echo:
            echo = prompt if isinstance(prompt, str) else engine.tokenizer.decode(prompt)
        return await generate(raw, "completion", req, request, echo=echo)

    # ---- models, tokenizer ---------------------------------------------------------------
    def model_card() -> ModelCard:
        return ModelCard(id=served_model_name,
                         max_model_len=engine.max_model_len if engine.is_ready else None)

    @api.get("/v1/models", responses=_ERROR_RESPONSES)
    async def list_models() -> ModelList:
        return ModelList(data=[model_card()])

    @api.get("/v1/models/{model}", responses=_ERROR_RESPONSES)
    async def get_model(model: str) -> ModelCard:
        check_model(model)
        return model_card()

    @api.post("/tokenize", responses=_ERROR_RESPONSES)
    async def tokenize(req: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        check_model(req.model)

        def encode() -> list[int]:
            if isinstance(req, TokenizeChatRequest):
                text = render_chat(req)
            else:
                text = req.prompt
                engine.input_processor.check_text(text, "prompt")
            return engine.tokenizer.encode(text, add_special_tokens=req.add_special_tokens)

        ids = await asyncio.to_thread(encode)
        return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids)

    @api.post("/detokenize", responses=_ERROR_RESPONSES)
    async def detokenize(req: DetokenizeRequest) -> DetokenizeResponse:
        check_model(req.model)
        engine.input_processor.check_token_ids(req.tokens, "tokens:")
        text = await asyncio.to_thread(engine.tokenizer.decode, req.tokens)
        return DetokenizeResponse(prompt=text)

    app.include_router(api)
    add_page(app)

    # ---- operations ----------------------------------------------------------------------
    @app.get("/health", response_class=Response, responses={
        200: {"description": "ready (no body)"}, 503: {"model": ErrorResponse}})
    async def health() -> Response:
        if engine.is_ready:
            return Response(status_code=200)
        reason = engine.error or ("shutting down" if engine.wait_ready(0) else "loading")
        return error_response(APIError(503, f"not ready: {reason}", "engine_unavailable"))

    @app.get("/metrics", response_class=Response, responses={
        200: {"description": "Prometheus text format",
              "content": {"text/plain": {"schema": {"type": "string"}}}},
        401: {"model": ErrorResponse}})
    async def prometheus_metrics() -> Response:
        metrics.update_engine(engine.stats(), engine.num_in_flight)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.openapi = lambda: _openapi(  # type: ignore[method-assign]
        app, engine, open_paths if api_keys else None)
    return app


def _openapi(app: FastAPI, engine: AsyncLLMEngine, open_paths: set[str] | None) -> dict[str, Any]:
    """FastAPI's schema, made to say what the server does.

    - validation errors answer 400 (declared), not FastAPI's 422;
    - the stream chunks and errors that event streams carry are in the components;
    - with API keys, every operation but the open ones declares the bearer scheme;
    - once the model is loaded, token ids are bounded by the vocabulary (cached from then).
    `open_paths` is None without API keys.
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
