"""RequestOutputs -> OpenAI response bodies and server-sent-event chunks.

Engine outputs are deltas (ember.outputs): a stream turns each into chunks as it is, keeping
per choice only counters (tokens sent, the next text offset); a whole response is built from
the request's merged output. Logprob token strings and bytes come from each token's own
bytes (`TokenBytes`), as the token reads in the text.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from ember.engine.detokenizer import TokenBytes
from ember.outputs import CompletionOutput, Logprob, RequestOutput
from ember.server.protocol import (
    ChatChoiceLogprobs, ChatCompletionChoice, ChatCompletionChunk, ChatCompletionResponse,
    ChatCompletionStreamChoice, ChatLogprob, ChatResponseMessage, CompletionChoice,
    CompletionLogprobs, CompletionResponse, CompletionStreamResponse, DeltaFunctionCall,
    DeltaMessage, DeltaToolCall, FunctionCallOut, PromptTokensDetails, ToolCallOut, TopLogprob,
    UsageInfo,
)
from ember.server.tools import ToolPlan, new_call_id, parse_output

LOGPROB_FLOOR = -9999.0  # OpenAI's stand-in for -inf, which JSON cannot carry
DONE = "data: [DONE]\n\n"


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def usage(out: RequestOutput, completion_tokens: int | None = None) -> UsageInfo:
    """`out`'s usage; `completion_tokens` when `out` is a stream's last delta."""
    prompt = len(out.prompt_token_ids)
    completion = (sum(len(c.token_ids) for c in out.outputs) if completion_tokens is None
                  else completion_tokens)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(
                         cached_tokens=out.num_cached_tokens))


def _finite(logprob: float) -> float:
    return logprob if logprob > LOGPROB_FLOOR else LOGPROB_FLOOR  # also maps NaN


def _ranked(entry: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    top = [(t, lp) for t, lp in entry.items() if lp.rank is not None]
    top.sort(key=lambda item: item[1].rank)  # type: ignore[arg-type, return-value]
    return top[:k]


def _set_only(value: Any) -> Any:
    """`value` without its None entries, at every depth."""
    if isinstance(value, dict):
        return {k: _set_only(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_set_only(v) for v in value]
    return value


@dataclass
class _Sent:
    """What a stream has sent of one choice."""

    offset: int = 0  # text_offset of the next token (completion logprobs)
    finished: bool = False
    echoed: bool = False  # echo: the prompt's text went out before the first token
    # With tools: the answer so far (calls are parsed from all of it), the content sent, and
    # per call its id and the argument characters sent.
    answer: str = ""
    content: int = 0
    call_ids: list[str] = field(default_factory=list)
    call_args: list[int] = field(default_factory=list)


class ResponseBuilder:
    def __init__(
        self, kind: Literal["chat", "completion"], request_id: str, model: str,
        token_bytes: TokenBytes, logprobs: int | None, include_usage: bool = False,
        tool_plan: ToolPlan | None = None, echo: str | None = None,
    ) -> None:
        """`tool_plan`: parse the answers for tool calls; `echo`: the prompt's text, sent
        before each completion's (`echo: true`)."""
        self.kind = kind
        self.id = request_id
        self.model = model
        self.token_bytes = token_bytes
        self.logprobs = logprobs  # top-k per token, or None: no logprobs
        self.include_usage = include_usage
        self.tool_plan = tool_plan if tool_plan is not None and tool_plan.parses_calls else None
        self.echo = echo
        self.created = int(time.time())
        self._sent: dict[int, _Sent] = {}
        self._completion_tokens = 0

    def _text(self, token_id: int) -> str:
        return self.token_bytes.text(token_id)

    def _top(self, token_id: int, logprob: float) -> TopLogprob:
        return TopLogprob(token=self._text(token_id), logprob=_finite(logprob),
                          bytes=list(self.token_bytes(token_id)))

    # ---- logprobs ------------------------------------------------------------------------
    def _chat_logprobs(self, c: CompletionOutput) -> ChatChoiceLogprobs | None:
        if self.logprobs is None or c.logprobs is None:
            return None
        content = []
        for tid, entry in zip(c.token_ids, c.logprobs):
            tops = [self._top(t, lp.logprob) for t, lp in _ranked(entry, self.logprobs)]
            content.append(ChatLogprob(
                token=self._text(tid), logprob=_finite(entry[tid].logprob),
                bytes=list(self.token_bytes(tid)), top_logprobs=tops))
        return ChatChoiceLogprobs(content=content)

    def _completion_logprobs(self, c: CompletionOutput, sent: _Sent) -> CompletionLogprobs | None:
        if self.logprobs is None or c.logprobs is None:
            return None
        lp = CompletionLogprobs(text_offset=[], token_logprobs=[], tokens=[], top_logprobs=[])
        for tid, entry in zip(c.token_ids, c.logprobs):
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
    def _message(self, c: CompletionOutput) -> tuple[ChatResponseMessage, str | None]:
        """The answer as a message, and its finish reason ("tool_calls" for calls)."""
        if self.tool_plan is None:
            return ChatResponseMessage(content=c.text), c.finish_reason
        parsed = parse_output(self.tool_plan.fmt, c.text)
        calls = [ToolCallOut(id=new_call_id(), function=FunctionCallOut(
            name=call.name, arguments=call.arguments))
            for call in parsed.calls if call.name is not None and call.complete]
        if not parsed.in_call:
            return ChatResponseMessage(content=c.text), c.finish_reason
        reason = "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason
        return ChatResponseMessage(content=parsed.content or None, tool_calls=calls), reason

    def response(self, out: RequestOutput) -> ChatCompletionResponse | CompletionResponse:
        if self.kind == "chat":
            choices = []
            for c in out.outputs:
                message, reason = self._message(c)
                choices.append(ChatCompletionChoice(
                    index=c.index, message=message, logprobs=self._chat_logprobs(c),
                    finish_reason=reason, stop_reason=c.stop_reason))
            return ChatCompletionResponse(id=self.id, created=self.created, model=self.model,
                                          usage=usage(out), choices=choices)
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, usage=usage(out),
            choices=[CompletionChoice(
                index=c.index, text=(self.echo or "") + c.text, finish_reason=c.finish_reason,
                logprobs=self._completion_logprobs(c, _Sent()), stop_reason=c.stop_reason,
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
                choice["delta"] = _set_only(choice["delta"])
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
        """Chunks for one delta output: O(what it adds)."""
        events = []
        for c in out.outputs:
            sent = self._sent.setdefault(c.index, _Sent())
            if sent.finished:
                continue
            self._completion_tokens += len(c.token_ids)
            if not c.text and not c.token_ids and c.finish_reason is None:
                continue
            if self.kind == "chat" and self.tool_plan is not None:
                choice = self._tool_delta(c, sent)
            elif self.kind == "chat":
                choice = ChatCompletionStreamChoice(
                    index=c.index, delta=DeltaMessage(content=c.text),
                    logprobs=self._chat_logprobs(c), finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
            else:
                text = c.text
                if self.echo and not sent.echoed:
                    text, sent.echoed = self.echo + text, True
                choice = CompletionChoice(
                    index=c.index, text=text, finish_reason=c.finish_reason,
                    logprobs=self._completion_logprobs(c, sent), stop_reason=c.stop_reason,
                )
            sent.finished = c.finish_reason is not None
            events.append(self._chunk([choice]))
        return events

    def _tool_delta(self, c: CompletionOutput, sent: _Sent) -> ChatCompletionStreamChoice:
        """OpenAI's tool-call deltas: content while the answer is text; for each call, its
        index, id, type and name once the name is complete, then argument fragments. `c` is
        a delta: the calls are parsed from the whole answer so far."""
        assert self.tool_plan is not None
        sent.answer += c.text
        parsed = parse_output(self.tool_plan.fmt, sent.answer)
        content = parsed.content
        if c.finish_reason is not None and not parsed.in_call:
            content = sent.answer  # the held-back tail was not a call's start after all
        deltas = []
        for i, call in enumerate(parsed.calls):
            if call.name is None:
                break
            if i == len(sent.call_ids):
                sent.call_ids.append(new_call_id())
                sent.call_args.append(0)
                deltas.append(DeltaToolCall(index=i, id=sent.call_ids[i], type="function",
                                            function=DeltaFunctionCall(name=call.name,
                                                                       arguments="")))
            fragment = call.arguments[sent.call_args[i]:]
            if fragment:
                deltas.append(DeltaToolCall(index=i, function=DeltaFunctionCall(
                    arguments=fragment)))
                sent.call_args[i] = len(call.arguments)
        reason = c.finish_reason
        if reason == "stop" and sent.call_ids:
            reason = "tool_calls"
        new_content = content[sent.content:]
        sent.content = max(sent.content, len(content))
        return ChatCompletionStreamChoice(
            index=c.index, delta=DeltaMessage(content=new_content or None,
                                              tool_calls=deltas or None),
            logprobs=self._chat_logprobs(c), finish_reason=reason,
            stop_reason=c.stop_reason)

    def end(self, out: RequestOutput) -> list[str]:
        """The chunks that close a stream whose last delta was `out`."""
        tail = [self._chunk([], usage(out, self._completion_tokens))] if self.include_usage else []
        return tail + [DONE]
