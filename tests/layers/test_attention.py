"""The attention layer (`layers.attention`): ember's kernel and the SDPA fallback serve the
same batches (decodes, first prompt chunks, later chunks over a cached context, sliding
windows) with the same results and the same cache."""

from __future__ import annotations

import pytest
import torch

from ember import kernels
from ember.layers import attention
from ember.layers.attention import AttentionMetadata, attention_metadata, paged_attention_impl

BLOCK = 16


@pytest.fixture(scope="module", autouse=True)
def built():
    assert kernels.load(), "the CPU kernels must build on this machine (g++ is there)"


def _mixed_batch() -> tuple[AttentionMetadata, int]:
    """Two decodes (contexts 5 and 20), a first prompt chunk of 4, a later chunk of 6 after 30
    cached tokens, a verify-like chunk of 3 after 9: 15 rows."""
    tables = [[3, 0], [1, 2], [4], [5, 6, 7], [8]]
    query_lens, seq_lens = [1, 1, 4, 6, 3], [5, 20, 4, 36, 12]
    slots = []
    for table, n, total in zip(tables, query_lens, seq_lens):
        slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(total - n, total)]
    return AttentionMetadata.build(slots, query_lens, seq_lens, tables, BLOCK), sum(query_lens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 7])
def test_kernel_and_sdpa_agree(monkeypatch, dtype, window):
    meta, t = _mixed_batch()
    g = torch.Generator().manual_seed(1)
    q = torch.randn(t, 6, 32, generator=g).to(dtype)
    k = torch.randn(t, 2, 32, generator=g).to(dtype)
    v = torch.randn(t, 2, 32, generator=g).to(dtype)
    cache = torch.randn(9 * BLOCK, 2, 32, generator=g).to(dtype)
    results = []
    for own in (True, False):
        monkeypatch.setattr(attention.kernels, "available", lambda device, own=own: own)
        k_cache, v_cache = cache.clone(), cache.clone()
        with attention_metadata(meta):
            out = paged_attention_impl(q, k, v, k_cache, v_cache, 32**-0.5, window)
        results.append((out, k_cache, v_cache))
    (a, ka, va), (b, kb, vb) = results
    assert torch.equal(ka, kb) and torch.equal(va, vb)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def test_metadata_describes_each_sequence():
    meta, t = _mixed_batch()
    assert meta.query_start_loc.tolist() == [0, 1, 2, 6, 12, 15]
    assert meta.seq_lens.tolist() == [5, 20, 4, 36, 12]
    assert meta.block_tables.tolist() == [[3, 0, 0], [1, 2, 0], [4, 0, 0], [5, 6, 7],
                                          [8, 0, 0]]
    assert meta.max_query_len == 6 and meta.slot_mapping.numel() == t
