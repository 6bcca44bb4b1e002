"""Iteration-level scheduling under a token budget (vLLM v1's shape).

There are no prefill and decode phases: each step, every running request asks for the tokens
it has not computed yet (a prompt chunk, or one token when decoding) and gets as many as the
budget allows, running requests first in arrival order, then waiting ones. A long prompt is
thus split across steps (chunked prefill) and never stalls the decodes of others. When the
block pool runs dry the newest running request is preempted: its blocks are freed and it is
recomputed later.

The scheduler talks to the model runner in typed messages, never live `Request` objects:
`schedule()` returns a `SchedulerOutput` (request ids, token counts, block ids; the full
request only the first time the runner sees it), the runner answers with a
`ModelRunnerOutput` (request ids, sampled tokens, logprobs), and `update_from_output` appends
the tokens, applies the stop rules that need no text (EOS, stop token ids, min_tokens,
max_tokens), advances a constrained sequence's grammar (finishing it where the grammar
ends) and frees finished requests. Stop strings need text: the engine checks them and
calls `finish_requests`.

Speculative decoding (`speculative_config`): a decoding sequence may be scheduled its last
token plus up to k drafted ones (`scheduled_spec_decode_tokens`), as one multi-token chunk
whose context is in the cache. The runner samples at each of its rows and returns the run
the target agreed with plus the token it sampled after it; `update_from_output` rolls the
rest back (computed tokens, and the KV blocks beyond the accepted tokens), so the prefix
cache only ever holds accepted tokens. Drafts never preempt anyone: when the pool cannot
hold them the sequence decodes plainly. With a draft model (`method: draft_model`) the
scheduler only reserves the room: `num_lookahead_tokens` asks the runner's drafter for up to
that many drafts, which it writes into `scheduled_spec_decode_tokens` (and adds to
`num_scheduled_tokens`) before the step runs.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ember.config import EngineConfig
from ember.engine.block_manager import BlockManager
from ember.engine.request import Request, RequestStatus
from ember.engine.spec_decode.metrics import SpecDecodingStats
from ember.engine.spec_decode.ngram_proposer import NgramProposer
from ember.engine.spec_decode.policy import SpeculationPolicy
from ember.sampling_params import SamplingParams

if TYPE_CHECKING:
    from ember.structured_output.matcher import RequestMatcher

logger = logging.getLogger("ember")


@dataclass
class NewRequestData:
    """A request the runner has no state for: first scheduled, or resumed after preemption."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # generated before a preemption (a copy)
    params: SamplingParams
    seed: int
    eos_token_ids: tuple[int, ...]
    block_ids: list[int]
    num_computed_tokens: int  # prefix-cache hits
    # Structured outputs: the sequence's matcher, shared with the engine's Request (the runner
    # that samples is in-process: rank 0); its state follows the scheduler's accepted tokens.
    grammar: "RequestMatcher | None" = None

    @classmethod
    def from_request(cls, req: Request) -> "NewRequestData":
        return cls(req.request_id, req.prompt_token_ids, list(req.output_token_ids),
                   req.params, req.seed, req.eos_token_ids, list(req.block_table),
                   req.num_computed_tokens, req.grammar)


@dataclass
class CachedRequestData:
    """A request the runner already holds: the blocks it gained and where it stands."""

    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int
    # Blocks of the runner's table kept before the new ones (after a verify step, the
    # scheduler freed those beyond the accepted tokens).
    num_kept_blocks: int


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData] = field(default_factory=list)
    scheduled_cached_reqs: list[CachedRequestData] = field(default_factory=list)
    # Tokens to compute per request, in batch order (running requests first); drafts included.
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    # Speculative decoding: the drafted tokens scheduled after a sequence's last token (they
    # end its num_scheduled_tokens; the runner samples at each of them and after the last).
    scheduled_spec_decode_tokens: dict[str, list[int]] = field(default_factory=dict)
    # Draft-model speculation: the drafts a sequence may get (their KV slots are allocated);
    # the runner's drafter proposes them and fills in the two fields above.
    num_lookahead_tokens: dict[str, int] = field(default_factory=dict)
    # Requests finished, aborted or preempted since the last step: the runner drops them.
    finished_req_ids: set[str] = field(default_factory=set)
    preempted_req_ids: list[str] = field(default_factory=list)
    num_touched_blocks: int = 0  # the pool's blocks [0, this) have been handed out: zero new ones

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


@dataclass
class LogprobsLists:
    """Per sampled token, in `ModelRunnerOutput` order (a request's tokens one after the
    other): its logprob, and the top-k ids and logprobs."""

    logprobs: list[float]
    topk_token_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None


@dataclass
class ModelRunnerOutput:
    req_ids: list[str]  # the requests that sampled this step, in row order
    # Per request: the tokens it sampled; a verified sequence's accepted drafts, then the
    # token the target sampled after them.
    sampled_token_ids: list[list[int]]
    logprobs: LogprobsLists | None = None


@dataclass
class EngineCoreOutput:
    """What one step did to one request: its new tokens, and whether that finished it."""

    req_id: str
    new_token_ids: list[int]
    new_logprobs: list[float]  # the sampled tokens' logprobs
    new_top_logprobs: list[tuple[list[int], list[float]]] | None  # when params.logprobs is set
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: Exception | None = None  # this request alone failed (the engine aborts it)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._finished_req_ids: set[str] = set()  # since the last SchedulerOutput
        spec = config.speculative_config
        # n-gram drafts are proposed here; a draft model's by the runner (num_lookahead_tokens).
        self.proposer = NgramProposer(spec) if spec is not None and spec.method == "ngram" else None
        self.spec_policy = SpeculationPolicy(spec) if spec is not None else None
        self.num_spec_tokens = spec.num_speculative_tokens if spec is not None else 0
        self.spec_stats = SpecDecodingStats(self.num_spec_tokens)  # cumulative

    def add_request(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager

        speculate = self.spec_policy is not None and self.spec_policy.step_allows(
            sum(r.num_tokens - r.num_computed_tokens == 1 for r in self.running))
        # Running requests first, oldest first; preempt from the newest end.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            had_blocks = len(req.block_table)
            drafts: list[int] = []
            lookahead = 0
            if speculate and req.num_tokens - req.num_computed_tokens == 1:
                # Leave a token of the budget to each running request after this one.
                room = budget - 1 - (len(self.running) - i - 1)
                if self.proposer is not None:
                    drafts = self._propose(req, room)
                else:
                    lookahead = self._num_drafts(req, room)
            allocated = bool(drafts or lookahead) and bm.allocate(
                req, num_new + len(drafts) + lookahead)
            if not allocated:
                # Drafts never preempt: without room the sequence decodes plainly.
                drafts, lookahead = [], 0
                while not bm.allocate(req, num_new):
                    victim = self.running.pop()
                    self._preempt(victim)
                    out.preempted_req_ids.append(victim.request_id)
                    if victim is req:
                        break
                else:
                    allocated = True
            if allocated:
                num_new += len(drafts)
                if drafts:
                    out.scheduled_spec_decode_tokens[req.request_id] = drafts
                if lookahead:
                    out.num_lookahead_tokens[req.request_id] = lookahead
                out.scheduled_cached_reqs.append(CachedRequestData(
                    req.request_id, req.block_table[had_blocks:], req.num_computed_tokens,
                    had_blocks))
                out.num_scheduled_tokens[req.request_id] = num_new
                budget -= num_new + lookahead
                i += 1

        # Then waiting requests, unless this step already had to preempt.
        while (
            self.waiting
            and budget > 0
            and not out.preempted_req_ids
            and len(self.running) < self.config.max_num_seqs
        ):
            req = self.waiting[0]
            cached = bm.find_cached_prefix(req) if req.num_computed_tokens == 0 else []
            num_cached = len(cached) * bm.block_size
            num_new = min(req.num_tokens - num_cached, budget)
            if not bm.allocate(req, num_new, cached):
                break  # FCFS: later requests wait behind this one
            self.waiting.popleft()
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_cached
                req.scheduled_time = time.monotonic()
            req.num_computed_tokens = num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled_new_reqs.append(NewRequestData.from_request(req))
            out.num_scheduled_tokens[req.request_id] = num_new
            budget -= num_new

        out.finished_req_ids, self._finished_req_ids = self._finished_req_ids, set()
        out.finished_req_ids.update(out.preempted_req_ids)
        out.num_touched_blocks = bm.num_touched_blocks
        return out

    def _num_drafts(self, req: Request, room: int) -> int:
        """How many tokens a decoding sequence may draft: at most `room`, none past its
        max_tokens (nor, so, past the context); 0 while its acceptance record pauses it."""
        assert self.spec_policy is not None
        num_out = len(req.output_token_ids)
        k = min(self.num_spec_tokens, room, req.max_tokens - num_out - 1)
        return k if k > 0 and self.spec_policy.allows(req.drafts, num_out) else 0

    def _propose(self, req: Request, room: int) -> list[int]:
        """n-gram drafts for a decoding sequence (`_num_drafts` of them at most), only what
        its grammar accepts."""
        assert self.proposer is not None
        k = self._num_drafts(req, room)
        if k == 0:
            return []
        drafts = self.proposer.propose(
            np.array(req.prompt_token_ids + req.output_token_ids, dtype=np.int64), k)
        if drafts and req.grammar is not None:
            drafts = drafts[: req.grammar.validate(drafts)]
        return drafts

    def update_from_output(
        self, sched: SchedulerOutput, result: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        """Account the computed tokens, append the sampled ones, apply the token-level stop
        rules and free what finished. One entry per request that sampled."""
        for req_id, n in sched.num_scheduled_tokens.items():
            self.requests[req_id].num_computed_tokens += n
        now = time.monotonic()
        lp = result.logprobs
        outputs = []
        row = 0  # of the logprobs: a request's sampled tokens are consecutive
        for req_id, new_ids in zip(result.req_ids, result.sampled_token_ids):
            req = self.requests[req_id]
            rows = range(row, row + len(new_ids))
            row += len(new_ids)
            drafts = sched.scheduled_spec_decode_tokens.get(req_id)
            if drafts is not None:
                self._settle_drafts(req, len(drafts), len(new_ids) - 1)
            new_lps = [lp.logprobs[r] for r in rows] if lp is not None else []
            top = None
            k = req.params.logprobs
            if k is not None:  # k == 0: only the sampled token's logprob
                top = [([], [])] * len(new_ids)
                if k and lp is not None and lp.topk_token_ids is not None:
                    assert lp.topk_logprobs is not None
                    top = [(lp.topk_token_ids[r][:k], lp.topk_logprobs[r][:k]) for r in rows]
            if req.first_token_time is None:
                req.first_token_time = now
            req.last_token_time = now
            accepted: list[int] = []
            error = None
            for token in new_ids:  # one at a time: a run ends where plain decoding would
                req.output_token_ids.append(token)
                accepted.append(token)
                stopped = self._check_stop(req, token)
                if req.grammar is not None:
                    # Structured outputs: the accepted tokens advance the grammar (once: the
                    # matcher counts what it has consumed); the output ends where it does.
                    try:
                        req.grammar.advance(req.output_token_ids)
                        if req.grammar.is_finished and not req.is_finished:
                            self._finish(req, "stop", None)
                    except Exception as e:
                        error = e
                if stopped or req.is_finished or error is not None:
                    break
            outputs.append(EngineCoreOutput(
                req_id, accepted, new_lps[: len(accepted)],
                top[: len(accepted)] if top is not None else None,
                req.finish_reason, req.stop_reason, error))
        return outputs

    def _settle_drafts(self, req: Request, num_drafts: int, num_accepted: int) -> None:
        """After a verify step: the rejected drafts' K/V are no longer part of the sequence
        (recomputed tokens, the blocks beyond the accepted tokens freed), and the counts."""
        assert self.spec_policy is not None
        req.num_computed_tokens -= num_drafts - num_accepted
        # The tokens now known: the accepted drafts and the sampled one (not yet appended).
        self.block_manager.free_blocks_after(req, req.num_tokens + num_accepted + 1)
        self.spec_stats.observe_draft(num_drafts, num_accepted)
        self.spec_policy.observe(req.drafts, len(req.output_token_ids), num_drafts,
                                 num_accepted)

    def _check_stop(self, req: Request, token: int) -> bool:
        num_out = len(req.output_token_ids)
        if num_out >= req.params.min_tokens:
            if token in req.eos_token_ids:
                self._finish(req, "stop", None)
                return True
            if token in req.params.stop_token_ids:
                self._finish(req, "stop", token)
                return True
        if num_out >= req.max_tokens:
            self._finish(req, "length", None)
            return True
        return False

    def finish_requests(self, req_ids: str | list[str], reason: str,
                        stop_reason: int | str | None = None) -> None:
        """End requests from outside (an abort, a stop string), wherever they are, freeing
        their blocks. Requests already finished are left as they are."""
        for req_id in [req_ids] if isinstance(req_ids, str) else req_ids:
            req = self.requests.get(req_id)
            if req is None:
                continue
            if req.status is RequestStatus.WAITING:
                self.waiting.remove(req)
            self._finish(req, reason, stop_reason)

    def _finish(self, req: Request, reason: str, stop_reason: int | str | None) -> None:
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        self.block_manager.free_request(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason
        req.finished_time = time.monotonic()
        del self.requests[req.request_id]
        self._finished_req_ids.add(req.request_id)

    def _preempt(self, req: Request) -> None:
        self.block_manager.free_request(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        logger.info("preempted request %s (KV cache full); it will be recomputed", req.request_id)
