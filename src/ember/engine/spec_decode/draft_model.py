"""Draft-model speculation (vLLM's `draft_model` method): a model with the target's
vocabulary drafts k tokens per speculating sequence, in the engine's step, before the target
verifies them.

The draft is a smaller model, or the target itself in a cheaper precision (the default int4
model drafting for the float32 exactness mode). It has its own paged KV cache, with the
target's block size and block count, addressed through the target's block tables and slot
mapping: the block manager, the prefix cache and the rollback of rejected drafts serve both
models unchanged. That holds because the draft computes every token the target computes, in
the same step (`propose`, first pass): a block the prefix cache hands out was filled by both
models when it was first written. The draft's K/V at a rejected draft's slot is stale, like
the target's: it is recomputed before anything reads it.

Per step, `propose`:
1. one forward of the draft over every scheduled sequence's tokens that its cache lacks, up
   to where the target's cache will stand after the step: the prompt chunks and plain
   decodes of the step, and, for a speculating sequence, the tokens accepted in its last
   verify that the draft never saw (at most the last draft, when all k were accepted) and its
   last token, whose row samples the first draft;
2. k - 1 more one-row steps for the speculating sequences, each feeding the draft just made.

Each draft is sampled as the target's row at that position will be (`sampling_row`: the same
seeded noise, penalties and min_tokens, on the draft's logits): greedy requests draft the
draft model's argmax, sampling requests the draft's own sample with the target's noise.
Verification keeps a draft only where the target's sample equals it (`accept_drafts`), so
outputs stay the target's, token for token, whatever the draft proposes; sharing the noise
makes a close draft model agree wherever its distribution is close to the target's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ember.config import EngineConfig
from ember.engine.model_runner import (
    CachedRequestState, ModelRunner, StepInput, kv_bytes_per_block, kv_cache_dtype, load_runner,
    sampling_row)
from ember.engine.scheduler import SchedulerOutput
from ember.errors import ConfigError, ModelLoadError
from ember.layers.attention import AttentionMetadata
from ember.layers.sampler import SamplingMetadata
from ember.loading.loader import Checkpoint, open_model, resolve_precision


@dataclass
class DraftCheckpoint:
    """The drafting model, opened (config, tokenizer) but not loaded."""

    config: EngineConfig  # the target's, with the draft's model and precision
    ckpt: Checkpoint
    dtype: torch.dtype
    quantization: str

    def kv_bytes_per_block(self) -> int:
        return kv_bytes_per_block(self.ckpt.config, self.config.block_size,
                                  kv_cache_dtype(self.config, self.dtype))

    def load(self, device: torch.device, max_model_len: int, num_blocks: int
             ) -> "DraftModelProposer":
        runner = load_runner(self.config, self.ckpt, max_model_len, device, self.dtype,
                             quantization=self.quantization, num_blocks=num_blocks)
        return DraftModelProposer(runner)


def open_draft(config: EngineConfig, target: Checkpoint, device: torch.device,
               max_model_len: int) -> DraftCheckpoint:
    """The `speculative_config` draft model, its precision resolved as the target's is (the
    same names and checks); a ConfigError if it cannot be opened or does not share the
    target's vocabulary."""
    spec = config.speculative_config
    assert spec is not None and spec.model is not None
    draft_config = dataclasses.replace(config, model=spec.model, quantization=spec.quantization,
                                       dtype=spec.dtype, speculative_config=None)
    try:
        dtype, quantization = resolve_precision(draft_config, device)
        ckpt, _ = open_model(spec.model, dtype, max_model_len, quantization)
    except (ConfigError, ModelLoadError, OSError, ValueError) as e:
        raise ConfigError(f"speculative_config model {spec.model!r}: {e}") from e
    check_same_vocabulary(target, ckpt, spec.model)
    return DraftCheckpoint(draft_config, ckpt, dtype, quantization)


def check_same_vocabulary(target: Checkpoint, draft: Checkpoint, name: str) -> None:
    """Drafts are token ids the target scores: both models must mean the same by each id."""
    if draft.config.vocab_size != target.config.vocab_size:
        raise ConfigError(
            f"speculative_config model {name!r} has a vocabulary of "
            f"{draft.config.vocab_size} tokens, the target {target.config.vocab_size}: a "
            "draft model must share the target's vocabulary")
    ours = target.tokenizer.backend.get_vocab(with_added_tokens=True)
    theirs = draft.tokenizer.backend.get_vocab(with_added_tokens=True)
    if ours != theirs:
        differ = sum(theirs.get(token) != i for token, i in ours.items())
        raise ConfigError(
            f"speculative_config model {name!r} has another tokenizer than the target "
            f"({differ} of {len(ours)} token ids differ): a draft model must share the "
            "target's vocabulary")


class DraftModelProposer:
    """Runs the draft model inside the target runner's step (see the module's docstring)."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner  # the draft's model, KV cache and sampler
        self.block_size = runner.block_size

    def propose(self, sched: SchedulerOutput, requests: dict[str, CachedRequestState]
                ) -> None:
        """Catch the draft's cache up with the step's tokens and draft for the sequences
        with `num_lookahead_tokens`: their drafts go into `sched` (tokens and counts)."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []
        drafting: list[tuple[CachedRequestState, int]] = []  # (state, drafts wanted)
        for req_id, n in sched.num_scheduled_tokens.items():
            r = requests[req_id]
            end = r.num_computed_tokens + n  # the target's cache after this step
            # K/V of rejected drafts are not the sequence's: recompute from the target's count.
            start = min(r.num_draft_computed, r.num_computed_tokens)
            input_ids += r.token_ids(start, end)
            positions += range(start, end)
            slots += self.runner._slots(r.block_table, start, end).tolist()
            query_lens.append(end - start)
            seq_lens.append(end)
            tables.append(r.block_table)
            r.num_draft_computed = end
            k = sched.num_lookahead_tokens.get(req_id, 0)
            if k:
                sample_rows.append(len(input_ids) - 1)
                drafting.append((r, k))
        if not input_ids:
            return
        drafts: list[list[int]] = [[] for _ in drafting]
        attn = AttentionMetadata.build(slots, query_lens, seq_lens, tables, bs)
        self._run(StepInput(torch.tensor(input_ids), torch.tensor(positions), attn, sample_rows,
                            sched.num_touched_blocks), [r for r, _ in drafting], drafts)
        for i in range(1, max((k for _, k in drafting), default=0)):
            # One row per sequence still drafting: its latest draft, which samples the next.
            active = [j for j, (_, k) in enumerate(drafting) if k > i]
            reqs = [drafting[j][0] for j in active]
            pos = [r.num_tokens - 1 + i for r in reqs]
            for r in reqs:
                r.num_draft_computed += 1
            attn = AttentionMetadata.build(
                [r.block_table[p // bs] * bs + p % bs for r, p in zip(reqs, pos)],
                [1] * len(reqs), [p + 1 for p in pos], [r.block_table for r in reqs], bs)
            step = StepInput(torch.tensor([drafts[j][-1] for j in active]), torch.tensor(pos),
                             attn, list(range(len(reqs))), sched.num_touched_blocks)
            self._run(step, reqs, [drafts[j] for j in active])
        for (r, _), d in zip(drafting, drafts):
            if r.grammar is not None:  # structured outputs: only what the grammar accepts
                d = d[: r.grammar.validate(d)]
            if d:
                sched.scheduled_spec_decode_tokens[r.req_id] = d
                sched.num_scheduled_tokens[r.req_id] += len(d)

    def _run(self, step: StepInput, reqs: list[CachedRequestState],
             drafts: list[list[int]]) -> None:
        """One forward of the draft; each sampled row's token (one per request of `reqs`, in
        order) appended to that request's drafts."""
        logits = self.runner.forward(step)
        if logits is None:
            return
        rows = [sampling_row(r, d) for r, d in zip(reqs, drafts)]
        meta = SamplingMetadata.build(rows, self.runner.model_config.vocab_size,
                                      self.runner.device)
        for d, t in zip(drafts, self.runner.sampler(logits, meta).sampled_token_ids.tolist()):
            d.append(t)
