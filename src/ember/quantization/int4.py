"""Group-wise asymmetric int4 weights: PyTorch's int4 weight-only matmul.

`Int4Weight` is the unpacked form: `q` in 0..15 per element, and per group of `group_size`
input columns a `scale` and a `zero`, with value = (q - 8) * scale + zero (the convention of
`aten._weight_int4pack_mm`). GGUF's blocks are this layout with group 32:
Q4_1 (value = q * d + m) is scale = d, zero = m + 8 d; Q4_0 (value = (q - 8) * d) is zero = 0.
`Int4Linear` packs it once for its device's kernel.

With ember's CPU kernels (`ember.kernels`) the codes are kept in ember's own layouts, and every
row of a matmul is computed as a one-row call computes it, whatever the row count (a prompt, a
batch of decodes, a speculative verify): a token's result does not depend on what shares its
step. Where the CPU has AVX512-BF16 and the activations are bfloat16: the bf16 tiles
(`tile_codes`) and `int4_tiled_linear` (bf16 dot-product instructions). Elsewhere: the column
tiles (`column_tiles`) and `int4_linear` (float32 FMAs, vectorized across outputs; float32 or
bfloat16 activations).

Without the kernels (no compiler) or on CUDA: ATen's packing and its int4 kernel; on CPU, for a
batch of `DENSE_MIN_TOKENS` rows or more, the weight dequantized from the packed tensor itself
(no second copy kept) and a dense GEMM.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from ember import kernels
from ember.kernels import ops
from ember.quantization.weight import QuantizedCodes, per_tile

# The packed kernels' shape rules: output rows in tiles of 16.
_N_TILE = 16
# Without ember's kernels, from this many input rows on, dequantize + dense GEMM beats ATen's
# int4 kernel: compiled, the dequantization is one fused pass (the crossover measured near 16
# rows); eager it takes several passes, worth it only for long prompts.
DENSE_MIN_TOKENS = 16
DENSE_MIN_TOKENS_EAGER = 192
# ATen's CPU packing, by the CPU capability ATen dispatches to: output rows in blocks of 64
# (AVX512) or 32 (AVX2); per block, K-major, one byte holding rows j (low nibble) and
# j + block / 2 (high nibble) of the block at one input column. Other builds pack otherwise.
_CPU_BLOCKS_N = (64, 32)


@functools.cache
def cpu_block_n() -> int | None:
    """The output rows per block of this build's int4 packing, as `_dequantize_cpu_packed`
    reads it, or None where it packs otherwise (checked on a small matrix: the packing depends
    on the CPU capability ATen was dispatched to)."""
    n = max(_CPU_BLOCKS_N)
    q = torch.randint(0, 16, (n, 32), generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    if packed.numel() != q.numel() // 2:
        return None
    for block in _CPU_BLOCKS_N:
        half = block // 2
        blocks = packed.view(n // block, 32, half)  # [N / block, K, block / 2]
        rows = q.view(n // block, 2, half, 32)
        if (torch.equal((blocks & 15).transpose(1, 2).int(), rows[:, 0].int())
                and torch.equal((blocks >> 4).transpose(1, 2).int(), rows[:, 1].int())):
            return block
    return None


def cpu_layout_known() -> bool:
    """Whether this build packs int4 weights as `_dequantize_cpu_packed` reads them."""
    return cpu_block_n() is not None


def _dequantize_cpu_packed(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                           k: int, group_size: int) -> torch.Tensor:
    """The [K, N] transposed weight, in the scales' dtype, from ATen's CPU packing (the block
    size read off the scales' [K / G, 1, N / block, 2, block / 2] shape). Written as two
    nibble halves stacked (not a cat), with the scales and zeros in the blocks' order and
    contiguous, so that Inductor vectorizes it in one pass (strided scales defeat that)."""
    n, half = packed.shape[0], scales.shape[-1]
    nb, g = n // (2 * half), k // group_size
    p = packed.view(nb, k, half).permute(1, 0, 2).reshape(g, group_size, nb, half)
    lo = ((p & 15).to(scales.dtype) - 8) * scales[:, :, :, 0] + zeros[:, :, :, 0]
    hi = ((p >> 4).to(scales.dtype) - 8) * scales[:, :, :, 1] + zeros[:, :, :, 1]
    return torch.stack([lo, hi], dim=3).view(k, n)


def tile_codes(q: torch.Tensor) -> torch.Tensor:
    """[N, K] codes (0..15) -> ember's GEMV layout [N / 16, K / 8, 64] uint8: per tile of 16
    rows and 8 columns k0.., in 128-bit lane i, byte 2d + e holds row 4i + d at k0 + e (low
    nibble) and k0 + 4 + e (high), byte 8 + 2d + e the same row at k0 + 2 + e and k0 + 6 + e
    (see `int4_gemv_tiles` in kernels/int4.cpp)."""
    n, k = q.shape
    t = q.view(n // 16, 16, k // 8, 8)
    b = torch.arange(64, device=q.device)
    lane, within, half = b // 16, b % 8, (b % 16) // 8
    row, e = 4 * lane + within // 2, within % 2
    lo = t[:, row, :, 2 * half + e]  # [64, N / 16, K / 8]
    hi = t[:, row, :, 4 + 2 * half + e]
    return (lo | hi << 4).permute(1, 2, 0).contiguous()


def column_tiles(q: torch.Tensor) -> torch.Tensor:
    """[N, K] codes (0..15) -> ember's column tiles [N / 16, K / 8, 16] int32: per tile of 16
    rows and 8 inputs k0.., word i holds row i's code at k0 + j in bits 4j..4j + 3 (see
    `int4_linear` in kernels/int4.cpp)."""
    n, k = q.shape
    t = q.view(n // 16, 16, k // 8, 8).to(torch.int64)
    words = (t << (4 * torch.arange(8, device=q.device))).sum(-1)  # [N / 16, 16, K / 8]
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # as int32's bits
    return words.to(torch.int32).transpose(1, 2).contiguous()


def _blocked(t: torch.Tensor, block: int) -> torch.Tensor:
    """[N, K / G] per-row group values -> [K / G, 1, N / block, 2, block / 2], the blocks'
    order."""
    n, g = t.shape
    return t.t().reshape(g, 1, n // block, 2, block // 2).contiguous()


@dataclass
class Int4Weight(QuantizedCodes):
    q: torch.Tensor  # [N, K] uint8, 0..15
    scale: torch.Tensor  # [N, K // group_size] float32
    zero: torch.Tensor  # [N, K // group_size] float32
    group_size: int

    @classmethod
    def from_q4_1(cls, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> "Int4Weight":
        d, m = d.float(), m.float()
        return cls(q, d, m + 8 * d, 32)

    @classmethod
    def from_q4_0(cls, q: torch.Tensor, d: torch.Tensor) -> "Int4Weight":
        d = d.float()
        return cls(q, d, torch.zeros_like(d), 32)

    @classmethod
    def quantize(cls, w: torch.Tensor, group_size: int) -> "Int4Weight":
        """Round a dense [N, K] weight to 16 levels per group, spanning its min..max."""
        n, k = w.shape
        g = w.float().reshape(n, k // group_size, group_size)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8)
        return cls(q.reshape(n, k), scale, lo + 8 * scale, group_size)

    @classmethod
    def cat(cls, parts: list["Int4Weight"]) -> "Int4Weight":
        """Fuse projections that share the input (Q/K/V, gate/up): stack output rows."""
        return cls(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                   torch.cat([p.zero for p in parts]), parts[0].group_size)

    def permute_rows(self, perm: torch.Tensor) -> "Int4Weight":
        return Int4Weight(self.q[perm], self.scale[perm], self.zero[perm], self.group_size)

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        q = self.q.float().reshape(n, -1, self.group_size) - 8
        return (q * self.scale[..., None] + self.zero[..., None]).reshape(n, k)

    def fits_kernel(self) -> bool:
        return self.out_features % _N_TILE == 0 and self.in_features % self.group_size == 0


class Int4Linear(nn.Module):
    def __init__(self, w: Int4Weight, bias: torch.Tensor | None, device: torch.device,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = w.in_features, w.out_features
        self.group_size = w.group_size
        q = w.q.to(device)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(device, dtype),
                                                           requires_grad=False)
        # ember's own layouts and kernels where they run, instead of ATen's.
        self.tiled = dtype == torch.bfloat16 and kernels.int4_tiles(device)
        self.columns = not self.tiled and kernels.available(device)
        self.dense_for_many_rows = False
        if self.tiled:
            self.register_buffer("tiles", tile_codes(q))
            # [N // 16, K // group, 16]: per tile of 16 rows, its groups' scales (zeros) in
            # the order the GEMV reads them, one sequential stream beside the codes'.
            self.register_buffer("tile_scales", per_tile(w.scale).to(device, dtype))
            self.register_buffer("tile_zeros", per_tile(w.zero).to(device, dtype))
            return
        if self.columns:
            self.register_buffer("col_codes", column_tiles(q))
            # [N // 16, K // group, 16] float32 (per tile, group by group): value = q * scale
            # + offset.
            self.register_buffer("col_scales", per_tile(w.scale).to(device))
            self.register_buffer("col_offsets", per_tile(w.zero - 8 * w.scale).to(device))
            return
        if device.type == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        else:  # CUDA: two nibbles a byte, high nibble first, then the tiled layout
            packed = torch.ops.aten._convert_weight_to_int4pack(
                (q[:, ::2] << 4 | q[:, 1::2]).contiguous(), 8)
        self.register_buffer("weight", packed)
        # [K // group, N, 2]: (scale, zero) per group and output row, in the dtype ATen's
        # kernel runs: on CPU bf16 always, since its float32 path is not vectorized (float32
        # activations are rounded to bf16 for it), else the activations'.
        sz = torch.stack([w.scale, w.zero], dim=-1).transpose(0, 1).contiguous()
        aten_dtype = torch.bfloat16 if device.type == "cpu" else dtype
        self.register_buffer("scales_and_zeros", sz.to(device=device, dtype=aten_dtype))
        block = cpu_block_n() if device.type == "cpu" else None
        self.dense_for_many_rows = block is not None and w.out_features % block == 0
        if self.dense_for_many_rows:  # a second copy of the scales (1/8 byte per weight)
            self.register_buffer("dense_scales", _blocked(w.scale, block).to(dtype))
            self.register_buffer("dense_zeros", _blocked(w.zero, block).to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        many = DENSE_MIN_TOKENS if torch.compiler.is_compiling() else DENSE_MIN_TOKENS_EAGER
        if self.tiled:
            y = ops.int4_tiled_linear(x, self.tiles, self.tile_scales, self.tile_zeros,
                                      self.group_size)
        elif self.columns:
            y = ops.int4_linear(x, self.col_codes, self.col_scales, self.col_offsets,
                                self.group_size)
        elif self.dense_for_many_rows and x.shape[0] >= many:
            y = torch.mm(x, _dequantize_cpu_packed(self.weight, self.dense_scales,
                                                   self.dense_zeros, self.in_features,
                                                   self.group_size))
        elif x.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.to(self.scales_and_zeros.dtype), self.weight, self.group_size,
                self.scales_and_zeros).to(x.dtype)
        else:
            y = torch.ops.aten._weight_int4pack_mm(
                x, self.weight, self.group_size, self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}")
