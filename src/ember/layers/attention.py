"""Attention over a paged KV cache.

Each layer owns a slice of the cache: `k_cache`, `v_cache` of shape
[num_blocks * block_size, num_kv_heads, head_dim]; a token's K/V live at its *slot*
(block_id * block_size + offset). The batch is described by `AttentionMetadata`, built by the
model runner once per step and shared by every layer.

Decoding sequences (one new token each) are served together by one SDPA call: each one's
context is gathered, whole blocks at a time and only the blocks in use, into a [B, Kmax]
grid, padding masked. Each prefill chunk
gets its own call without padding: a first chunk attends causally to its own K/V directly; a
later chunk (or one after a prefix-cache hit) reads its context from the cache, with a mask
that offsets the causal diagonal. Sequences never see each other's tokens. A sliding-window
layer (`window` > 0) reads only each query's last `window` positions: the decode kernel
starts at the window, a later chunk gathers only the slots its queries see, and a banded
mask replaces the causal one where the window is shorter than the context.

Under torch.compile the attention is one opaque custom op, `ember::paged_attention` (as vLLM
does it): the compiled graph spans the whole decoder layer, its only varying size the token
count,
while the batch's shape of sequences (which tokens decode, which prefill, their contexts)
reaches the op through the step's metadata, set around the forward pass
(`attention_metadata`), not through graph inputs that would make every batch a new graph.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ember import kernels
from ember.kernels import ops


@dataclass
class DecodeBatch:
    token_idx: torch.Tensor  # [Bd] rows of the flat batch that are decode tokens
    block_tables: torch.Tensor  # [Bd, ceil(Kmax / block_size)] each one's blocks (pad: 0)
    block_size: int
    context_lens: torch.Tensor  # [Bd] keys of each (int64)
    max_len: int  # Kmax: the longest context
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
            None if d is None else DecodeBatch(
                d.token_idx.to(device), d.block_tables.to(device), d.block_size,
                d.context_lens.to(device), d.max_len, move(d.mask)),
            [PrefillChunk(p.start, p.end, move(p.gather_slots), move(p.mask))
             for p in self.prefills],
        )


_current: AttentionMetadata | None = None  # the running step's, see `attention_metadata`


@contextmanager
def attention_metadata(meta: AttentionMetadata) -> Iterator[None]:
    """Make `meta` the batch description of the forward pass run inside this block."""
    global _current
    previous, _current = _current, meta
    try:
        yield
    finally:
        _current = previous


def _sdpa(q, k, v, mask, scale: float, causal: bool = False):  # [B, S, H, D] in and out
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        is_causal=causal, scale=scale, enable_gqa=q.shape[2] != k.shape[2],
    ).transpose(1, 2)


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache[slots] for slots of any shape (index_select: twice as fast as indexing)."""
    return cache.index_select(0, slots.reshape(-1)).view(*slots.shape, *cache.shape[1:])


def _gather_blocks(cache: torch.Tensor, d: DecodeBatch) -> torch.Tensor:
    """The first Kmax slots of each decoding sequence's blocks: [B, Kmax, Hkv, D]. Whole
    blocks are copied (contiguous runs of slots): 1/block_size the index work of slots."""
    tables, block_size = d.block_tables, d.block_size
    b, width = tables.shape
    blocks = cache.view(-1, block_size, *cache.shape[1:])
    out = blocks.index_select(0, tables.reshape(-1))
    return out.view(b, width * block_size, *cache.shape[1:])[:, : d.max_len]


def _window_mask(q_start: int, n: int, k_start: int, k_end: int, window: int,
                 device: torch.device) -> torch.Tensor:
    """[1, 1, n, K] True where query positions [q_start, q_start + n) see key positions
    [k_start, k_end): causal, and at most `window` positions back (itself included)."""
    qpos = torch.arange(q_start, q_start + n, device=device)[:, None]
    kpos = torch.arange(k_start, k_end, device=device)[None, :]
    return ((kpos <= qpos) & (kpos > qpos - window))[None, None]


def paged_attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float,
                         window: int = 0) -> torch.Tensor:
    """q [T, H, D], k and v [T, Hkv, D] of the step's new tokens -> [T, H * D]. A layer
    with `window` > 0 (sliding-window attention) reads only the last `window` positions of
    each query's context, itself included."""
    meta = _current
    assert meta is not None, "attention outside `attention_metadata`"
    own_kernels = kernels.available(q.device)
    # Write first, then read: the new tokens attend to themselves through the cache.
    if own_kernels:
        ops.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    else:
        k_cache.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
    t, h, d = q.shape
    d_batch = meta.decode
    if d_batch is not None:  # one query each
        only_decodes = not meta.prefills  # then the rows are the batch, in order
        qd = q if only_decodes else q[d_batch.token_idx]
        if own_kernels:  # reads the blocks in place (of a window: only its keys)
            o = ops.decode_attention(qd, k_cache, v_cache, d_batch.block_tables,
                                     d_batch.context_lens, d_batch.block_size, scale, window)
        else:  # a batch of SDPA's [1, Kmax] problems over gathered blocks
            keys = _gather_blocks(k_cache, d_batch).to(q.dtype)  # [B, Kmax, Hkv, D]
            values = _gather_blocks(v_cache, d_batch).to(q.dtype)
            mask = d_batch.mask
            if window and d_batch.max_len > window:  # keys before the window: masked out
                kpos = torch.arange(d_batch.max_len, device=q.device)[None, :]
                lens = d_batch.context_lens[:, None]
                mask = ((kpos < lens) & (kpos >= lens - window))[:, None, None, :]
            o = _sdpa(qd.unsqueeze(1), keys, values, mask, scale).squeeze(1)
        if only_decodes:
            return o.reshape(t, h * d)
        out = torch.empty_like(q)
        out[d_batch.token_idx] = o
    else:
        out = torch.empty_like(q)
    for p in meta.prefills:
        qs = q[p.start : p.end].unsqueeze(0)
        n = p.end - p.start
        if p.gather_slots is None:  # a first chunk: positions 0..n-1, its own keys
            ks, vs = k[p.start : p.end].unsqueeze(0), v[p.start : p.end].unsqueeze(0)
            if window and n > window:
                o = _sdpa(qs, ks, vs, _window_mask(0, n, 0, n, window, q.device), scale)
            else:
                o = _sdpa(qs, ks, vs, None, scale, causal=True)
        else:  # a later chunk: its context (positions 0..K-1) is in the cache
            slots, mask = p.gather_slots, p.mask
            end = slots.numel()
            if window and end > window:  # keys no query of the chunk sees are not read
                first = max(0, end - n - window + 1)
                slots = slots[first:]
                mask = _window_mask(end - n, n, first, end, window, q.device)
            keys = _gather(k_cache, slots).to(q.dtype).unsqueeze(0)
            values = _gather(v_cache, slots).to(q.dtype).unsqueeze(0)
            o = _sdpa(qs, keys, values, mask, scale)
        out[p.start : p.end] = o.squeeze(0)
    return out.view(t, h * d)


ops.implement_paged_attention(paged_attention_impl)  # ember::paged_attention (kernels.ops)


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 window: int = 0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.window = window  # > 0: sliding-window attention over this many positions

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """q [T, H, D], k and v [T, Hkv, D] -> [T, H * D]."""
        if torch.compiler.is_compiling():  # an opaque node of the graph
            return ops.paged_attention(q, k, v, k_cache, v_cache, self.scale, self.window)
        return paged_attention_impl(q, k, v, k_cache, v_cache, self.scale, self.window)
