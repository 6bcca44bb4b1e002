"""The engine loop: add_request / abort_request / step.

One `step()` = schedule -> one forward + sample -> append tokens, detokenize, check stops,
free finished requests -> RequestOutputs for every request that advanced.
A request with n > 1 is fanned out into n child sequences that share the prompt's KV blocks
through the prefix cache; its RequestOutput gathers the children.
"""

from __future__ import annotations

import logging
import random
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ember.config import EngineConfig
from ember.engine.block_manager import BlockManager
from ember.engine.detokenizer import IncrementalDetokenizer
from ember.engine.model_runner import load_runner
from ember.engine.request import Request, RequestStatus
from ember.engine.scheduler import Scheduler
from ember.errors import InvalidRequestError, QueueFullError
from ember.loading.loader import open_model, resolve_precision
from ember.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from ember.sampling_params import SamplingParams
from ember.structured_output import GrammarCompiler, start_step_masks

logger = logging.getLogger("ember")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class _Parent:
    """A user request: its prompt and its n child sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    detokenizers: list[IncrementalDetokenizer]
    arrival_time: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> bool:
        return all(c.is_finished for c in self.children)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_free: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int

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
        try:
            self.runner = load_runner(config, ckpt, self.max_model_len, self.device, self.dtype,
                                      self.parallel, self.quantization)
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
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size)
        logger.info(
            "KV cache: %d blocks = %d tokens (block size %d, %s); max_model_len %d, "
            "max_num_seqs %d, max_num_batched_tokens %d, prefix caching %s",
            num_blocks, num_blocks * config.block_size, config.block_size,
            str(self.dtype).removeprefix("torch."), self.max_model_len, config.max_num_seqs,
            config.max_num_batched_tokens, "on" if config.enable_prefix_caching else "off",
        )
        self._rng = random.Random(config.seed)
        self._parents: dict[str, _Parent] = {}
        self._children: dict[str, tuple[_Parent, int]] = {}

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
    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Raise InvalidRequestError if the request cannot be served; return its max_tokens."""
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("the prompt is empty")
        vocab = self.model_config.vocab_size
        for what, ids in (("prompt", prompt_token_ids), ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in ids or () if not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError(
                    f"{what} token id {bad[0]} is outside the vocabulary [0, {vocab})"
                )
        if n >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {n} tokens, but max_model_len is {self.max_model_len} "
                f"(the prompt plus at least one generated token must fit)"
            )
        room = self.max_model_len - n
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        if params.prompt_logprobs is not None:
            raise InvalidRequestError("prompt_logprobs is not supported")
        bad = [t for t in params.logit_bias or () if t >= vocab]
        if bad:
            raise InvalidRequestError(
                f"logit_bias token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if params.structured_outputs is not None:
            self.grammars.compile(params.structured_outputs)  # refuses a bad one; cached
        need = self.block_manager.blocks_needed(n + max_tokens)
        if need > self.block_manager.num_blocks:
            raise InvalidRequestError(
                f"the request needs {need} KV blocks ({n} prompt + {max_tokens} new tokens) "
                f"but the cache has only {self.block_manager.num_blocks}"
            )
        return max_tokens

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
    ) -> None:
        params = params or SamplingParams()
        if request_id in self._parents:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        limit = self.config.max_queued_requests
        if limit is not None and len(self.scheduler.waiting) >= limit:
            raise QueueFullError(
                f"the waiting queue is full ({limit} requests, max_queued_requests)"
            )
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt)
        max_tokens = self.validate_prompt(ids, params)
        eos = () if params.ignore_eos else self.tokenizer.eos_token_ids
        grammar = (self.grammars.compile(params.structured_outputs)
                   if params.structured_outputs is not None else None)
        children, detoks = [], []
        for i in range(params.n):
            seed = (
                hash((params.seed, i)) & (2**63 - 1)
                if params.seed is not None
                else self._rng.getrandbits(63)
            )
            child = Request(
                request_id=request_id if params.n == 1 else f"{request_id}#{i}",
                prompt_token_ids=ids, params=params, seed=seed, max_tokens=max_tokens,
                eos_token_ids=eos, grammar=grammar.new_matcher() if grammar else None,
            )
            children.append(child)
            detoks.append(IncrementalDetokenizer(
                self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens,
                stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output,
                min_tokens=params.min_tokens,
            ))
        parent = _Parent(request_id, text, ids, children, detoks)
        self._parents[request_id] = parent
        for i, child in enumerate(children):
            child.arrival_time = parent.arrival_time
            self._children[child.request_id] = (parent, i)
            self.scheduler.add_request(child)

    def abort_request(self, request_id: str) -> None:
        parent = self._parents.get(request_id)
        if parent is None:
            return
        for child in parent.children:
            self.scheduler.finish(child, "abort")
        self._forget(parent)

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._parents)

    # ---- the loop --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        self.runner.prepare_blocks(self.block_manager.num_touched_blocks)
        # Structured outputs: the sampling sequences' grammar masks, computed during the step.
        start_step_masks(sched.requests, sched.num_scheduled_tokens)
        try:
            result = self.runner.execute(sched)
        except BaseException as e:
            reason = self._parallel_failure()
            if reason is not None:
                raise RuntimeError(f"tensor parallelism failed: {reason}") from e
            raise
        now = time.monotonic()
        for req, n in zip(sched.requests, sched.num_scheduled_tokens):
            req.num_computed_tokens += n
        touched: dict[str, _Parent] = {}
        failed: dict[str, Exception] = {}
        out = result.output
        if out is not None:
            ids = out.sampled_token_ids.tolist()
            lps = out.logprobs.tolist()
            top_ids = out.topk_token_ids.tolist() if out.topk_token_ids is not None else None
            top_lps = out.topk_logprobs.tolist() if out.topk_logprobs is not None else None
            for row, req in enumerate(result.sampled):
                parent, index = self._children[req.request_id]
                touched[parent.request_id] = parent
                if parent.request_id in failed:
                    continue
                # A failure here concerns this request alone (its tokens, its detokenizer):
                # it fails, the batch goes on.
                try:
                    req.output_token_ids.append(ids[row])
                    req.output_logprobs.append(lps[row])
                    if req.params.logprobs is not None:
                        k = req.params.logprobs  # 0: only the chosen token's logprob
                        req.output_top_logprobs.append(
                            (top_ids[row][:k], top_lps[row][:k]) if k else ([], []))
                    if req.first_token_time is None:
                        req.first_token_time = now
                    req.last_token_time = now
                    self._check_stop(req, parent.detokenizers[index])
                    if req.grammar is not None:
                        # Structured outputs: the accepted token advances the grammar (once:
                        # the matcher counts what it has consumed), and the output ends
                        # where the grammar does.
                        req.grammar.advance(req.output_token_ids)
                        if req.grammar.is_finished and not req.is_finished:
                            self._finish(req, parent.detokenizers[index], "stop", None)
                except Exception as e:
                    failed[parent.request_id] = e
        outputs = []
        for p in touched.values():
            error = failed.get(p.request_id)
            if error is None:
                try:
                    outputs.append(self._make_output(p))
                except Exception as e:
                    error = e
            if error is not None:
                outputs.append(self._fail_request(p, error))
            elif p.finished:
                self._forget(p)
        return outputs

    def _forget(self, parent: _Parent) -> None:
        self._parents.pop(parent.request_id, None)
        for c in parent.children:
            self._children.pop(c.request_id, None)

    def _fail_request(self, parent: _Parent, error: Exception) -> RequestOutput:
        """Abort one request after an error of its own; its output carries the error."""
        logger.error("request %s failed", parent.request_id, exc_info=error)
        for child in parent.children:
            self.scheduler.finish(child, "abort")
        self._forget(parent)
        return RequestOutput(
            request_id=parent.request_id, prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=[CompletionOutput(index=i, text="", token_ids=[], finish_reason="abort")
                     for i in range(len(parent.children))],
            finished=True, error=f"{type(error).__name__}: {error}",
        )

    def _check_stop(self, req: Request, detok: IncrementalDetokenizer) -> None:
        token = req.output_token_ids[-1]
        _, stop_str = detok.add_tokens([token])
        num_out = len(req.output_token_ids)
        if num_out >= req.params.min_tokens:
            if token in req.eos_token_ids:
                return self._finish(req, detok, "stop", None)
            if token in req.params.stop_token_ids:
                return self._finish(req, detok, "stop", token)
            if stop_str is not None:
                return self._finish(req, detok, "stop", stop_str)
        if num_out >= req.max_tokens:
            self._finish(req, detok, "length", None)

    def _finish(self, req: Request, detok: IncrementalDetokenizer, reason: str, stop) -> None:
        detok.finish()
        self.scheduler.finish(req, reason, stop)

    def _make_output(self, parent: _Parent) -> RequestOutput:
        completions = []
        for i, (req, detok) in enumerate(zip(parent.children, parent.detokenizers)):
            logprobs = None
            if req.params.logprobs is not None:
                logprobs = []
                for tok, lp, (tids, tlps) in zip(
                    req.output_token_ids, req.output_logprobs, req.output_top_logprobs
                ):
                    entry = {t: Logprob(l, rank=r + 1) for r, (t, l) in enumerate(zip(tids, tlps))}
                    if tok not in entry:
                        entry[tok] = Logprob(lp)
                    logprobs.append(entry)
            completions.append(CompletionOutput(
                index=i, text=detok.output_text, token_ids=list(req.output_token_ids),
                cumulative_logprob=sum(req.output_logprobs), logprobs=logprobs,
                finish_reason=req.finish_reason, stop_reason=req.stop_reason,
            ))
        first = parent.children[0]
        metrics = RequestMetrics(
            arrival_time=parent.arrival_time,
            first_scheduled_time=min((c.scheduled_time for c in parent.children
                                      if c.scheduled_time is not None), default=None),
            first_token_time=min((c.first_token_time for c in parent.children
                                  if c.first_token_time is not None), default=None),
            last_token_time=max((c.last_token_time for c in parent.children
                                 if c.last_token_time is not None), default=None),
            finished_time=first.finished_time if parent.finished else None,
            num_preemptions=sum(c.num_preemptions for c in parent.children),
        )
        return RequestOutput(
            request_id=parent.request_id, prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids, outputs=completions,
            finished=parent.finished, num_cached_tokens=max(first.num_cached_tokens, 0),
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
        )
