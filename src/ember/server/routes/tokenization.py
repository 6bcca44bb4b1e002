"""vLLM's /tokenize (a prompt, or a conversation through the chat template) and /detokenize;
the tokenizer runs off the event loop."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from ember.server.chat import render_chat
from ember.server.openapi import ERROR_RESPONSES
from ember.server.protocol import (
    DetokenizeRequest, DetokenizeResponse, TokenizeChatRequest, TokenizeCompletionRequest,
    TokenizeResponse,
)
from ember.server.state import server_state

router = APIRouter()


@router.post("/tokenize", responses=ERROR_RESPONSES)
async def tokenize(req: TokenizeCompletionRequest | TokenizeChatRequest,
                   raw: Request) -> TokenizeResponse:
    state = server_state(raw)
    state.check_model(req.model)
    engine = state.engine

    def encode() -> list[int]:
        if isinstance(req, TokenizeChatRequest):
            text = render_chat(engine, req)
        else:
            text = req.prompt
            engine.input_processor.check_text(text, "prompt")
        return engine.tokenizer.encode(text, add_special_tokens=req.add_special_tokens)

    ids = await asyncio.to_thread(encode)
    return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids)


@router.post("/detokenize", responses=ERROR_RESPONSES)
async def detokenize(req: DetokenizeRequest, raw: Request) -> DetokenizeResponse:
    state = server_state(raw)
    state.check_model(req.model)
    engine = state.engine
    engine.input_processor.check_token_ids(req.tokens, "tokens:")
    text = await asyncio.to_thread(engine.tokenizer.decode, req.tokens)
    return DetokenizeResponse(prompt=text)
