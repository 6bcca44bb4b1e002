"""/v1/chat/completions and /v1/completions: a request is tokenized and checked off the event
loop (`InputProcessor`), run by the engine, and answered whole or as server-sent events built
from the engine's deltas (`ResponseBuilder`). Metrics are recorded per output; a client that
goes away, or stops reading a stream, has its request aborted (streams.py)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ember.engine.async_engine import EngineUnavailableError, RequestFailedError
from ember.engine.input_processor import ProcessedRequest
from ember.errors import EmberError
from ember.outputs import RequestOutput, merge_outputs
from ember.sampling_params import StructuredOutputsParams
from ember.server.chat import plan_tools, render_chat
from ember.server.cost import cost_comment, cost_headers
from ember.server.errors import as_api_error, internal_error
from ember.server.metrics import RequestProgress, ServerMetrics
from ember.server.openapi import generation_responses
from ember.server.protocol import (
    ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
    CompletionResponse, CompletionStreamResponse,
)
from ember.server.serving import ResponseBuilder, sse
from ember.server.state import ServerState, server_state
from ember.server.streams import ClientGone, EventStream, until_disconnect
from ember.server.tools import ToolPlan

logger = logging.getLogger("ember.server")
router = APIRouter()


@router.post("/v1/chat/completions", response_model=None,
             responses=generation_responses(ChatCompletionResponse, ChatCompletionChunk))
async def chat_completions(req: ChatCompletionRequest, raw: Request) -> Response:
    state = server_state(raw)
    state.check_model(req.model)
    engine = state.engine
    plan = plan_tools(engine, req)
    params = req.to_sampling_params(None)
    if plan is not None and plan.grammar is not None:
        params.structured_outputs = StructuredOutputsParams(grammar=plan.grammar)

    def process() -> ProcessedRequest:
        ids = engine.tokenizer.encode(render_chat(engine, req, plan), add_special_tokens=False)
        return engine.input_processor.process(ids, params, "messages")

    return await _generate(state, raw, "chat", req, await asyncio.to_thread(process), plan)


@router.post("/v1/completions", response_model=None,
             responses=generation_responses(CompletionResponse, CompletionStreamResponse))
async def completions(req: CompletionRequest, raw: Request) -> Response:
    state = server_state(raw)
    state.check_model(req.model)
    engine = state.engine
    prompt = req.prompt_input()
    request = await asyncio.to_thread(engine.input_processor.process, prompt,
                                      req.to_sampling_params(None))
    echo = None
    if req.echo:
        echo = prompt if isinstance(prompt, str) else engine.tokenizer.decode(prompt)
    return await _generate(state, raw, "completion", req, request, echo=echo)


async def _generate(
    state: ServerState, raw: Request, kind: Literal["chat", "completion"],
    req: ChatCompletionRequest | CompletionRequest, request: ProcessedRequest,
    plan: ToolPlan | None = None, echo: str | None = None,
) -> Response:
    engine, metrics = state.engine, state.metrics
    request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    params = request.params
    builder = ResponseBuilder(
        kind, request_id, state.served_model_name, engine.token_bytes, params.logprobs,
        bool(req.stream_options and req.stream_options.include_usage),
        tool_plan=plan, echo=echo)
    outputs = _tracked(metrics, RequestProgress(request_id, len(request.prompt_token_ids)),
                       engine.generate(request_id, request))
    try:
        if not req.stream:
            final = await until_disconnect(raw, _whole(outputs))
            return JSONResponse(builder.response(final).model_dump(mode="json"),
                                headers=cost_headers(final.metrics and final.metrics.cost,
                                                     "request"))
        # Wait for the first output before answering 200, so that refusals keep their code.
        first = await until_disconnect(raw, anext(outputs))
    except ClientGone:
        return Response(status_code=499)
    except BaseException:
        await outputs.aclose()  # type: ignore[attr-defined]
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
            err = as_api_error(e)
            if err is None:
                logger.exception("internal error while streaming %s", request_id)
                err = internal_error()
            metrics.record_error(err.status)
            yield sse(err.body())
            yield "data: [DONE]\n\n"
        finally:
            await outputs.aclose()  # type: ignore[attr-defined]

    return EventStream(events(), request_id, state.send_timeout,
                       cost_headers(first.metrics and first.metrics.cost, "first-token"))


async def _tracked(metrics: ServerMetrics, progress: RequestProgress,
                   outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    """`outputs`, recording metrics per output and the finish line once the request has
    run."""
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


async def _whole(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    """A request's deltas, merged once it has finished."""
    deltas = [out async for out in outputs]
    assert deltas and deltas[-1].finished
    return merge_outputs(deltas)
