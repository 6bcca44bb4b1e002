"""What generation returns, in vLLM's shape: RequestOutput -> CompletionOutput(s).

The engine emits deltas (vLLM's `RequestOutputKind.DELTA`): each step's `RequestOutput` holds,
for every sequence that advanced, only what that step added (new token ids, new text, new
logprobs), so a step costs the same whatever a request's length, n or logprobs.
`merge_outputs` assembles a request's deltas into the whole output, once, at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ember.engine.cost import RequestCost


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = the most likely token
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str  # a delta: the text this step added
    token_ids: list[int]  # a delta: the tokens this step added
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None  # per generated token, when requested
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or stop token id that matched

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    cost: RequestCost | None = None  # CPU time, energy, dollars, carbon (engine/cost.py)

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def queue_time(self) -> float | None:
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    metrics: RequestMetrics | None = None
    error: str | None = field(default=None)  # set when the engine failed this request


def merge_outputs(deltas: list[RequestOutput]) -> RequestOutput:
    """One request's deltas, in order, as one cumulative RequestOutput (linear time)."""
    last = deltas[-1]
    texts: dict[int, list[str]] = {}
    merged: dict[int, CompletionOutput] = {}
    for delta in deltas:
        for c in delta.outputs:
            m = merged.get(c.index)
            if m is None:
                m = merged[c.index] = CompletionOutput(
                    c.index, "", [], logprobs=[] if c.logprobs is not None else None)
                texts[c.index] = []
            texts[c.index].append(c.text)
            m.token_ids.extend(c.token_ids)
            if c.logprobs is not None and m.logprobs is not None:
                m.logprobs.extend(c.logprobs)
            m.cumulative_logprob = c.cumulative_logprob
            m.finish_reason, m.stop_reason = c.finish_reason, c.stop_reason
    for index, m in merged.items():
        m.text = "".join(texts[index])
    return RequestOutput(
        request_id=last.request_id, prompt=last.prompt, prompt_token_ids=last.prompt_token_ids,
        outputs=[merged[i] for i in sorted(merged)], finished=last.finished,
        num_cached_tokens=last.num_cached_tokens, metrics=last.metrics, error=last.error)
