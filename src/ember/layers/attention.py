"""Attention over a paged KV cache.

Each layer owns a slice of the cache: `k_cache`, `v_cache` of shape
[num_blocks * block_size, num_kv_heads, head_dim]; a token's K/V live at its *slot*
(block_id * block_size + offset). The batch is described by `AttentionMetadata`, built by the
model runner once per step and shared by every layer.

Decoding sequences (one new token each) are served together by one SDPA call: each one's
context is gathered from its blocks into a [B, Kmax] grid, padding masked. Each prefill chunk
gets its own call without padding: a first chunk attends causally to its own K/V directly; a
later chunk (or one after a prefix-cache hit) reads its context from the cache, with a mask
that offsets the causal diagonal. Sequences never see each other's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DecodeBatch:
    token_idx: torch.Tensor  # [Bd] rows of the flat batch that are decode tokens
    gather_slots: torch.Tensor  # [Bd, Kmax] each sequence's context slots (pad: slot 0)
    mask: torch.Tensor | None  # [Bd, 1, 1, Kmax] True = real key; None when no padding


@dataclass
class PrefillChunk:
    start: int  # rows [start, end) of the flat batch
    end: int
    gather_slots: torch.Tensor | None  # [K] context slots; None: no context, attend to self
    mask: torch.Tensor | None  # [1, 1, q, K] offset causal mask (with context)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    decode: DecodeBatch | None = None
    prefills: list[PrefillChunk] = field(default_factory=list)

    def to(self, device: torch.device) -> "AttentionMetadata":
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        d = self.decode
        return AttentionMetadata(
            self.slot_mapping.to(device),
            None if d is None else DecodeBatch(d.token_idx.to(device), d.gather_slots.to(device),
                                               move(d.mask)),
            [PrefillChunk(p.start, p.end, move(p.gather_slots), move(p.mask))
             for p in self.prefills],
        )


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.gqa = num_heads != num_kv_heads

    def _sdpa(self, q, k, v, mask, causal=False):  # [B, S, H, D] in, [B, S, H, D] out
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
            is_causal=causal, scale=self.scale, enable_gqa=self.gqa,
        ).transpose(1, 2)

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
        out = torch.empty_like(q)
        if meta.decode is not None:
            d = meta.decode
            keys = k_cache[d.gather_slots].to(q.dtype)  # [Bd, Kmax, Hkv, D]
            values = v_cache[d.gather_slots].to(q.dtype)
            o = self._sdpa(q[d.token_idx].unsqueeze(1), keys, values, d.mask)
            out[d.token_idx] = o.squeeze(1)
        for p in meta.prefills:
            qs = q[p.start : p.end].unsqueeze(0)
            if p.gather_slots is None:
                o = self._sdpa(qs, k[p.start : p.end].unsqueeze(0),
                               v[p.start : p.end].unsqueeze(0), None, causal=True)
            else:
                keys = k_cache[p.gather_slots].to(q.dtype).unsqueeze(0)
                values = v_cache[p.gather_slots].to(q.dtype).unsqueeze(0)
                o = self._sdpa(qs, keys, values, p.mask)
            out[p.start : p.end] = o.squeeze(0)
        return out.view(-1, self.num_heads * self.head_dim)
