"""Every op of ember's own: its Python call and its fake (the output's shape and dtype, for
torch.compile), in one place.

`ember_cpu::*` are the C++ kernels (kernels/*.cpp, one source per family), there once
`ember.kernels.load` has built and loaded them; their fakes are registered then
(`register_fakes`). `ember::paged_attention` is defined here with its fake; its
implementation, in Python, is the attention layer's (`layers.attention`), which registers it
(`implement_paged_attention`). Callers use these functions, not `torch.ops` directly.
"""

from __future__ import annotations

from typing import Callable

import torch

# ---- ember_cpu: the C++ kernels -----------------------------------------------------------


def cpu_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, query_start: torch.Tensor,
                        seq_lens: torch.Tensor, block_size: int, scale: float,
                        window: int = 0) -> torch.Tensor:
    """attention.cpp: query rows q [T, H, D] against their sequences' paged KV cache, read in
    place through the block tables [S, W]: sequence i's rows q[query_start[i] :
    query_start[i + 1]] are the last positions of its seq_lens[i] keys (causal; `window` > 0:
    each row's last `window` keys) -> [T, H, D]. Each row's result is the same, bitwise,
    whatever rows come with it."""
    return torch.ops.ember_cpu.paged_attention(q, k_cache, v_cache, block_tables, query_start,
                                               seq_lens, block_size, scale, window)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """cache.cpp: k, v [T, Hkv, D] into their cache slots [T] (in place)."""
    torch.ops.ember_cpu.write_kv(k, v, k_cache, v_cache, slots)


def int8_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """matmul.cpp: x [M, K] @ W.T, W int8 codes in ember's column tiles [N / 16, K, 16] with
    float32 scales [N / 16, K / G, 16] (GGUF Q8_0: G = 32; per-channel int8: G = K) -> float32 [M, N],
    each row as a one-row call computes it."""
    return torch.ops.ember_cpu.int8_linear(x, codes, scales)


def dense_linear(x: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
    """matmul.cpp: x [M, K] @ W.T, W float32 or bfloat16 in ember's column tiles [N / 16, K,
    16] -> [M, N] in x's dtype (float32 sums), each row as a one-row call computes it."""
    return torch.ops.ember_cpu.dense_linear(x, tiles)


def int4_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                offsets: torch.Tensor, group_size: int) -> torch.Tensor:
    """matmul.cpp: x [M, K] (float32 or bfloat16) @ W.T, W int4 in ember's column tiles
    [N / 16, K, 8] -> [M, N], each row as a one-row call computes it."""
    return torch.ops.ember_cpu.int4_linear(x, codes, scales, offsets, group_size)


def int4_tiled_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                      zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """int4.cpp: x [M, K] (bfloat16) @ W.T, W int4 in ember's bf16 tiles [N / 16, K / 8, 64]
    -> [M, N], each row as a one-row call computes it."""
    return torch.ops.ember_cpu.int4_tiled_linear(x, codes, scales, zeros, group_size)


def int4_tiles_supported() -> bool:
    """int4.cpp: whether this build has `int4_tiled_linear` (a CPU with AVX512-BF16)."""
    return bool(torch.ops.ember_cpu.int4_tiles_supported())


def kquant_linear(x: torch.Tensor, tiles: list[torch.Tensor], kinds: list[int], k: int,
                  float_out: bool) -> torch.Tensor:
    """kquant.cpp: x [M, K] @ W.T, W's output rows in segments of one GGUF K-quant type each
    (ember's tiles) -> [M, N], float32 where `float_out`; each row as a one-row call computes
    it."""
    return torch.ops.ember_cpu.kquant_linear(x, tiles, kinds, k, float_out)


def kquant_rows(tiles: torch.Tensor, ids: torch.Tensor, kind: int, k: int) -> torch.Tensor:
    """kquant.cpp: rows `ids` of a K-quant weight -> [*ids.shape, k] float32."""
    return torch.ops.ember_cpu.kquant_rows(tiles, ids, kind, k)


def greedy_sample(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sampling.cpp: each row's argmax (the first maximum; NaN wins) and its log-probability,
    of contiguous float32 logits [B, V]."""
    return torch.ops.ember_cpu.greedy_sample(logits)


def decode_layers(ids: torch.Tensor, positions: torch.Tensor, embedding: torch.Tensor,
                  cos_table: torch.Tensor, sin_table: torch.Tensor, params: list[torch.Tensor],
                  final_norm: torch.Tensor, k_caches: list[torch.Tensor],
                  v_caches: list[torch.Tensor], slots: torch.Tensor, block_tables: torch.Tensor,
                  query_start: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                  heads: int, kv_heads: int, group_size: int, eps: float, scale: float,
                  embedding_kind: int, intermediate_size: int, windows: list[int],
                  local_cos: torch.Tensor, local_sin: torch.Tensor, norm_offset: float,
                  activation: int, embed_scale: float) -> torch.Tensor:
    """decode.cpp: a step (each sequence's query rows from `query_start`) from token ids to
    the final norm's output [T, hidden]; `params` are the layers' tensors in decode_schema.h's
    order (`decode_schema.LayerTensors` builds them)."""
    return torch.ops.ember_cpu.decode_layers(
        ids, positions, embedding, cos_table, sin_table, params, final_norm, k_caches,
        v_caches, slots, block_tables, query_start, seq_lens, block_size, heads, kv_heads,
        group_size, eps, scale, embedding_kind, intermediate_size, windows, local_cos,
        local_sin, norm_offset, activation, embed_scale)


def register_fakes() -> None:
    """The ember_cpu ops' fakes: called by `ember.kernels.load` once the library is loaded
    (a fake needs its op defined)."""
    fake = torch.library.register_fake

    @fake("ember_cpu::paged_attention")
    def _(q, k_cache, v_cache, block_tables, query_start, seq_lens, block_size, scale, window=0):
        return q.new_empty(q.shape)

    @fake("ember_cpu::write_kv")
    def _(k, v, k_cache, v_cache, slots):
        return None

    @fake("ember_cpu::int8_linear")
    def _(x, codes, scales):
        return x.new_empty(x.shape[0], codes.shape[0] * 16, dtype=torch.float32)

    @fake("ember_cpu::dense_linear")
    def _(x, tiles):
        return x.new_empty(x.shape[0], tiles.shape[0] * 16)

    @fake("ember_cpu::int4_linear")
    def _(x, codes, scales, offsets, group_size):
        return x.new_empty(x.shape[0], codes.shape[0] * 16)

    @fake("ember_cpu::int4_tiled_linear")
    def _(x, codes, scales, zeros, group_size):
        return x.new_empty(x.shape[0], codes.shape[0] * 16)

    @fake("ember_cpu::kquant_linear")
    def _(x, tiles, kinds, k, float_out):
        return x.new_empty(x.shape[0], sum(t.shape[0] for t in tiles) * 16,
                           dtype=torch.float32 if float_out else x.dtype)

    @fake("ember_cpu::kquant_rows")
    def _(tiles, ids, kind, k):
        return ids.new_empty(*ids.shape, k, dtype=torch.float32)

    @fake("ember_cpu::greedy_sample")
    def _(logits):
        return (logits.new_empty(logits.shape[0], dtype=torch.int64),
                logits.new_empty(logits.shape[0]))

    @fake("ember_cpu::decode_layers")
    def _(ids, positions, embedding, cos_table, sin_table, params, final_norm, *rest):
        return final_norm.new_empty(ids.shape[0], final_norm.shape[0])


# ---- ember: ops written in Python -----------------------------------------------------------

# Defined through the low-level `Library` API, not `torch.library.custom_op`: the compiled
# graph calls the op once a layer every step, and custom_op's Python wrapper costs time on
# each call.
_lib = torch.library.Library("ember", "DEF")
_lib.define("paged_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, "
            "Tensor(b!) v_cache, float scale, int window) -> Tensor")


@torch.library.register_fake("ember::paged_attention", lib=_lib)
def _(q, k, v, k_cache, v_cache, scale, window):
    return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])


def implement_paged_attention(impl: Callable[..., torch.Tensor]) -> None:
    """Register `impl` (layers.attention's `paged_attention_impl`) as ember::paged_attention's
    implementation on every device."""
    _lib.impl("paged_attention", impl, "CompositeExplicitAutograd")


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, scale: float, window: int) -> torch.Tensor:
    """The paged attention as one opaque node of a compiled graph: q [T, H, D], k and v
    [T, Hkv, D] -> [T, H * D] (the step's batch from `layers.attention.attention_metadata`)."""
    return torch.ops.ember.paged_attention(q, k, v, k_cache, v_cache, scale, window)
