"""Attention over a paged KV cache.

Each layer owns a slice of the cache: `k_cache`, `v_cache` of shape
[num_blocks * block_size, num_kv_heads, head_dim]; a token's K/V live at its *slot*
(block_id * block_size + offset). The batch is described by `AttentionMetadata`, built by the
model runner once per step and shared by every layer: each sequence's span of query rows (a
prompt chunk, a decode's one row, a speculative verify chunk), its length after the step and its
block table. The step's new K/V are written to the cache first; every query row then reads its
keys from the cache (causal: positions up to its own; a sliding-window layer, `window` > 0,
only the last `window` of them).

On the CPU with ember's kernels, one kernel serves every row, prompt chunks and decodes alike
(`ember_cpu::paged_attention`, attention.cpp): it reads the blocks in place, and a row's result
does not depend on the chunk or batch it comes in (keys split at fixed positions, fixed
reduction and merge orders), so chunked prefill, prefix caching and batching change no bits.
Elsewhere (another device, no compiler) PyTorch's SDPA serves them: the sequences with one
query row together, their contexts gathered whole blocks at a time into a [B, Kmax] grid,
padding masked; each longer span on its own, a first chunk causally over its own K/V, a later
one over its context gathered from the cache with an offset causal (or banded) mask.

Under torch.compile the attention is one opaque custom op, `ember::paged_attention` (as vLLM
does it): the compiled graph spans the whole decoder layer, its only varying size the token
count,
while the batch's shape of sequences (which tokens decode, which prefill, their contexts)
reaches the op through the step's metadata, set around the forward pass
(`attention_metadata`), not through graph inputs that would make every batch a new graph.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ember import kernels
from ember.kernels import ops


@dataclass
class AttentionMetadata:
    """One step's batch: its sequences in row order, sequence i's query rows
    [query_start_loc[i], query_start_loc[i + 1]) at the last positions of its seq_lens[i]
    keys (vLLM's names)."""

    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    query_start_loc: torch.Tensor  # [S + 1] int64
    seq_lens: torch.Tensor  # [S] int64: keys of each sequence after the step
    block_tables: torch.Tensor  # [S, W] int64: each one's blocks (padding 0)
    block_size: int
    max_query_len: int  # 1: a step of decodes only
    # The SDPA fallback's grouping of the batch, made on first use (once a step).
    sdpa: "_SdpaBatch | None" = field(default=None, compare=False, repr=False)

    @classmethod
    def build(cls, slot_mapping: Sequence[int] | torch.Tensor, query_lens: Sequence[int],
              seq_lens: Sequence[int], block_tables: Sequence[Sequence[int]],
              block_size: int) -> "AttentionMetadata":
        """From each sequence's query row count, length after the step and block ids (host
        tensors; `to` moves them)."""
        width = max((-(-n // block_size) for n in seq_lens), default=0)
        tables = [list(t[:width]) + [0] * (width - len(t[:width])) for t in block_tables]
        return cls(torch.as_tensor(slot_mapping, dtype=torch.long),
                   torch.tensor([0, *itertools.accumulate(query_lens)], dtype=torch.long),
                   torch.tensor(list(seq_lens), dtype=torch.long),
                   torch.tensor(tables, dtype=torch.long).view(len(tables), width), block_size,
                   max(query_lens, default=0))

    def to(self, device: torch.device) -> "AttentionMetadata":
        return AttentionMetadata(
            self.slot_mapping.to(device), self.query_start_loc.to(device),
            self.seq_lens.to(device), self.block_tables.to(device), self.block_size,
            self.max_query_len)


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


# ---- the SDPA fallback --------------------------------------------------------------------


@dataclass
class _Decodes:  # the sequences with one query row
    token_idx: torch.Tensor  # [Bd] their rows of the flat batch
    block_tables: torch.Tensor  # [Bd, ceil(Kmax / block_size)]
    block_size: int
    context_lens: torch.Tensor  # [Bd] keys of each
    max_len: int  # Kmax: the longest context
    mask: torch.Tensor | None  # [Bd, 1, 1, Kmax] True = real key; None when no padding


@dataclass
class _Span:  # a sequence with several query rows
    start: int  # rows [start, end) of the flat batch
    end: int
    gather_slots: torch.Tensor | None  # [K] context slots; None: no context, attend to self
    mask: torch.Tensor | None  # [1, 1, q, K] offset causal mask (with context)


@dataclass
class _SdpaBatch:
    decodes: _Decodes | None
    spans: list[_Span]


def _sdpa_batch(meta: AttentionMetadata) -> _SdpaBatch:
    """The batch grouped for SDPA calls (on the metadata's device)."""
    dev, bs = meta.seq_lens.device, meta.block_size
    starts = meta.query_start_loc.tolist()
    lens = meta.seq_lens.tolist()
    rows, spans = [], []
    for i, n in enumerate(lens):
        start, end = starts[i], starts[i + 1]
        if end - start == 1:
            rows.append(i)
        elif end - start == n:  # a first chunk: its own keys only
            spans.append(_Span(start, end, None, None))
        elif end > start:  # a later chunk: its context is in the cache
            pos = torch.arange(n, device=dev)
            slots = meta.block_tables[i, pos // bs] * bs + pos % bs
            mask = pos[None, :] <= torch.arange(n - (end - start), n, device=dev)[:, None]
            spans.append(_Span(start, end, slots, mask[None, None]))
    decodes = None
    if rows:
        ctx = [lens[i] for i in rows]
        max_k = max(ctx)
        idx = torch.tensor(rows, device=dev)
        context_lens = meta.seq_lens[idx]
        mask = None
        if min(ctx) != max_k:
            mask = (torch.arange(max_k, device=dev)[None, :] < context_lens[:, None])
            mask = mask[:, None, None, :]
        decodes = _Decodes(meta.query_start_loc[idx], meta.block_tables[idx, : -(-max_k // bs)],
                           bs, context_lens, max_k, mask)
    return _SdpaBatch(decodes, spans)


def _sdpa(q, k, v, mask, scale: float, causal: bool = False):  # [B, S, H, D] in and out
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        is_causal=causal, scale=scale, enable_gqa=q.shape[2] != k.shape[2],
    ).transpose(1, 2)


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache[slots] for slots of any shape (index_select: twice as fast as indexing)."""
    return cache.index_select(0, slots.reshape(-1)).view(*slots.shape, *cache.shape[1:])


def _gather_blocks(cache: torch.Tensor, d: _Decodes) -> torch.Tensor:
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


def _kernel_serves(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether ember's attention kernel takes these shapes (on its device)."""
    d = q.shape[-1]
    return (kernels.available(q.device) and d % 8 == 0 and d <= 256
            and q.shape[1] // k_cache.shape[1] <= 16)


def paged_attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float,
                         window: int = 0) -> torch.Tensor:
    """q [T, H, D], k and v [T, Hkv, D] of the step's new tokens -> [T, H * D]. A layer
    with `window` > 0 (sliding-window attention) reads only the last `window` positions of
    each query's context, itself included."""
    meta = _current
    assert meta is not None, "attention outside `attention_metadata`"
    t, h, d = q.shape
    # Write first, then read: the new tokens attend to themselves through the cache.
    if kernels.available(q.device):
        ops.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    else:
        k_cache.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
    if _kernel_serves(q, k_cache):  # every row, in place (of a window: only its keys)
        o = ops.cpu_paged_attention(q, k_cache, v_cache, meta.block_tables,
                                    meta.query_start_loc, meta.seq_lens, meta.block_size,
                                    scale, window)
        return o.view(t, h * d)
    if meta.sdpa is None:
        meta.sdpa = _sdpa_batch(meta)
    d_batch = meta.sdpa.decodes
    if d_batch is not None:  # one query each: a batch of SDPA's [1, Kmax] problems
        only_decodes = not meta.sdpa.spans  # then the rows are the batch, in order
        qd = q if only_decodes else q[d_batch.token_idx]
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
    for p in meta.sdpa.spans:
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
