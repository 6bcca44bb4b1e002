"""ember's CPU kernels (ember.kernels) against PyTorch's ops, and their fallback."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from ember import kernels
from ember.kernels import ops
from ember.quantization.q8_0 import Q8_0Linear, Q8_0Weight

CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def built():
    assert kernels.load(), "the CPU kernels must build on this machine (g++ is there)"


@pytest.mark.parametrize("src,cache", [(torch.float32, torch.float32),
                                       (torch.float32, torch.bfloat16),
                                       (torch.bfloat16, torch.bfloat16)])
def test_write_kv_fills_the_slots(src, cache):
    k = torch.randn(3, 2, 16).to(src)
    v = torch.randn(3, 2, 16).to(src)
    k_cache, v_cache = torch.zeros(10, 2, 16, dtype=cache), torch.zeros(10, 2, 16, dtype=cache)
    slots = torch.tensor([7, 0, 4])
    ops.write_kv(k, v, k_cache, v_cache, slots)
    ref_k, ref_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    ref_k.index_copy_(0, slots, k.to(cache))
    ref_v.index_copy_(0, slots, v.to(cache))
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


def test_write_kv_refuses_slots_outside_the_cache():
    k_cache, k = torch.zeros(32, 2, 16), torch.randn(2, 2, 16)
    for bad in (32, -1):
        with pytest.raises(RuntimeError, match=f"slot {bad} is outside the cache"):
            ops.write_kv(k, k, k_cache, k_cache.clone(), torch.tensor([0, bad]))


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q8_0_linear_computes_with_the_files_values(rows, dtype):
    """Exactly the Q8_0 values (codes x scales), float32 accumulation, float32 logits; every
    row-blocking path."""
    g = torch.Generator().manual_seed(rows)
    n, k = 304, 96
    w = Q8_0Weight(torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8),
                   torch.rand(n, k // 32, generator=g) * 0.02)
    lin = Q8_0Linear(w, CPU)
    x = torch.randn(rows, k, generator=g).to(dtype)
    y = lin(x)
    ref = x.double() @ w.dequantize().double().t()
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)


def test_q8_0_rows_do_not_depend_on_the_row_count():
    """The head's logits for a sequence are bitwise the same whatever else is sampled in the
    step (1 to 600 rows)."""
    g = torch.Generator().manual_seed(3)
    w = Q8_0Weight(torch.randint(-127, 128, (320, 128), generator=g, dtype=torch.int8),
                   torch.rand(320, 4, generator=g) * 0.02)
    lin = Q8_0Linear(w, CPU)
    x = torch.randn(600, 128, generator=g)
    alone = torch.cat([lin(x[i:i + 1]) for i in range(600)])
    for rows in [*range(2, 20), 64, 600]:
        assert torch.equal(lin(x[:rows]), alone[:rows]), rows


def test_loading_the_kernels_keeps_subnormal_floats():
    """The library must not switch the process to flush-to-zero (what linking -ffast-math
    code does): every other float computation in the server would change."""
    smallest_normal = float("2.2250738585072014e-308")
    assert smallest_normal / 2 > 0
    assert torch.tensor(smallest_normal, dtype=torch.float64).div(2).item() > 0


def test_a_failed_build_leaves_pytorchs_ops(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CXX", "false")  # a compiler that fails
    monkeypatch.setenv("EMBER_KERNELS_CACHE", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="ember"):
        assert kernels.load.__wrapped__() is False
    assert "CPU kernels are off" in caplog.text
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    assert kernels.load.__wrapped__() is False


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 16, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_linear_computes_with_the_dequantized_weight(group, rows, dtype, monkeypatch):
    """ember's column tiles (`int4_linear`, every CPU; the layout of float32 layers, and of
    bf16 ones where the CPU lacks AVX512-BF16): every row-blocking path against the weight's
    own dequantization, exact to float32 rounding."""
    from ember.quantization import int4
    from ember.quantization.int4 import Int4Linear, Int4Weight, column_tiles

    monkeypatch.setattr(int4.kernels, "int4_tiles", lambda device: False)
    g = torch.Generator().manual_seed(rows + group)
    w = Int4Weight.quantize(torch.randn(192, 256, generator=g), group)
    lin = Int4Linear(w, None, CPU, dtype)
    assert lin.columns and not lin.tiled and torch.equal(lin.col_codes, column_tiles(w.q))
    x = torch.randn(rows, 256, generator=g).to(dtype)
    y = lin(x)
    assert y.dtype == dtype and y.shape == (rows, 192)
    expected = F.linear(x.double(), w.dequantize().double())
    atol, rtol = (1e-4, 1e-5) if dtype == torch.float32 else (0.05, 0.01)  # bf16: the output
    torch.testing.assert_close(y.double(), expected, atol=atol, rtol=rtol)


def test_column_tiles_hold_each_code_where_the_kernel_reads_it():
    from ember.quantization.int4 import column_tiles

    q = torch.randint(0, 16, (32, 16), generator=torch.Generator().manual_seed(0),
                      dtype=torch.uint8)
    tiles = column_tiles(q)
    assert tiles.shape == (2, 2, 16) and tiles.dtype == torch.int32
    for n, k in [(0, 0), (5, 3), (17, 8), (31, 15), (8, 7)]:
        word = int(tiles[n // 16, k // 8, n % 16]) & 0xFFFFFFFF
        assert (word >> (4 * (k % 8))) & 15 == int(q[n, k])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_rows_do_not_depend_on_the_row_count(dtype):
    """Every row of a call, 1 to 600 rows (the few-row paths and the panel path, several
    threads), bitwise what a one-row call gives: a token's result does not depend on what
    shares its step. The layer's own layout: column tiles, or bf16 tiles on AVX512-BF16."""
    from ember.quantization.int4 import Int4Linear, Int4Weight

    g = torch.Generator().manual_seed(1)
    w = Int4Weight.quantize(torch.randn(160, 384, generator=g), 32)
    lin = Int4Linear(w, None, CPU, dtype)
    assert lin.columns or lin.tiled
    x = torch.randn(600, 384, generator=g).to(dtype)
    alone = torch.cat([lin(x[i:i + 1]) for i in range(600)])
    for rows in [*range(2, 33), 64, 127, 512, 600]:
        assert torch.equal(lin(x[:rows]), alone[:rows]), rows


def _int8_layer(g: torch.Generator) -> tuple[torch.nn.Module, torch.Tensor]:
    from ember.quantization.int8 import Int8Linear, Int8Weight

    w = Int8Weight.quantize(torch.randn(176, 264, generator=g))
    lin = Int8Linear(w, None, CPU, torch.float32)
    assert lin.columns
    return lin, w.dequantize()


def _dense_layer(dtype: torch.dtype):
    def make(g: torch.Generator) -> tuple[torch.nn.Module, torch.Tensor]:
        from ember.quantization.dense import DenseLinear

        linear = torch.nn.Linear(264, 176, bias=False, dtype=dtype)
        linear.weight.data.copy_(torch.randn(176, 264, generator=g))
        return DenseLinear(linear), linear.weight.float()
    return make


LAYOUTS = {"int8": _int8_layer, "float32": _dense_layer(torch.float32),
           "bfloat16": _dense_layer(torch.bfloat16)}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_int8_and_dense_column_tiles_compute_with_the_weight(layout):
    """Per-channel int8 (`int8_linear` with one group) and dense float32 / bfloat16 weights
    (`dense_linear`) in column tiles, every row-blocking path, against the weight's values."""
    g = torch.Generator().manual_seed(5)
    lin, weight = LAYOUTS[layout](g)
    dtype = torch.bfloat16 if layout == "bfloat16" else torch.float32  # a layer's activations
    for rows in (1, 2, 3, 4, 5, 6, 7, 19, 20):
        x = torch.randn(rows, 264, generator=g).to(dtype)
        y = lin(x)
        assert y.dtype == dtype and y.shape == (rows, 176)
        expected = (x.double() @ weight.double().t()).to(dtype)  # float32 sums, then rounded
        torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-5 if dtype == torch.float32
                                   else 0.01)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_int8_and_dense_rows_do_not_depend_on_the_row_count(layout):
    """`--quantization int8` layers and dense layers (the exactness mode; a GGUF file's
    F16/BF16/F32 tensors): each row of 1 to 600 bitwise its one-row call."""
    g = torch.Generator().manual_seed(6)
    lin, _ = LAYOUTS[layout](g)
    x = torch.randn(600, 264, generator=g).to(torch.bfloat16 if layout == "bfloat16"
                                              else torch.float32)
    alone = torch.cat([lin(x[i:i + 1]) for i in range(600)])
    for rows in [*range(2, 33), 64, 127, 512, 600]:
        assert torch.equal(lin(x[:rows]), alone[:rows]), rows


@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_int4_tiled_linear_computes_with_the_dequantized_weight(group, rows):
    """ember's bf16 tiles where the CPU has AVX512-BF16 (`kernels.int4_tiles`), against the
    weight's own dequantization; elsewhere bf16 layers take the column tiles and the tiled op
    refuses to run."""
    from ember.quantization.int4 import Int4Linear, Int4Weight, tile_codes

    g = torch.Generator().manual_seed(rows + group)
    w = Int4Weight.quantize(torch.randn(192, 256, generator=g), group)
    lin = Int4Linear(w, None, CPU, torch.bfloat16)
    x = torch.randn(rows, 256, generator=g).bfloat16()
    tiles = tile_codes(w.q)
    if kernels.int4_tiles(CPU):
        assert lin.tiled and not lin.columns and torch.equal(lin.tiles, tiles)
        with pytest.raises(RuntimeError, match="bfloat16"):
            lin(x.float())  # the tiled layer's activations are bf16 only
    else:
        assert lin.columns and not lin.tiled
        scales = w.scale.t().contiguous().bfloat16()
        with pytest.raises(RuntimeError, match="AVX512-BF16"):
            ops.int4_tiled_linear(x, tiles, scales, scales, group)
    y = lin(x)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 192)
    torch.testing.assert_close(y.float(), F.linear(x.float(), w.dequantize()), atol=0.3,
                               rtol=0.02)


@pytest.mark.parametrize("block", [64, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_cpu_packed_reads_both_atens_cpu_packings(block, dtype):
    """Without ember's kernels, CPU int4 layers keep ATen's packing, in blocks of 64 rows on
    AVX512, 32 on AVX2 (`cpu_block_n`): `_dequantize_cpu_packed` reads either, from a weight
    packed here by the layout's definition."""
    from ember.quantization.int4 import Int4Weight, _blocked, _dequantize_cpu_packed

    g = torch.Generator().manual_seed(block)
    w = Int4Weight.quantize(torch.randn(192, 256, generator=g), 32)
    rows = w.q.view(192 // block, 2, block // 2, 256)  # byte j: rows j and j + block / 2
    packed = (rows[:, 0] | rows[:, 1] << 4).transpose(1, 2).contiguous().view(192, 128)
    scales, zeros = _blocked(w.scale, block).to(dtype), _blocked(w.zero, block).to(dtype)
    atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else (0.1, 0.01)
    weight = _dequantize_cpu_packed(packed, scales, zeros, 256, 32)
    torch.testing.assert_close(weight.float().t(), w.dequantize(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("rows", [1, 3, 200])
def test_int4_layers_without_the_kernels_take_atens_packing(rows, monkeypatch):
    """No ember kernels (no compiler): ATen's packing, its kernel for few rows (bf16 scales:
    float32 activations rounded for it), dequantize + GEMM for many."""
    from ember.quantization import int4
    from ember.quantization.int4 import Int4Linear, Int4Weight

    monkeypatch.setattr(int4.kernels, "available", lambda device: False)
    g = torch.Generator().manual_seed(rows)
    w = Int4Weight.quantize(torch.randn(192, 256, generator=g), 32)
    lin = Int4Linear(w, None, CPU, torch.float32)
    assert not lin.tiled and not lin.columns and lin.scales_and_zeros.dtype == torch.bfloat16
    x = torch.randn(rows, 256, generator=g)
    y = lin(x)
    assert y.dtype == torch.float32 and y.shape == (rows, 192)
    torch.testing.assert_close(y, F.linear(x, w.dequantize()), atol=0.3, rtol=0.02)


def test_every_op_has_its_fake_for_torch_compile():
    """ops.py registers a fake for each op (shapes and dtypes without running it): under
    FakeTensorMode an op without one raises."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, k_cache = torch.empty(3, 64), torch.empty(32, 2, 16)
        tables, lens = torch.zeros(3, 2, dtype=torch.long), torch.ones(3, dtype=torch.long)
        q = torch.empty(3, 4, 16, dtype=torch.bfloat16)
        out = ops.cpu_paged_attention(q, k_cache, k_cache, tables,
                                      torch.arange(4, dtype=torch.long), lens, 16, 0.25)
        assert out.shape == (3, 4, 16) and out.dtype == torch.bfloat16
        assert ops.write_kv(k_cache[:3], k_cache[:3], k_cache, k_cache,
                            torch.zeros(3, dtype=torch.long)) is None
        y = ops.int8_linear(x, torch.empty(2, 64, 16, dtype=torch.int8), torch.empty(2, 2, 16))
        assert y.shape == (3, 32) and y.dtype == torch.float32
        y = ops.int4_tiled_linear(x.bfloat16(), torch.empty(2, 8, 64, dtype=torch.uint8),
                                  torch.empty(2, 2, 16), torch.empty(2, 2, 16), 32)
        assert y.shape == (3, 32)
        y = ops.int4_linear(x, torch.empty(2, 8, 16, dtype=torch.int32), torch.empty(2, 2, 16),
                            torch.empty(2, 2, 16), 32)
        assert y.shape == (3, 32) and y.dtype == torch.float32
        assert ops.dense_linear(x, torch.empty(2, 64, 16)).shape == (3, 32)
        y = ops.kquant_linear(x, [torch.empty(2, 1, 144, dtype=torch.uint8)], [0], 64, True)
        assert y.shape == (3, 32) and y.dtype == torch.float32
        rows = ops.kquant_rows(torch.empty(2, 1, 144, dtype=torch.uint8),
                               torch.zeros(5, dtype=torch.long), 0, 256)
        assert rows.shape == (5, 256) and rows.dtype == torch.float32
        step = torch.zeros(3, dtype=torch.long)
        hidden = ops.decode_layers(step, step, torch.empty(100, 64), torch.empty(8, 16),
                                   torch.empty(8, 16), [], torch.empty(64), [], [], step,
                                   tables, torch.arange(4), lens, 16, 4, 2, 32, 1e-6, 0.25, -1,
                                   128, [],
                                   torch.empty(0), torch.empty(0), 0.0, 0, 1.0)
        assert hidden.shape == (3, 64)
        ids, logprobs = ops.greedy_sample(torch.empty(3, 100))
        assert ids.shape == logprobs.shape == (3,) and ids.dtype == torch.int64
        qkv = torch.empty(3, 4, 16)
        assert ops.paged_attention(qkv, qkv[:, :2], qkv[:, :2], k_cache, k_cache, 0.25,
                                   0).shape == (3, 64)
