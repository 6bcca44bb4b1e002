"""attention.cpp's paged attention (`ops.cpu_paged_attention`): every query row's result is
bitwise the one-row decode's at its position, whatever chunk, batch or thread count it comes
in, and right against a float64 reference; bad batches are refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ember import kernels
from ember.kernels import ops

BLOCK = 16
SCALE = 0.125


@pytest.fixture(scope="module", autouse=True)
def built():
    assert kernels.load(), "the CPU kernels must build on this machine (g++ is there)"


class Cache:
    """A paged cache of `num_blocks` random blocks; each sequence its own blocks, shuffled."""

    def __init__(self, lens: list[int], kv_heads: int, dim: int, dtype: torch.dtype, seed: int):
        g = torch.Generator().manual_seed(seed)
        widths = [-(-n // BLOCK) for n in lens]
        ids = torch.randperm(sum(widths) + 3, generator=g).tolist()  # + some blocks unused
        self.tables = []
        for w in widths:
            self.tables.append(ids[:w])
            ids = ids[w:]
        slots = (sum(widths) + 3) * BLOCK
        self.k = torch.randn(slots, kv_heads, dim, generator=g).to(dtype)
        self.v = torch.randn(slots, kv_heads, dim, generator=g).to(dtype)
        self.g = g

    def slots(self, seq: int, start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end)
        return torch.tensor(self.tables[seq])[pos // BLOCK] * BLOCK + pos % BLOCK

    def attend(self, q: torch.Tensor, spans: list[tuple[int, int, int]], window: int = 0):
        """The kernel over (sequence, first position, rows) spans, q's rows in that order."""
        width = max(len(self.tables[s]) for s, _, _ in spans)
        tables = torch.tensor([self.tables[s] + [0] * (width - len(self.tables[s]))
                               for s, _, _ in spans])
        starts = torch.tensor([0] + [n for _, _, n in spans]).cumsum(0)
        lens = torch.tensor([p + n for _, p, n in spans])
        return ops.cpu_paged_attention(q, self.k, self.v, tables, starts, lens, BLOCK, SCALE,
                                       window)

    def decodes(self, q: torch.Tensor, seq: int, first: int, window: int = 0):
        """Each row of q as its own one-row decode, at positions first.. (one call each)."""
        return torch.cat([self.attend(q[i : i + 1], [(seq, first + i, 1)], window)
                          for i in range(q.shape[0])])

    def reference(self, q: torch.Tensor, seq: int, first: int, window: int = 0):
        """float64 SDPA over the sequence's keys, causal (and banded by the window)."""
        n = first + q.shape[0]
        s = self.slots(seq, 0, n)
        keys, values = self.k[s].double().transpose(0, 1), self.v[s].double().transpose(0, 1)
        qpos, kpos = torch.arange(first, n)[:, None], torch.arange(n)[None, :]
        mask = kpos <= qpos
        if window:
            mask &= kpos > qpos - window
        o = F.scaled_dot_product_attention(q.double().transpose(0, 1), keys, values,
                                           attn_mask=mask, scale=SCALE, enable_gqa=True)
        return o.transpose(0, 1)


def _chunked(cache: Cache, q: torch.Tensor, seq: int, chunk: int, window: int):
    """A prompt of q.shape[0] rows prefilled in chunks of `chunk`, one call a chunk."""
    n = q.shape[0]
    return torch.cat([cache.attend(q[s : s + chunk], [(seq, s, min(chunk, n - s))], window)
                      for s in range(0, n, chunk)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 100])
def test_prefill_rows_are_bitwise_their_decodes(dtype, window):
    """A prompt of 700 tokens (block edges, six chunks of keys) prefilled in chunks of 1, 7,
    64 and 600 tokens: every row is bitwise the one-row decode at its position, and close to
    float64."""
    heads, kv_heads, dim, n = 9, 3, 64, 700
    cache = Cache([n], kv_heads, dim, dtype, seed=window)
    q = torch.randn(n, heads, dim, generator=cache.g).to(dtype)
    decodes = cache.decodes(q, 0, 0, window)
    for chunk in (1, 7, 64, 600):
        assert torch.equal(_chunked(cache, q, 0, chunk, window), decodes), chunk
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(decodes.double(), cache.reference(q, 0, 0, window), atol=tol,
                               rtol=tol)


@pytest.mark.parametrize("window", [0, 37])
def test_rows_do_not_depend_on_the_batch_or_the_threads(window):
    """One step of a prompt chunk (after a cached prefix), a verify chunk of 1 + 4 rows, a first
    chunk and decodes of other sequences, in a shuffled order, on 1 thread and on several:
    each row is bitwise what it is alone."""
    heads, kv_heads, dim = 8, 2, 128
    lens = [600, 300, 40, 1, 129]
    cache = Cache(lens, kv_heads, dim, torch.float32, seed=3)
    # (sequence, first position, rows): positions 333..599, 295..299, 0..39, 0, 128.
    spans = [(1, 295, 5), (0, 333, 267), (3, 0, 1), (2, 0, 40), (4, 128, 1)]
    q = torch.randn(sum(n for _, _, n in spans), heads, dim, generator=cache.g)
    alone = []
    row = 0
    for seq, first, n in spans:
        alone.append(cache.decodes(q[row : row + n], seq, first, window))
        torch.testing.assert_close(alone[-1].double(), cache.reference(q[row : row + n], seq,
                                                                       first, window),
                                   atol=1e-5, rtol=1e-5)
        row += n
    alone = torch.cat(alone)
    threads = torch.get_num_threads()
    try:
        for t in (1, 4):
            torch.set_num_threads(t)
            assert torch.equal(cache.attend(q, spans, window), alone), t
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (8, 8, 128), (4, 2, 48), (4, 1, 256)])
def test_decodes_match_float64(dtype, heads, kv_heads, dim):
    """Decodes at block edges, one key, several blocks, several chunks of keys."""
    lens = [1, 16, 17, 250, 700]
    cache = Cache(lens, kv_heads, dim, dtype, seed=heads * dim)
    q = torch.randn(len(lens), heads, dim, generator=cache.g).to(dtype)
    out = cache.attend(q, [(s, n - 1, 1) for s, n in enumerate(lens)])
    assert out.dtype == dtype and out.shape == q.shape
    ref = torch.cat([cache.reference(q[s : s + 1], s, n - 1) for s, n in enumerate(lens)])
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("window", [1, 16, 200])
def test_decodes_read_only_the_window(window):
    """A sliding-window layer's decode reads its last `window` keys only: keys before them are
    poisoned (NaN), so reading one would show."""
    lens = [1, 17, 250, 700]
    cache = Cache(lens, 1, 256, torch.float32, seed=window)
    q = torch.randn(len(lens), 4, 256, generator=cache.g)
    ref = torch.cat([cache.reference(q[s : s + 1], s, n - 1, window) for s, n in enumerate(lens)])
    for s, n in enumerate(lens):
        before = cache.slots(s, 0, max(0, n - window))
        cache.k[before] = float("nan")
        cache.v[before] = float("nan")
    out = cache.attend(q, [(s, n - 1, 1) for s, n in enumerate(lens)], window)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_reads_a_strided_query():
    cache = Cache([3, 16], 2, 64, torch.float32, seed=0)
    qkv = torch.randn(2, 8 * 64)  # q as a view into a fused projection's output
    q = qkv.view(2, 8, 64)[:, :4]
    out = cache.attend(q, [(0, 2, 1), (1, 15, 1)])
    assert torch.equal(out, cache.attend(q.contiguous(), [(0, 2, 1), (1, 15, 1)]))
    torch.testing.assert_close(out[1:].double(), cache.reference(q[1:], 1, 15), atol=1e-5,
                               rtol=1e-5)


def test_refuses_bad_batches():
    k_cache = torch.zeros(32, 2, 16)  # 2 blocks of 16
    q = torch.randn(1, 2, 16)
    one = torch.tensor([0, 1])

    def call(q=q, tables=torch.tensor([[0, 1]]), starts=one, lens=torch.tensor([20])):
        return ops.cpu_paged_attention(q, k_cache, k_cache, tables, starts, lens, BLOCK, 0.25)

    call()  # fine
    with pytest.raises(RuntimeError, match="block id 2 of sequence 0 is outside the cache"):
        call(tables=torch.tensor([[0, 2]]))
    with pytest.raises(RuntimeError, match="block id -1"):
        call(tables=torch.tensor([[-1, 0]]))
    with pytest.raises(RuntimeError, match="context length 40 of sequence 0 is beyond"):
        call(lens=torch.tensor([40]))
    with pytest.raises(RuntimeError, match="short of its 2 query rows"):
        call(q=torch.randn(2, 2, 16), starts=torch.tensor([0, 2]), lens=torch.tensor([1]))
    with pytest.raises(RuntimeError, match="query_start"):
        call(starts=torch.tensor([0, 2]))
    with pytest.raises(RuntimeError, match="int64"):
        call(tables=torch.tensor([[0, 1]]).int())
    with pytest.raises(RuntimeError, match="query heads per KV head"):
        call(q=torch.randn(1, 3, 16))
