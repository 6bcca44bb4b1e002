"""Turns a `SchedulerOutput` into one forward pass and one sampling call.

The runner keeps its own state of every request it runs (`CachedRequestState`: tokens, block
table, sampling parameters), created from the scheduler's `NewRequestData`, updated from its
`CachedRequestData` and dropped for its `finished_req_ids`; it appends the tokens it samples.
Host-side work per step: flatten the scheduled tokens of every request, map each token to its
KV slot through its block table, describe the attention pattern (a `StepInput`), run the model,
sample for the requests that reached the end of their known tokens, and answer with a
`ModelRunnerOutput` of request ids and sampled tokens.

A sequence with drafted tokens (speculative decoding) is, to attention, a chunk of 1 + k
tokens whose context is in the cache; it samples at every one of those rows, each row as a
plain decode step at that position would (its own noise position, penalties and min_tokens
over the drafts before it, its grammar state after them), and keeps the drafts up to the
first one its sample differs from, plus that sample (`accept_drafts`).

With a draft model (`speculative_config` method `draft_model`), the runner's `drafter`
(engine/spec_decode/draft_model.py) runs first in each step: it brings the draft's own KV
cache up to the step's tokens and proposes the drafts the scheduler left room for, which the
step then verifies as above.

Under tensor parallelism rank 0 broadcasts each `StepInput` to the other ranks, every rank runs
`forward` on its shard, and the logits are gathered on rank 0, which alone samples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from ember.config import EngineConfig, ModelConfig
from ember.errors import ConfigError
from ember.distributed.tensor_parallel import gather_logits, shard_config
from ember.engine.scheduler import LogprobsLists, ModelRunnerOutput, SchedulerOutput
from ember.layers.attention import AttentionMetadata
from ember.layers.sampler import Sampler, SamplingMetadata, SamplingRow
from ember.compilation import compile_model
from ember.loading.loader import Checkpoint, load_model
from ember.sampling_params import SamplingParams

if TYPE_CHECKING:
    from ember.distributed.parallel_state import TensorParallelGroup
    from ember.structured_output.matcher import RequestMatcher

logger = logging.getLogger("ember")

DEFAULT_CPU_KV_BYTES = 2 << 30  # like vLLM's CPU default (VLLM_CPU_KVCACHE_SPACE), but 2 GiB


@dataclass
class CachedRequestState:
    """The runner's copy of one running request."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: SamplingParams
    seed: int
    eos_token_ids: tuple[int, ...]
    block_table: list[int]
    num_computed_tokens: int
    grammar: "RequestMatcher | None" = None  # structured outputs (NewRequestData.grammar)
    num_prompt_tokens: int = field(init=False)
    # Draft-model speculation: tokens whose K/V the draft's cache holds (the target's prefix-
    # cache hits included: both models fill every block in the same step).
    num_draft_computed: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.num_draft_computed = self.num_computed_tokens

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + len(self.output_token_ids)

    def token_id_at(self, i: int) -> int:
        n = self.num_prompt_tokens
        return self.prompt_token_ids[i] if i < n else self.output_token_ids[i - n]

    def token_ids(self, start: int, end: int) -> list[int]:
        n = self.num_prompt_tokens
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]


class Drafter(Protocol):
    """Draft-model speculation's proposer (spec_decode/draft_model.py), run first in a step:
    brings its own KV cache up to the step's tokens and writes the drafts into `sched`."""

    def propose(self, sched: SchedulerOutput,
                requests: dict[str, CachedRequestState]) -> None: ...


def sampling_row(r: CachedRequestState, drafts: list[int],
                 grammar_mask: torch.Tensor | None = None,
                 grammar: "RequestMatcher | None" = None) -> SamplingRow:
    """The row that samples r's next token after `drafts` (as output already): its noise
    position, penalties and min_tokens see them."""
    p = r.params
    output = r.output_token_ids + drafts if drafts else r.output_token_ids
    banned: list[int] = []
    if len(output) < p.min_tokens:
        banned = list(r.eos_token_ids) + list(p.stop_token_ids)
    return SamplingRow(p, r.seed, r.prompt_token_ids, output, banned, grammar, grammar_mask)


def accept_drafts(drafts: list[int], sampled: list[int]) -> list[int]:
    """The tokens a verified sequence gains: its drafts while the target's sample at each
    position agrees, then the target's sample at the first disagreement (or after the last
    draft).

    Each row's sample is what plain decoding would draw there: greedy, its argmax; with
    temperature, the exponential race argmax(p / E) over the request's noise for that
    position. Against a point-mass draft t this is exact rejection sampling: t is kept with
    probability p(t), and when the race is won by another token, that token is distributed
    as p with t removed, renormalised. So the output is distributed as the target's, and a
    seeded request gives the very tokens it gives without speculation.
    """
    n = 0
    while n < len(drafts) and sampled[n] == drafts[n]:
        n += 1
    return sampled[: n + 1]


@dataclass
class StepInput:
    """One step's batch, on the host: what rank 0 broadcasts to the other ranks."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn: AttentionMetadata
    sample_rows: list[int]  # rows whose logits are sampled
    num_touched_blocks: int  # KV blocks handed out so far: the ones to zero first


def kv_cache_dtype(config: EngineConfig, dtype: torch.dtype) -> torch.dtype:
    """The KV cache's element type (--kv-cache-dtype) under activations of `dtype`: theirs
    (auto), or float32 / bfloat16, never wider than the activations."""
    if config.kv_cache_dtype == "auto":
        return dtype
    kv = getattr(torch, config.kv_cache_dtype)
    if kv.itemsize > dtype.itemsize:
        raise ConfigError(f"kv_cache_dtype {config.kv_cache_dtype} is wider than the "
                          f"{str(dtype).removeprefix('torch.')} activations; use auto")
    return kv


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


def num_kv_blocks(
    config: EngineConfig, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
    max_model_len: int, extra_bytes_per_block: int = 0,
) -> int:
    """Blocks that fit the KV budget; `extra_bytes_per_block`: a draft model's cache, which
    mirrors the target's blocks, shares it."""
    per_block = (kv_bytes_per_block(cfg, config.block_size, kv_cache_dtype(config, dtype))
                 + extra_bytes_per_block)
    budget = config.kv_cache_memory
    if budget is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = int(0.9 * free)
        else:
            budget = DEFAULT_CPU_KV_BYTES
            # No use reserving more than every sequence at full length could fill.
            budget = min(budget, config.max_num_seqs * (max_model_len + config.block_size)
                         // config.block_size * per_block)
    elif budget <= 1:  # a fraction of free memory
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
        else:
            import os

            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        budget = int(budget * free)
    return max(int(budget) // per_block, 1)


def load_runner(
    config: EngineConfig, ckpt: Checkpoint, max_model_len: int, device: torch.device,
    dtype: torch.dtype, tp: "TensorParallelGroup | None" = None, quantization: str = "none",
    extra_kv_bytes_per_block: int = 0, num_blocks: int | None = None,
) -> "ModelRunner":
    """Load the model (this rank's shard) and size its KV cache (the same on every rank):
    `num_blocks` blocks when given (a draft model's, as many as the target's), else what
    the budget holds beside `extra_kv_bytes_per_block` (a draft model's) per block."""
    model = load_model(ckpt, dtype, device, max_model_len, tp, quantization,
                       config.int4_group_size)
    world = tp.world_size if tp is not None else 1
    if num_blocks is None:
        num_blocks = num_kv_blocks(config, shard_config(ckpt.config, world), dtype, device,
                                   max_model_len, extra_kv_bytes_per_block)
    if tp is not None:
        num_blocks = tp.min_over_ranks(num_blocks)
    runner = ModelRunner(model, ckpt.config, config, num_blocks, device, dtype, tp)
    if config.enforce_eager:
        logger.info("eager mode (--enforce-eager): no torch.compile")
    elif world > 1:  # the all-reduce hooks would break the graph
        logger.info("tensor parallelism runs eager (torch.compile is single-rank for now)")
    elif model.fused_decode is not None:
        logger.info("every step runs in one call of the CPU kernels: no graph to compile")
    else:
        compile_model(model, runner.kv_caches)
    return runner


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        model_config: ModelConfig,
        config: EngineConfig,
        num_blocks: int,
        device: torch.device,
        dtype: torch.dtype,
        tp: "TensorParallelGroup | None" = None,
    ) -> None:
        self.model = model
        self.model_config = model_config
        self.config = config
        self.num_blocks = num_blocks
        self.device = device
        self.tp = tp
        self.block_size = config.block_size
        self.sampler = Sampler()
        slots = num_blocks * config.block_size
        # This rank's KV heads (all of them without tensor parallelism).
        kv_heads = shard_config(model_config, tp.world_size if tp else 1).num_key_value_heads
        shape = (slots, kv_heads, model_config.head_dim)
        # Allocated untouched (no page is faulted in until used) and zeroed block by block
        # as the pool first hands blocks out: masked-out keys still enter the attention
        # matmul, and 0 * NaN is NaN.
        kv_dtype = kv_cache_dtype(config, dtype)
        self.kv_caches = [
            (torch.empty(shape, dtype=kv_dtype, device=device),
             torch.empty(shape, dtype=kv_dtype, device=device))
            for _ in range(model_config.num_hidden_layers)
        ]
        self._num_zeroed_blocks = 0
        self.requests: dict[str, CachedRequestState] = {}
        self.drafter: Drafter | None = None  # draft-model speculation

    def prepare_blocks(self, num_touched_blocks: int) -> None:
        """Zero the blocks the pool has handed out for the first time since the last step."""
        if num_touched_blocks > self._num_zeroed_blocks:
            start = self._num_zeroed_blocks * self.block_size
            end = num_touched_blocks * self.block_size
            for k_cache, v_cache in self.kv_caches:
                k_cache[start:end].zero_()
                v_cache[start:end].zero_()
            self._num_zeroed_blocks = num_touched_blocks

    # ---- batch description --------------------------------------------------------------
    def _slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """KV slots of token positions [start, end) of one sequence."""
        pos = torch.arange(start, end)
        table = torch.tensor(block_table, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _update_states(self, sched: SchedulerOutput) -> None:
        for req_id in sched.finished_req_ids:
            self.requests.pop(req_id, None)
        for new in sched.scheduled_new_reqs:
            self.requests[new.req_id] = CachedRequestState(
                new.req_id, new.prompt_token_ids, new.output_token_ids, new.params, new.seed,
                new.eos_token_ids, new.block_ids, new.num_computed_tokens, new.grammar)
        for cached in sched.scheduled_cached_reqs:
            state = self.requests[cached.req_id]
            del state.block_table[cached.num_kept_blocks:]  # freed after rejected drafts
            state.block_table.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    def _prepare(self, sched: SchedulerOutput) -> tuple[StepInput, list[CachedRequestState]]:
        """The step's batch, and the requests that sample in it (in row order)."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        sample_rows: list[int] = []
        sampled: list[CachedRequestState] = []
        # Attention: each sequence's query rows, length after the step and blocks.
        query_lens: list[int] = []
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        for req_id, n in sched.num_scheduled_tokens.items():
            r = self.requests[req_id]
            drafts = sched.scheduled_spec_decode_tokens.get(req_id, [])
            start, row = r.num_computed_tokens, len(input_ids)
            if n == 1:  # plain Python: cheaper than tensor ops for one decode row
                input_ids.append(r.token_id_at(start))
                positions.append(start)
                slot_mapping.append(r.block_table[start // bs] * bs + start % bs)
            else:
                positions.extend(range(start, start + n))
                input_ids.extend(r.token_ids(start, start + n - len(drafts)) + drafts)
                slot_mapping.extend(self._slots(r.block_table, start, start + n).tolist())
            query_lens.append(n)
            seq_lens.append(start + n)
            tables.append(r.block_table)
            if start + n == r.num_tokens + len(drafts):  # a verify step samples every draft's row
                sample_rows.extend(range(row + n - 1 - len(drafts), row + n))
                sampled.append(r)
        meta = AttentionMetadata.build(slot_mapping, query_lens, seq_lens, tables, bs)
        step = StepInput(torch.tensor(input_ids, dtype=torch.long), torch.tensor(positions),
                         meta, sample_rows, sched.num_touched_blocks)
        return step, sampled

    def _sampling_metadata(self, reqs: list[CachedRequestState],
                           drafts: list[list[int]]) -> SamplingMetadata:
        """One row per sampled position: a verified sequence's rows see its drafts before
        them as output (noise position, penalties, min_tokens, grammar state)."""
        rows = []
        for r, d in zip(reqs, drafts):
            masks = r.grammar.draft_masks(d) if d and r.grammar is not None else None
            for j in range(len(d) + 1):
                rows.append(sampling_row(r, d[:j], masks[j] if masks is not None else None,
                                         r.grammar if masks is None else None))
        return SamplingMetadata.build(rows, self.model_config.vocab_size, self.device)

    # ---- one step -----------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(sched)
        if self.drafter is not None:
            self.drafter.propose(sched, self.requests)
        step, sampled = self._prepare(sched)
        if self.tp is not None:
            self.tp.broadcast_step(step)
        logits = self.forward(step)
        if logits is None:
            return ModelRunnerOutput([], [])
        spec = sched.scheduled_spec_decode_tokens
        drafts = [spec.get(r.req_id, []) for r in sampled]
        out = self.sampler(logits, self._sampling_metadata(sampled, drafts))
        token_ids = out.sampled_token_ids.tolist()
        if not spec:  # one row per request
            kept_rows = None
            new_ids = [[t] for t in token_ids]
        else:
            kept_rows, new_ids, row = [], [], 0
            for d in drafts:
                new_ids.append(accept_drafts(d, token_ids[row : row + len(d) + 1]))
                kept_rows.extend(range(row, row + len(new_ids[-1])))
                row += len(d) + 1
        for r, ids in zip(sampled, new_ids):
            r.output_token_ids.extend(ids)

        def rows(t: torch.Tensor | None) -> list | None:
            if t is None:
                return None
            return (t if kept_rows is None else t[torch.tensor(kept_rows)]).tolist()

        logprobs = LogprobsLists(rows(out.logprobs), rows(out.topk_token_ids),
                                 rows(out.topk_logprobs))
        return ModelRunnerOutput([r.req_id for r in sampled], new_ids, logprobs)

    @torch.inference_mode()
    def forward(self, step: StepInput) -> torch.Tensor | None:
        """Run the model on one step (every rank does): the sampled rows' float32 logits,
        on rank 0 only."""
        self.prepare_blocks(step.num_touched_blocks)
        dev = self.device
        hidden = self.model(step.input_ids.to(dev), step.positions.to(dev), self.kv_caches,
                            step.attn.to(dev))
        if not step.sample_rows:
            return None
        if len(step.sample_rows) < hidden.shape[0]:  # a decode step samples every row
            hidden = hidden[torch.tensor(step.sample_rows, device=dev)]
        logits = self.model.compute_logits(hidden)
        if self.tp is not None:
            logits = gather_logits(logits, self.model_config.vocab_size, self.tp.rank,
                                   self.tp.world_size)
        return logits
