"""Attention over a paged KV cache.

Each layer owns a slice of the cache: `k_cache`, `v_cache` of shape
[num_blocks * block_size, num_kv_heads, head_dim]; a token's K/V live at its *slot*
(block_id * block_size + offset). The batch is described by `AttentionMetadata`, built by the
model runner once per step and shared by every layer.

One SDPA call serves a mixed batch (prefill chunks and decodes): queries are scattered into a
padded [B, Qmax] grid, each sequence's context is gathered from its blocks into [B, Kmax], and a
boolean mask allows key j for query i only when j <= position(i) within the same sequence, so
sequences never see each other's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    gather_slots: torch.Tensor  # [B, Kmax] the slots of each sequence's context (pad: slot 0)
    query_batch_idx: torch.Tensor  # [T] sequence index of each token
    query_pos_idx: torch.Tensor  # [T] index of each token inside its sequence's query chunk
    attn_mask: torch.Tensor  # [B, 1, Qmax, Kmax] bool, True = may attend
    max_query_len: int


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        # Write first, then read: the new tokens attend to themselves through the cache.
        k_cache.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))

        batch = meta.gather_slots.shape[0]
        qp = q.new_zeros(batch, meta.max_query_len, self.num_heads, self.head_dim)
        qp[meta.query_batch_idx, meta.query_pos_idx] = q
        keys = k_cache[meta.gather_slots].to(q.dtype)  # [B, Kmax, Hkv, D]
        values = v_cache[meta.gather_slots].to(q.dtype)
        out = F.scaled_dot_product_attention(
            qp.transpose(1, 2),
            keys.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=meta.attn_mask,
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )  # [B, H, Qmax, D]
        out = out.transpose(1, 2)[meta.query_batch_idx, meta.query_pos_idx]  # [T, H, D]
        return out.reshape(-1, self.num_heads * self.head_dim)
