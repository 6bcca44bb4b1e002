"""The engine loop: add_request / abort_request / step.

One `step()` = schedule (a `SchedulerOutput`) -> one forward + sample (a `ModelRunnerOutput`)
-> the scheduler appends the tokens, applies the token-level stop rules and frees what
finished -> the engine detokenizes, checks stop strings and emits one delta `RequestOutput` per
request that advanced. A request with n > 1 is fanned out into n child sequences that share
the prompt's KV blocks through the prefix cache; its deltas gather the children that advanced.
A greedy request's n completions are one sequence's: greedy decoding is deterministic and each
sequence's tokens do not depend on its batch, so one child is computed and its deltas are
output n times (n times less compute and KV cache than n identical sequences).
"""

from __future__ import annotations

import copy
import logging
import random
import secrets
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ember.config import EngineConfig, resolve_device
from ember.engine.block_manager import BlockManager
from ember.engine.cost import CostMeter, CostRates
from ember.engine.detokenizer import IncrementalDetokenizer, TokenBytes
from ember.engine.input_processor import InputProcessor, ProcessedRequest
from ember.engine.model_runner import load_runner
from ember.engine.request import Request
from ember.engine.scheduler import EngineCoreOutput, Scheduler
from ember.engine.spec_decode.draft_model import open_draft
from ember.engine.spec_decode.metrics import SpecDecodingStats
from ember.errors import InvalidRequestError
from ember.loading.loader import open_model, resolve_precision
from ember.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from ember.sampling_params import SamplingParams
from ember.structured_output import GrammarCompiler, start_step_masks

logger = logging.getLogger("ember")


def engine_rng(seed: int | None) -> random.Random:
    """Where unseeded requests get their seeds: `seed`, or fresh OS entropy at every start."""
    return random.Random(secrets.randbits(64) if seed is None else seed)


@dataclass
class _Parent:
    """A user request: its prompt and its n child sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    detokenizers: list[IncrementalDetokenizer]
    copies: int = 1  # completions per child: n for a greedy request's one child, else 1
    arrival_time: float = field(default_factory=time.monotonic)
    started: bool = False  # a child has been scheduled

    @property
    def finished(self) -> bool:
        return all(c.is_finished for c in self.children)


@dataclass
class EngineStats:
    num_running: int  # sequences
    num_waiting: int  # sequences
    kv_blocks_total: int
    kv_blocks_free: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    num_queued_requests: int = 0  # requests none of whose sequences has started
    spec_decoding: SpecDecodingStats | None = None  # cumulative; with speculative decoding

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        from ember.distributed.parallel_state import TensorParallelGroup, parallel_plan
        from ember.distributed.tensor_parallel import check_shardable

        self.config = config
        plan = parallel_plan(config)  # refuses a bad backend or device count before loading
        if plan is not None and plan.is_worker:
            # A rank > 0 under torchrun: serve rank 0's steps, never return.
            from ember.distributed.worker import run_launched_worker

            raise SystemExit(run_launched_worker(plan, config))
        self.device = plan.device if plan is not None else resolve_device(config.device)
        self.dtype, self.quantization = resolve_precision(
            config, self.device, plan.world_size if plan is not None else 1)
        ckpt, self.max_model_len = open_model(config.model, self.dtype, config.max_model_len,
                                              self.quantization)
        self.model_config = ckpt.config
        self.tokenizer = ckpt.tokenizer
        self.parallel: TensorParallelGroup | None = None
        if plan is not None:
            check_shardable(ckpt.config, plan.world_size)  # before starting any worker
            self.parallel = TensorParallelGroup.start(plan, config)
            # Dropped without shutdown(): still stop the workers and leave the group.
            weakref.finalize(self, self.parallel.shutdown)
        spec = config.speculative_config
        # Draft-model speculation: the draft's KV cache mirrors the target's blocks and shares
        # the KV budget with it.
        draft = (open_draft(config, ckpt, self.device, self.max_model_len)
                 if spec is not None and spec.method == "draft_model" else None)
        try:
            self.runner = load_runner(config, ckpt, self.max_model_len, self.device, self.dtype,
                                      self.parallel, self.quantization,
                                      draft.kv_bytes_per_block() if draft is not None else 0)
            if draft is not None:
                self.runner.drafter = draft.load(self.device, self.max_model_len,
                                                 self.runner.num_blocks)
        except BaseException as e:
            reason = self._parallel_failure()
            self.shutdown()
            if reason is not None:
                raise RuntimeError(f"tensor parallelism failed while loading: {reason}") from e
            raise
        self.model = self.runner.model
        num_blocks = self.runner.num_blocks
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        logger.info(
            "KV cache: %d blocks = %d tokens (block size %d, %s); max_model_len %d, "
            "max_num_seqs %d, max_num_batched_tokens %d, prefix caching %s",
            num_blocks, num_blocks * config.block_size, config.block_size,
            str(self.runner.kv_caches[0][0].dtype).removeprefix("torch."), self.max_model_len,
            config.max_num_seqs,
            config.max_num_batched_tokens, "on" if config.enable_prefix_caching else "off",
        )
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size)
        self.input_processor = InputProcessor(
            self.tokenizer, self.model_config.vocab_size, self.max_model_len, num_blocks,
            config.block_size, self.grammars)
        self.token_bytes = TokenBytes(self.tokenizer)
        self.cost = CostMeter(CostRates.from_config(config), self.device)
        self._rng = engine_rng(config.seed)
        self._parents: dict[str, _Parent] = {}
        self._children: dict[str, tuple[_Parent, int]] = {}
        self._num_queued = 0  # parents none of whose children has been scheduled

    @classmethod
    def from_engine_args(cls, **kwargs) -> "LLMEngine":
        return cls(EngineConfig.from_kwargs(**kwargs))

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (idempotent; the engine is unusable after)."""
        if self.parallel is not None:
            self.parallel.shutdown()

    def _parallel_failure(self) -> str | None:
        """After a failure half-way through loading or a step (the ranks are out of step):
        why the tensor-parallel group broke, if it did; the watchdog may need a moment."""
        if self.parallel is None:
            return None
        self.parallel.broken = True
        return self.parallel.failure(wait_s=1.0)

    def on_failure(self, callback: Callable[[str], None]) -> None:
        """Call `callback(reason)`, from another thread, if a tensor-parallel rank dies."""
        if self.parallel is not None:
            self.parallel.on_failure(callback)

    # ---- requests ------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int] | ProcessedRequest,
        params: SamplingParams | None = None,
    ) -> None:
        """Queue a request. A `ProcessedRequest` (from `input_processor.process`, which the
        server runs off the engine thread) is taken as it is; anything else is processed here."""
        if request_id in self._parents:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, ProcessedRequest):
            processed = prompt
        else:
            processed = self.input_processor.process(prompt, params or SamplingParams())
        params, ids = processed.params, processed.prompt_token_ids
        eos = () if params.ignore_eos else self.tokenizer.eos_token_ids
        children, detoks = [], []
        copies = params.n if params.is_greedy else 1
        for i in range(params.n // copies):
            seed = (
                hash((params.seed, i)) & (2**63 - 1)
                if params.seed is not None
                else self._rng.getrandbits(63)
            )
            child = Request(
                request_id=request_id if params.n == 1 else f"{request_id}#{i}",
                prompt_token_ids=ids, params=params, seed=seed, max_tokens=processed.max_tokens,
                eos_token_ids=eos,
                grammar=processed.grammar.new_matcher() if processed.grammar else None,
            )
            children.append(child)
            detoks.append(IncrementalDetokenizer(
                self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens,
                stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output,
                min_tokens=params.min_tokens,
            ))
        parent = _Parent(request_id, processed.prompt, ids, children, detoks, copies=copies)
        self._parents[request_id] = parent
        self._num_queued += 1
        for i, child in enumerate(children):
            child.arrival_time = parent.arrival_time
            self._children[child.request_id] = (parent, i)
            self.scheduler.add_request(child)

    def abort_request(self, request_id: str) -> None:
        parent = self._parents.get(request_id)
        if parent is None:
            return
        self.scheduler.finish_requests([c.request_id for c in parent.children], "abort")
        self._forget(parent)

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    # ---- the loop --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One step; a delta RequestOutput for every request that advanced or finished."""
        cost_start = self.cost.read()  # cost accounting: the step's start (engine/cost.py)
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        scheduled = [(self.scheduler.requests[r], n) for r, n in sched.num_scheduled_tokens.items()]
        # Structured outputs: the sampling sequences' grammar masks, computed during the step.
        start_step_masks(scheduled)
        charged = [(req, req.num_computed_tokens, n) for req, n in scheduled]
        try:
            result = self.runner.execute(sched)
        except BaseException as e:
            reason = self._parallel_failure()
            if reason is not None:
                raise RuntimeError(f"tensor parallelism failed: {reason}") from e
            raise
        for new in sched.scheduled_new_reqs:
            parent = self._children[new.req_id][0]
            if not parent.started:
                parent.started = True
                self._num_queued -= 1
        core_outputs = self.scheduler.update_from_output(sched, result)
        # Cost accounting: this step's CPU time, wall time and energy to its requests.
        self.cost.charge(cost_start, charged, busy=bool(self.scheduler.requests))
        return self._process_outputs(core_outputs)

    def _process_outputs(self, core_outputs: list[EngineCoreOutput]) -> list[RequestOutput]:
        advanced: dict[str, tuple[_Parent, list[CompletionOutput]]] = {}
        failed: dict[str, tuple[_Parent, Exception]] = {}
        for co in core_outputs:
            parent, index = self._children[co.req_id]
            if parent.request_id in failed:
                continue
            # A failure here concerns this request alone (its tokens, its detokenizer):
            # it fails, the batch goes on.
            try:
                delta = self._completion_delta(parent, index, co)
            except Exception as e:
                failed[parent.request_id] = (parent, e)
                advanced.pop(parent.request_id, None)
                continue
            completions = advanced.setdefault(parent.request_id, (parent, []))[1]
            completions.append(delta)
            completions.extend(
                replace(delta, index=i, token_ids=list(delta.token_ids),
                        logprobs=list(delta.logprobs) if delta.logprobs is not None else None)
                for i in range(1, parent.copies))
        outputs = []
        for parent, completions in advanced.values():
            outputs.append(self._make_output(parent, completions))
            if parent.finished:
                self._forget(parent)
        for parent, error in failed.values():
            outputs.append(self._fail_request(parent, error))
        return outputs

    def _completion_delta(self, parent: _Parent, index: int,
                          co: EngineCoreOutput) -> CompletionOutput:
        """What this step added to one sequence: tokens, text (stop strings checked) and
        logprobs."""
        req, detok = parent.children[index], parent.detokenizers[index]
        if co.error is not None:
            raise co.error
        token_ids, token_lps, top = co.new_token_ids, co.new_logprobs, co.new_top_logprobs
        finish, stop = co.finish_reason, co.stop_reason
        text, stop_str = "", None
        # One token at a time, as plain decoding feeds them: a verified run of several gives
        # the same text, and a stop string inside it ends the output at the same token.
        for i, token in enumerate(token_ids):
            # As vLLM: an EOS or stop token's text is not output (the token that completes a
            # structured output's grammar, also a "stop", is).
            if (i == len(token_ids) - 1 and finish == "stop"
                    and not req.params.include_stop_str_in_output
                    and (token in req.eos_token_ids or token == stop)):
                break
            delta, stop_str = detok.add_tokens([token])
            text += delta
            if stop_str is not None:
                token_ids, token_lps = token_ids[: i + 1], token_lps[: i + 1]
                top = top[: i + 1] if top is not None else None
                break
        for lp in token_lps:
            req.cumulative_logprob += lp
        if stop_str is not None:
            self.scheduler.finish_requests(co.req_id, "stop", stop_str)
            # Also when max_tokens ended it at the same token: the stop string wins.
            finish, stop = req.finish_reason, req.stop_reason = "stop", stop_str
        if finish is not None:
            text += detok.finish()
        logprobs = None
        if top is not None:
            logprobs = []
            for tok, lp, (tids, tlps) in zip(token_ids, token_lps, top):
                entry = {t: Logprob(l, r + 1, self.token_bytes.text(t))
                         for r, (t, l) in enumerate(zip(tids, tlps))}
                if tok not in entry:
                    entry[tok] = Logprob(lp, None, self.token_bytes.text(tok))
                logprobs.append(entry)
        return CompletionOutput(index=index, text=text, token_ids=token_ids,
                                cumulative_logprob=req.cumulative_logprob, logprobs=logprobs,
                                finish_reason=finish, stop_reason=stop)

    def _forget(self, parent: _Parent) -> None:
        if self._parents.pop(parent.request_id, None) is not None and not parent.started:
            self._num_queued -= 1
        for c in parent.children:
            self._children.pop(c.request_id, None)

    def _fail_request(self, parent: _Parent, error: Exception) -> RequestOutput:
        """Abort one request after an error of its own; its output carries the error."""
        logger.error("request %s failed", parent.request_id, exc_info=error)
        self.scheduler.finish_requests([c.request_id for c in parent.children], "abort")
        self._forget(parent)
        return RequestOutput(
            request_id=parent.request_id, prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=[CompletionOutput(index=i, text="", token_ids=[], finish_reason="abort")
                     for i in range(len(parent.children) * parent.copies)],
            finished=True, error=f"{type(error).__name__}: {error}",
        )

    def _make_output(self, parent: _Parent, completions: list[CompletionOutput]) -> RequestOutput:
        children = parent.children
        finished = parent.finished
        metrics = RequestMetrics(
            arrival_time=parent.arrival_time,
            first_scheduled_time=min((c.scheduled_time for c in children
                                      if c.scheduled_time is not None), default=None),
            first_token_time=min((c.first_token_time for c in children
                                  if c.first_token_time is not None), default=None),
            last_token_time=max((c.last_token_time for c in children
                                 if c.last_token_time is not None), default=None),
            finished_time=max(c.finished_time or 0.0 for c in children) if finished else None,
            num_preemptions=sum(c.num_preemptions for c in children),
            cost=self.cost.cost([c.cost for c in children]),
        )
        return RequestOutput(
            request_id=parent.request_id, prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids, outputs=completions,
            finished=finished, num_cached_tokens=max(children[0].num_cached_tokens, 0),
            metrics=metrics,
        )

    # ---- introspection -------------------------------------------------------------------
    def get_stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_blocks_total=bm.num_blocks, kv_blocks_free=bm.num_free_blocks,
            kv_cache_usage=bm.usage, prefix_cache_queries=bm.prefix_queries,
            prefix_cache_hits=bm.prefix_hits, num_preemptions=self.scheduler.num_preemptions,
            num_queued_requests=self._num_queued,
            spec_decoding=(copy.deepcopy(self.scheduler.spec_stats)
                           if self.config.speculative_config is not None else None),
        )
