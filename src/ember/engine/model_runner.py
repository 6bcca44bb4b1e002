"""Turns a `SchedulerOutput` into one forward pass and one sampling call.

Host-side work per step: flatten the scheduled tokens of every request, map each token to its
KV slot through its block table, describe the attention pattern, run the model, sample for the
requests that reached the end of their known tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ember.config import EngineConfig, ModelConfig
from ember.engine.request import Request
from ember.engine.scheduler import SchedulerOutput
from ember.layers.attention import AttentionMetadata
from ember.layers.sampler import Sampler, SamplerOutput, SamplingMetadata, SamplingRow

logger = logging.getLogger("ember")

DEFAULT_CPU_KV_BYTES = 2 << 30  # like vLLM's CPU default (VLLM_CPU_KVCACHE_SPACE), but 2 GiB


@dataclass
class ModelRunnerOutput:
    sampled: list[Request]  # requests that got a new token this step, in row order
    output: SamplerOutput | None


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


def num_kv_blocks(
    config: EngineConfig, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
    max_model_len: int,
) -> int:
    per_block = kv_bytes_per_block(cfg, config.block_size, dtype)
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


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        model_config: ModelConfig,
        config: EngineConfig,
        num_blocks: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.model = model
        self.model_config = model_config
        self.config = config
        self.device = device
        self.block_size = config.block_size
        self.sampler = Sampler()
        slots = num_blocks * config.block_size
        shape = (slots, model_config.num_key_value_heads, model_config.head_dim)
        # Zeros, not empty: masked-out keys still enter the matmul, and 0 * NaN is NaN.
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=device),
             torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(model_config.num_hidden_layers)
        ]

    # ---- batch description --------------------------------------------------------------
    def _prepare(self, sched: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor,
                                                       AttentionMetadata, list[int]]:
        bs = self.block_size
        reqs, counts = sched.requests, sched.num_scheduled_tokens
        starts = [r.num_computed_tokens for r in reqs]
        input_ids: list[int] = []
        sample_rows: list[int] = []
        offset = 0
        for r, start, n in zip(reqs, starts, counts):
            tokens = r.all_token_ids if start + n > r.num_prompt_tokens else r.prompt_token_ids
            input_ids.extend(tokens[start : start + n])
            offset += n
            if start + n == r.num_tokens:
                sample_rows.append(offset - 1)
        dev = self.device
        q_lens = torch.tensor(counts)
        starts_t = torch.tensor(starts)
        ctx_lens = starts_t + q_lens
        max_blocks = max(len(r.block_table) for r in reqs)
        tables = torch.zeros(len(reqs), max_blocks, dtype=torch.long)
        for i, r in enumerate(reqs):
            tables[i, : len(r.block_table)] = torch.tensor(r.block_table)

        batch_idx = torch.repeat_interleave(torch.arange(len(reqs)), q_lens)
        cu_start = torch.cumsum(q_lens, 0) - q_lens
        q_pos_idx = torch.arange(len(input_ids)) - cu_start[batch_idx]
        positions = starts_t[batch_idx] + q_pos_idx
        slot_mapping = tables[batch_idx, positions // bs] * bs + positions % bs

        max_q, max_k = int(q_lens.max()), int(ctx_lens.max())
        k_pos = torch.arange(max_k)
        gather_slots = tables[:, k_pos // bs] * bs + k_pos % bs  # [B, Kmax]
        q_abs = starts_t[:, None] + torch.arange(max_q)[None, :]  # [B, Qmax]
        mask = (k_pos[None, None, :] <= q_abs[:, :, None]) & (
            k_pos[None, None, :] < ctx_lens[:, None, None]
        )
        meta = AttentionMetadata(
            slot_mapping=slot_mapping.to(dev),
            gather_slots=gather_slots.to(dev),
            query_batch_idx=batch_idx.to(dev),
            query_pos_idx=q_pos_idx.to(dev),
            attn_mask=mask.unsqueeze(1).to(dev),
            max_query_len=max_q,
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=dev)
        return ids, positions.to(dev), meta, sample_rows

    def _sampling_metadata(self, reqs: list[Request]) -> SamplingMetadata:
        rows = []
        for r in reqs:
            p = r.params
            banned: list[int] = []
            if len(r.output_token_ids) < p.min_tokens:
                banned = list(r.eos_token_ids) + list(p.stop_token_ids)
            rows.append(SamplingRow(p, r.seed, r.prompt_token_ids, r.output_token_ids, banned))
        return SamplingMetadata.build(rows, self.model_config.vocab_size, self.device)

    # ---- one step -----------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        input_ids, positions, meta, sample_rows = self._prepare(sched)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        sampled = [
            r for r, n in zip(sched.requests, sched.num_scheduled_tokens)
            if r.num_computed_tokens + n == r.num_tokens
        ]
        if not sampled:
            return ModelRunnerOutput([], None)
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=self.device)])
        return ModelRunnerOutput(sampled, self.sampler(logits, self._sampling_metadata(sampled)))
