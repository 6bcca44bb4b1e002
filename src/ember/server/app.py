"""The OpenAI-compatible HTTP API over an AsyncLLMEngine.

Every error leaves as OpenAI's body `{"error": {"message", "type", "param", "code"}}` with the
right status: 400 bad input (pydantic's 422 included), 401 bad key, 404 unknown model or path,
429 queue full, 503 engine loading/dead/shutting down, 500 only for bugs (logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from ember import __version__
from ember.engine.async_engine import AsyncLLMEngine, EngineUnavailableError
from ember.errors import EmberError, InvalidRequestError, QueueFullError
from ember.outputs import RequestOutput
from ember.sampling_params import SamplingParams
from ember.server.metrics import RequestProgress, ServerMetrics
from ember.server.protocol import (
    ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
    DetokenizeRequest, DetokenizeResponse, ErrorResponse, ModelCard, ModelList,
    TokenizeChatRequest, TokenizeCompletionRequest, TokenizeResponse,
)
from ember.server.serving import ResponseBuilder, sse

logger = logging.getLogger("ember.server")
T = TypeVar("T")

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                404: "not_found_error", 429: "rate_limit_error",
                503: "service_unavailable_error", 500: "internal_server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        error_type = _ERROR_TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": error_type, "param": self.param,
                          "code": self.code}}


def _as_api_error(e: Exception) -> APIError | None:
    """The API error for an exception that is the client's doing or the engine's state."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFullError):
        return APIError(429, str(e), "queue_full")
    if isinstance(e, EngineUnavailableError):
        return APIError(503, str(e), "engine_unavailable")
    if isinstance(e, (InvalidRequestError, EmberError)):
        return APIError(400, str(e))
    return None


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 429, 500, 503)
}


def _generation_responses(model: type) -> dict[int | str, dict[str, Any]]:
    return {200: {"model": model, "content": {"text/event-stream": {"schema": {
        "type": "string", "description": "server-sent events, when stream is true"}}}},
        **_ERROR_RESPONSES}


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


async def _last(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    final = None
    async for final in outputs:
        pass
    assert final is not None and final.finished
    return final


def build_app(
    engine: AsyncLLMEngine, served_model_name: str, api_keys: Sequence[str] = (),
) -> FastAPI:
    """The FastAPI app. Starting and stopping `engine` is the caller's job (see launch.py)."""
    metrics = ServerMetrics(served_model_name)
    app = FastAPI(title="ember", version=__version__,
                  description="OpenAI-compatible LLM inference server")
    app.state.engine, app.state.metrics = engine, metrics

    # ---- errors --------------------------------------------------------------------------
    def error_response(err: APIError) -> JSONResponse:
        metrics.record_error(err.status)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(APIError)
    @app.exception_handler(EmberError)
    @app.exception_handler(EngineUnavailableError)
    async def _on_known_error(_: Request, e: Exception) -> JSONResponse:
        err = _as_api_error(e)
        assert err is not None
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        parts, param = [], None
        for err in e.errors():
            if err.get("type") == "json_invalid":
                return error_response(APIError(400, "the request body is not valid JSON"))
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            param = param or loc or None
            parts.append(f"{loc}: {err.get('msg')}" if loc else
                         f"the request body must be a JSON object: {err.get('msg')}")
        return error_response(APIError(400, "; ".join(parts) or "invalid request", None, param))

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(APIError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def _on_bug(_: Request, e: Exception) -> JSONResponse:
        logger.exception("internal error")
        return error_response(APIError(500, "internal server error; see the server log"))

    # ---- auth and shared checks ----------------------------------------------------------
    digests = [hashlib.sha256(k.encode()).digest() for k in api_keys]
    bearer = HTTPBearer(auto_error=False)

    async def check_api_key(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        given = hashlib.sha256((creds.credentials if creds else "").encode()).digest()
        # Compare with every key (no early exit) on equal-length digests: constant time.
        ok = False
        for d in digests:
            ok |= hmac.compare_digest(given, d)
        if creds is None or not ok:
            raise APIError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                           "invalid_api_key")

    api = APIRouter(dependencies=[Depends(check_api_key)] if api_keys else [])

    def check_model(name: str | None) -> None:
        if name is not None and name != served_model_name:
            raise APIError(404, f"The model `{name}` does not exist.", "model_not_found", "model")

    def check_context(prompt_len: int, max_tokens: int | None, where: str) -> None:
        max_len = engine.max_model_len
        if prompt_len >= max_len or (max_tokens is not None and prompt_len + max_tokens > max_len):
            asked = prompt_len + (max_tokens or 0)
            raise InvalidRequestError(
                f"This model's maximum context length is {max_len} tokens. However, you "
                f"requested {asked} tokens ({prompt_len} in the {where}, {max_tokens or 0} in "
                f"the completion). Please reduce the length of the {where} or completion.")

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
        except (EmberError, EngineUnavailableError):
            if not started:  # refused before it ran: the error handler counts it
                reason = None
            raise
        finally:
            await outputs.aclose()  # type: ignore[attr-defined]
            if reason is not None:
                metrics.record_finished(progress, reason)

    async def generate(
        raw: Request, kind: Literal["chat", "completion"],
        req: ChatCompletionRequest | CompletionRequest, prompt_ids: list[int],
        params: SamplingParams,
    ) -> Response:
        request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        builder = ResponseBuilder(
            kind, request_id, served_model_name, engine.tokenizer, params.logprobs,
            bool(req.stream_options and req.stream_options.include_usage))
        outputs = tracked(RequestProgress(request_id, len(prompt_ids)),
                          engine.generate(request_id, prompt_ids, params))
        try:
            if not req.stream:
                final = await _until_disconnect(raw, _last(outputs))
                return JSONResponse(builder.response(final).model_dump(mode="json"))
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
                for event in builder.end(last):
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

        body = events()
        # On a disconnect Starlette cancels the body; closing it here aborts the request.
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"},
                                 background=BackgroundTask(body.aclose))

    @api.post("/v1/chat/completions", response_model=None,
              responses=_generation_responses(ChatCompletionResponse))
    async def chat_completions(req: ChatCompletionRequest, raw: Request) -> Response:
        check_model(req.model)
        tok = engine.tokenizer
        messages = [m.to_template_dict() for m in req.messages]
        text = tok.apply_chat_template(messages, req.add_generation_prompt)
        ids = tok.encode(text, add_special_tokens=False)
        check_context(len(ids), req.requested_max_tokens(), "messages")
        return await generate(raw, "chat", req, ids, req.to_sampling_params(None))

    @api.post("/v1/completions", response_model=None,
              responses=_generation_responses(CompletionResponse))
    async def completions(req: CompletionRequest, raw: Request) -> Response:
        check_model(req.model)
        ids = engine.tokenize(req.prompt_input())
        check_context(len(ids), req.max_tokens, "prompt")
        return await generate(raw, "completion", req, ids, req.to_sampling_params(None))

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
        tok = engine.tokenizer
        if isinstance(req, TokenizeChatRequest):
            text = tok.apply_chat_template([m.to_template_dict() for m in req.messages],
                                           req.add_generation_prompt)
        else:
            text = req.prompt
        ids = tok.encode(text, add_special_tokens=req.add_special_tokens)
        return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids)

    @api.post("/detokenize", responses=_ERROR_RESPONSES)
    async def detokenize(req: DetokenizeRequest) -> DetokenizeResponse:
        check_model(req.model)
        tok = engine.tokenizer
        bad = [t for t in req.tokens if t >= tok.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"token id {bad[0]} is outside the vocabulary [0, {tok.vocab_size})")
        return DetokenizeResponse(prompt=tok.decode(req.tokens))

    app.include_router(api)

    # ---- operations (no API key) ---------------------------------------------------------
    @app.get("/health", responses={200: {"description": "ready"}, 503: {"model": ErrorResponse}})
    async def health() -> Response:
        if engine.is_ready:
            return Response(status_code=200)
        reason = engine.error or ("shutting down" if engine.wait_ready(0) else "loading")
        return error_response(APIError(503, f"not ready: {reason}", "engine_unavailable"))

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
    async def prometheus_metrics() -> Response:
        metrics.update_engine(engine.stats())
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, less its 422 responses: validation errors answer 400 here."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version,
                             description=app.description, routes=app.routes)
        for path in schema["paths"].values():
            for op in path.values():
                op.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema
