"""RequestOutputs -> OpenAI response bodies and server-sent-event chunks.

Engine outputs are cumulative; a stream remembers, per choice, how much text and how many
tokens it has sent, and emits only what is new.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Literal

from ember.loading.tokenizer import Tokenizer
from ember.outputs import CompletionOutput, Logprob, RequestOutput
from ember.server.protocol import (
    ChatChoiceLogprobs, ChatCompletionChoice, ChatCompletionChunk, ChatCompletionResponse,
    ChatCompletionStreamChoice, ChatLogprob, ChatResponseMessage, CompletionChoice,
    CompletionLogprobs, CompletionResponse, CompletionStreamResponse, DeltaMessage, TopLogprob,
    UsageInfo,
)

LOGPROB_FLOOR = -9999.0  # OpenAI's stand-in for -inf, which JSON cannot carry
DONE = "data: [DONE]\n\n"


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def usage(out: RequestOutput) -> UsageInfo:
    prompt = len(out.prompt_token_ids)
    completion = sum(len(c.token_ids) for c in out.outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion)


def _finite(logprob: float) -> float:
    return logprob if logprob > LOGPROB_FLOOR else LOGPROB_FLOOR  # also maps NaN


def _ranked(entry: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    top = [(t, lp) for t, lp in entry.items() if lp.rank is not None]
    top.sort(key=lambda item: item[1].rank)  # type: ignore[arg-type, return-value]
    return top[:k]


@dataclass
class _Sent:
    """What a stream has sent of one choice."""

    text: int = 0  # characters
    tokens: int = 0
    offset: int = 0  # text_offset of the next token (completion logprobs)
    finished: bool = False


class ResponseBuilder:
    def __init__(
        self, kind: Literal["chat", "completion"], request_id: str, model: str,
        tokenizer: Tokenizer, logprobs: int | None, include_usage: bool = False,
    ) -> None:
        self.kind = kind
        self.id = request_id
        self.model = model
        self.tok = tokenizer
        self.logprobs = logprobs  # top-k per token, or None: no logprobs
        self.include_usage = include_usage
        self.created = int(time.time())
        self._sent: dict[int, _Sent] = {}

    def _text(self, token_id: int) -> str:
        return self.tok.decode([token_id], skip_special_tokens=False)

    # ---- logprobs ------------------------------------------------------------------------
    def _chat_logprobs(self, c: CompletionOutput, start: int) -> ChatChoiceLogprobs | None:
        if self.logprobs is None or c.logprobs is None:
            return None
        content = []
        for tid, entry in zip(c.token_ids[start:], c.logprobs[start:]):
            text = self._text(tid)
            tops = []
            for t, lp in _ranked(entry, self.logprobs):
                s = self._text(t)
                tops.append(TopLogprob(token=s, logprob=_finite(lp.logprob),
                                       bytes=list(s.encode())))
            content.append(ChatLogprob(token=text, logprob=_finite(entry[tid].logprob),
                                       bytes=list(text.encode()), top_logprobs=tops))
        return ChatChoiceLogprobs(content=content)

    def _completion_logprobs(
        self, c: CompletionOutput, start: int, sent: _Sent
    ) -> CompletionLogprobs | None:
        if self.logprobs is None or c.logprobs is None:
            return None
        lp = CompletionLogprobs(text_offset=[], token_logprobs=[], tokens=[], top_logprobs=[])
        for tid, entry in zip(c.token_ids[start:], c.logprobs[start:]):
            text = self._text(tid)
            value = _finite(entry[tid].logprob)
            top = {self._text(t): _finite(x.logprob) for t, x in _ranked(entry, self.logprobs)}
            top.setdefault(text, value)  # as vLLM: the sampled token is always listed
            lp.text_offset.append(sent.offset)
            lp.tokens.append(text)
            lp.token_logprobs.append(value)
            lp.top_logprobs.append(top)
            sent.offset += len(text)
        return lp

    # ---- whole responses -----------------------------------------------------------------
    def response(self, out: RequestOutput) -> ChatCompletionResponse | CompletionResponse:
        if self.kind == "chat":
            return ChatCompletionResponse(
                id=self.id, created=self.created, model=self.model, usage=usage(out),
                choices=[ChatCompletionChoice(
                    index=c.index, message=ChatResponseMessage(content=c.text),
                    logprobs=self._chat_logprobs(c, 0), finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                ) for c in out.outputs],
            )
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, usage=usage(out),
            choices=[CompletionChoice(
                index=c.index, text=c.text, finish_reason=c.finish_reason,
                logprobs=self._completion_logprobs(c, 0, _Sent()), stop_reason=c.stop_reason,
            ) for c in out.outputs],
        )

    # ---- streams -------------------------------------------------------------------------
    def _chunk(self, choices: list, usage_info: UsageInfo | None = None) -> str:
        cls = ChatCompletionChunk if self.kind == "chat" else CompletionStreamResponse
        chunk = cls(id=self.id, created=self.created, model=self.model, choices=choices,
                    usage=usage_info)
        payload = chunk.model_dump(mode="json")
        if self.kind == "chat":
            for choice in payload["choices"]:  # OpenAI's deltas carry only what they set
                choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        if not self.include_usage:
            payload.pop("usage")
        return sse(payload)

    def start(self, n: int) -> list[str]:
        """The chunks that open a stream: OpenAI's chat streams announce the role first."""
        if self.kind != "chat":
            return []
        return [self._chunk([ChatCompletionStreamChoice(
            index=i, delta=DeltaMessage(role="assistant", content=""))]) for i in range(n)]

    def delta(self, out: RequestOutput) -> list[str]:
        """Chunks for what `out` adds to what this stream has sent."""
        events = []
        for c in out.outputs:
            sent = self._sent.setdefault(c.index, _Sent())
            if sent.finished:
                continue
            text = c.text[sent.text:]
            start = sent.tokens
            if not text and len(c.token_ids) == start and c.finish_reason is None:
                continue
            if self.kind == "chat":
                choice = ChatCompletionStreamChoice(
                    index=c.index, delta=DeltaMessage(content=text),
                    logprobs=self._chat_logprobs(c, start), finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
            else:
                choice = CompletionChoice(
                    index=c.index, text=text, finish_reason=c.finish_reason,
                    logprobs=self._completion_logprobs(c, start, sent),
                    stop_reason=c.stop_reason,
                )
            sent.text, sent.tokens = len(c.text), len(c.token_ids)
            sent.finished = c.finish_reason is not None
            events.append(self._chunk([choice]))
        return events

    def end(self, out: RequestOutput) -> list[str]:
        tail = [self._chunk([], usage(out))] if self.include_usage else []
        return tail + [DONE]
