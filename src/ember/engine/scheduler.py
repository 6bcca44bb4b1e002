"""Iteration-level scheduling under a token budget (vLLM v1's shape).

There are no prefill and decode phases: each step, every running request asks for the tokens
it has not computed yet (a prompt chunk, or one token when decoding) and gets as many as the
budget allows, running requests first in arrival order, then waiting ones. A long prompt is
thus split across steps (chunked prefill) and never stalls the decodes of others. When the
block pool runs dry the newest running request is preempted: its blocks are freed and it is
recomputed later.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from ember.config import EngineConfig
from ember.engine.block_manager import BlockManager
from ember.engine.request import Request, RequestStatus

logger = logging.getLogger("ember")


@dataclass
class SchedulerOutput:
    requests: list[Request] = field(default_factory=list)
    num_scheduled_tokens: list[int] = field(default_factory=list)  # per request, same order
    preempted: list[Request] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.requests


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add_request(self, req: Request) -> None:
        self.waiting.append(req)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager

        # Running requests first, oldest first; preempt from the newest end.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not bm.allocate(req, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.requests.append(req)
                out.num_scheduled_tokens.append(num_new)
                budget -= num_new
                i += 1

        # Then waiting requests, unless this step already had to preempt.
        while (
            self.waiting
            and budget > 0
            and not out.preempted
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
            out.requests.append(req)
            out.num_scheduled_tokens.append(num_new)
            budget -= num_new
        return out

    def _preempt(self, req: Request) -> None:
        self.block_manager.free_request(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        logger.info("preempted request %s (KV cache full); it will be recomputed", req.request_id)

    def finish(self, req: Request, reason: str, stop_reason: int | str | None = None) -> None:
        """Remove a request wherever it is and free its blocks."""
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status is RequestStatus.WAITING:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        else:
            return
        self.block_manager.free_request(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason
        req.finished_time = time.monotonic()
