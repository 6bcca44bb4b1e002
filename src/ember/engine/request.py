"""One sequence being generated, as the scheduler sees it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ember.engine.cost import RequestUsage
from ember.engine.spec_decode.policy import DraftAcceptance
from ember.sampling_params import SamplingParams

if TYPE_CHECKING:
    from ember.structured_output.matcher import RequestMatcher


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int  # every request samples from its own counter-based noise stream
    max_tokens: int  # params.max_tokens, capped by the context that is left
    eos_token_ids: tuple[int, ...] = ()
    grammar: "RequestMatcher | None" = None  # structured outputs: this sequence's matcher
    arrival_time: float = field(default_factory=time.monotonic)

    output_token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = -1  # prompt tokens served by the prefix cache (-1: not yet scheduled)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chained digests of full blocks
    num_preemptions: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    # timings (monotonic seconds)
    scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    cost: RequestUsage = field(default_factory=RequestUsage)  # charged by engine/cost.py
    drafts: DraftAcceptance = field(default_factory=DraftAcceptance)  # speculative decoding

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
