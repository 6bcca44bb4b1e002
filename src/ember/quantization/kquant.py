"""GGUF's K-quants (Q4_K, Q5_K, Q6_K) and its 5-bit types (Q5_0, Q5_1), run from the file's codes.

A `KQuantWeight` is a matrix as the file stores it: each output row its blocks' raw bytes, so
that fusing (Q/K/V, gate/up) and llama.cpp's Q/K row permutation are row operations on bytes.
Every block is codes q (4, 5 or 6 bits) and per sub-block of 16 or 32 inputs a scale s and an
offset o, with value = q * s + o computed in float32 from the block's own fields:

- Q4_K / Q5_K (256 a block, sub-blocks of 32): s = d * sc, o = -(dmin * m), with d and dmin
  float16 per block and sc, m 6-bit per sub-block;
- Q6_K (256, sub-blocks of 16): value = d * sc * (q - 32), sc int8;
- Q5_0 (32): value = d * (q - 16); Q5_1 (32): value = d * q + m, d and m float16.

`KQuantLinear` repacks it once into ember's GEMV layout (`pack_tiles`: the same values, nothing
re-quantized) for `ember_cpu.kquant_linear` (kernels/kquant.cpp): per tile of 16 output rows
and super-block, the block fields of the 16 rows, then per 2 inputs the 16 rows' low 4 bits
(a byte a row) and the higher bits as 16-bit masks over the rows, so that the kernel decodes
16 rows at a time into two AVX2 registers (a portable loop without AVX2; bfloat16 activations on
a CPU with AVX512-BF16: bf16 dot products over the same tiles). It is as large as the file's
blocks (Q4_K/Q5_K: +2-3%, their 6-bit scales kept in bytes). Without the kernels
(EMBER_DISABLE_CPU_KERNELS=1, no compiler) the layer keeps the file's bytes and dequantizes
them in PyTorch for each matmul (fused by torch.compile).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ember import kernels
from ember.kernels import ops
from ember.errors import ModelLoadError
from ember.quantization.weight import QuantizedCodes


@dataclass(frozen=True)
class Format:
    """A GGUF block type as the kernels see it (the enum kernels/kquant.cpp switches on)."""

    name: str
    kind: int  # kernels/kquant.cpp's Kind
    block: int  # inputs per block (super-block)
    block_bytes: int
    group: int  # inputs per scale (sub-block)
    bits: int
    has_min: bool  # a float16 per block besides d (Q4_K/Q5_K: dmin, Q5_1: m)
    sc_dtype: torch.dtype | None  # the per-sub-block scale (K-quants)
    has_m: bool  # a per-sub-block 6-bit min (Q4_K/Q5_K)

    @property
    def meta_bytes(self) -> int:
        """Per tile and block: d, then dmin/m, then sc and m per sub-block, 16 rows each."""
        per_group = (self.sc_dtype is not None) + self.has_m
        return 32 * (1 + self.has_min) + 16 * per_group * (self.block // self.group)

    @property
    def record_bytes(self) -> int:
        """Per tile and 2 inputs: 16 bytes of nibbles, then 2 masks a bit above the 4th."""
        return 16 + 4 * (self.bits - 4)


FORMATS = {f.name: f for f in (
    Format("Q4_K", 0, 256, 144, 32, 4, True, torch.uint8, True),
    Format("Q5_K", 1, 256, 176, 32, 5, True, torch.uint8, True),
    Format("Q6_K", 2, 256, 210, 16, 6, False, torch.int8, False),
    Format("Q5_0", 3, 32, 22, 32, 5, False, None, False),
    Format("Q5_1", 4, 32, 24, 32, 5, True, None, False),
)}
_N_TILE = 16


@dataclass
class Fields:
    """A matrix's blocks taken apart: codes q [N, K] uint8; d (and dmin) float16 [N, K / block];
    sc and m per sub-block [N, K / group] (K-quants)."""

    q: torch.Tensor
    d: torch.Tensor
    dmin: torch.Tensor | None
    sc: torch.Tensor | None
    m: torch.Tensor | None


def _f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).squeeze(-1)


def _bits(b: torch.Tensor, count: int) -> torch.Tensor:
    """[..., n] bytes -> [..., n, count] their low `count` bits, least significant first."""
    return (b.unsqueeze(-1) >> torch.arange(count, dtype=torch.uint8)) & 1


def _nibbles_by_32(qs: torch.Tensor) -> torch.Tensor:
    """[..., 32 j] bytes -> [..., 64 j] codes: per 32 bytes their low nibbles, then high."""
    b = qs.unflatten(-1, (-1, 32))
    return torch.stack([b & 15, b >> 4], dim=-2).flatten(-3)


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes of Q4_K/Q5_K -> 8 6-bit scales and 8 6-bit mins (as ggml's
    get_scale_min_k4)."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], dim=-1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=-1)
    return sc, mn


def unpack(raw: torch.Tensor, fmt: Format, shape: tuple[int, int]) -> Fields:
    """The fields of an [N, K] matrix stored as `raw` (its bytes, any shape) in `fmt`."""
    n, k = shape
    b = raw.reshape(n, k // fmt.block, fmt.block_bytes)
    if fmt.name in ("Q4_K", "Q5_K"):
        sc, m = _scale_min_k4(b[..., 4:16])
        if fmt.name == "Q4_K":
            q = _nibbles_by_32(b[..., 16:144])
        else:  # bit j of qh[l] is bit 4 of code l of sub-block j
            high = _bits(b[..., 16:48], 8).transpose(-1, -2)  # [.., 8 sub-blocks, 32]
            q = _nibbles_by_32(b[..., 48:176]) | (high.flatten(-2) << 4)
        return Fields(q.reshape(n, k), _f16(b[..., 0:2]), _f16(b[..., 2:4]),
                      sc.reshape(n, -1), m.reshape(n, -1))
    if fmt.name == "Q6_K":
        ql = b[..., 0:128].unflatten(-1, (2, 2, 32))  # [.., half, which 32, 32]
        qh = b[..., 128:192].unflatten(-1, (2, 1, 32))  # [.., half, 1, 32]
        low = torch.stack([ql & 15, ql >> 4], dim=-3).flatten(-3, -2)  # [.., half, 4, 32]
        high = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8)[:, None]) & 3
        q = low | (high << 4)  # [.., half, 4 chunks of 32, 32]
        sc = b[..., 192:208].contiguous().view(torch.int8)
        return Fields(q.reshape(n, k), _f16(b[..., 208:210]), None, sc.reshape(n, -1), None)
    # Q5_0 / Q5_1: d (, m), 32 high bits, 16 bytes of nibbles (elements j and j + 16)
    off = 4 if fmt.has_min else 2
    high = _bits(b[..., off:off + 4], 8).flatten(-2)  # [.., 32]
    qs = b[..., off + 4:off + 20]
    q = torch.cat([qs & 15, qs >> 4], dim=-1) | (high << 4)
    return Fields(q.reshape(n, k), _f16(b[..., 0:2]), _f16(b[..., 2:4]) if fmt.has_min else None,
                  None, None)


def scales_offsets(f: Fields, fmt: Format) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sub-block s and o [N, K / group] float32 with value = q * s + o (exact: every
    product of these fields fits float32's mantissa)."""
    per_block = fmt.block // fmt.group
    d = f.d.float().repeat_interleave(per_block, dim=-1)
    if fmt.sc_dtype is None:  # Q5_0, Q5_1
        return d, (f.dmin.float() if fmt.has_min else -16 * d)
    s = d * f.sc.float()
    if fmt.has_m:
        return s, -(f.dmin.float().repeat_interleave(per_block, dim=-1) * f.m.float())
    return s, -32 * s  # Q6_K


def _dequantize_fields(f: Fields, fmt: Format) -> torch.Tensor:
    """The float32 [N, K] values, op for op as gguf's `quants.dequantize` (bit-exact)."""
    n, k = f.q.shape
    s, o = scales_offsets(f, fmt)
    q = f.q.float().view(n, -1, fmt.group)
    s, o = s[..., None], o[..., None]
    if fmt.name == "Q6_K":
        w = s * (q - 32)
    elif fmt.name == "Q5_0":
        w = s * (q - 16)
    else:
        w = s * q + o
    return w.view(n, k)


def dequantize(raw: torch.Tensor, fmt: Format, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor of logical row-major `shape` stored as `raw` in `fmt`, as float32."""
    rows = 1
    for s in shape[:-1]:
        rows *= s
    return _dequantize_fields(unpack(raw, fmt, (rows, shape[-1])), fmt).reshape(shape)


# ---- ember's GEMV layout -----------------------------------------------------------------


def _row_masks(bits: torch.Tensor) -> torch.Tensor:
    """[..., 16] 0/1 per row -> [..., 2] bytes: the little-endian 16-bit mask of the rows."""
    mask = (bits.int() << torch.arange(16, dtype=torch.int32)).sum(-1, dtype=torch.int32)
    return mask.unsqueeze(-1).view(torch.uint8)[..., :2]


def _per_tile(t: torch.Tensor, blocks: int) -> torch.Tensor:
    """[N, blocks * j] per-row values -> [N / 16, blocks, j * 16 * itemsize] bytes: per tile
    and block, entry i of the 16 rows' values together."""
    n = t.shape[0]
    v = t.reshape(n // 16, 16, blocks, -1).permute(0, 2, 3, 1).contiguous()
    return v.view(torch.uint8).reshape(n // 16, blocks, -1)


def pack_tiles(f: Fields, fmt: Format) -> torch.Tensor:
    """The kernel's layout [N / 16, K / block, meta_bytes + block / 2 * record_bytes] uint8."""
    n, k = f.q.shape
    blocks = k // fmt.block
    t = f.q.view(n // 16, 16, k // 2, 2).permute(0, 2, 3, 1)  # [tile, input pair, e, row]
    records = [(t[:, :, 0] & 15) | ((t[:, :, 1] & 15) << 4)]  # [tile, pair, 16]
    for bit in range(4, fmt.bits):
        records.append(_row_masks((t >> bit) & 1).flatten(-2))  # [tile, pair, 4]
    codes = torch.cat(records, dim=-1).reshape(n // 16, blocks, -1)
    meta = [_per_tile(f.d, blocks)]
    if fmt.has_min:
        meta.append(_per_tile(f.dmin, blocks))
    if fmt.sc_dtype is not None:
        meta.append(_per_tile(f.sc.to(fmt.sc_dtype), blocks))
    if fmt.has_m:
        meta.append(_per_tile(f.m, blocks))
    return torch.cat([*meta, codes], dim=-1).contiguous()


@dataclass
class KQuantWeight(QuantizedCodes):
    """An [N, K] matrix as GGUF blocks, its output rows in segments of one type each (a fused
    Q/K/V of Q4_K and Q6_K parts, as llama.cpp's Q4_K_M mixes them): per segment its format
    and raw rows [rows, K / block * block_bytes] uint8."""

    segments: list[tuple[Format, torch.Tensor]]
    k: int

    @classmethod
    def of(cls, raw: torch.Tensor, fmt: Format, k: int) -> "KQuantWeight":
        return cls([(fmt, raw.reshape(raw.shape[0], -1))], k)

    @property
    def out_features(self) -> int:
        return sum(raw.shape[0] for _, raw in self.segments)

    @property
    def in_features(self) -> int:
        return self.k

    @classmethod
    def cat(cls, parts: list["KQuantWeight"]) -> "KQuantWeight":
        """Fuse projections that share the input: stack output rows (one segment per run of
        one type)."""
        segments: list[tuple[Format, torch.Tensor]] = []
        for fmt, raw in (seg for p in parts for seg in p.segments):
            if segments and segments[-1][0] == fmt:
                segments[-1] = (fmt, torch.cat([segments[-1][1], raw]))
            else:
                segments.append((fmt, raw))
        return cls(segments, parts[0].k)

    def permute_rows(self, perm: torch.Tensor) -> "KQuantWeight":
        (fmt, raw), = self.segments
        return KQuantWeight([(fmt, raw[perm])], self.k)

    def dequantize(self) -> torch.Tensor:
        return torch.cat([dequantize(raw, fmt, (raw.shape[0], self.k))
                          for fmt, raw in self.segments])

    def fits_kernel(self) -> bool:
        return all(raw.shape[0] % _N_TILE == 0 and self.k % fmt.block == 0
                   for fmt, raw in self.segments)


def kernel_serves(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `ember_cpu.kquant_linear` runs K-quant layers on `device` with `dtype`
    activations (float32 or bfloat16, the kernels built)."""
    return dtype in (torch.float32, torch.bfloat16) and kernels.available(device)


class KQuantLinear(nn.Module):
    def __init__(self, w: KQuantWeight, bias: torch.Tensor | None, device: torch.device,
                 dtype: torch.dtype, float_out: bool = False) -> None:
        """`float_out`: float32 outputs (a head's logits) instead of `dtype`."""
        super().__init__()
        self.in_features, self.out_features = w.in_features, w.out_features
        self.formats = [fmt for fmt, _ in w.segments]
        self.kinds = [fmt.kind for fmt in self.formats]
        self.float_out = float_out
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(device, dtype),
                                                           requires_grad=False)
        self.tiled = kernel_serves(device, dtype) and w.fits_kernel()
        # Per segment: ember's layout, or (without its kernel) the file's bytes, dequantized
        # in PyTorch for each matmul.
        for i, (fmt, raw) in enumerate(w.segments):
            data = pack_tiles(unpack(raw, fmt, (raw.shape[0], w.k)), fmt) if self.tiled else raw
            self.register_buffer(f"segment_{i}", data.to(device))

    @property
    def segments(self) -> list[torch.Tensor]:
        return [getattr(self, f"segment_{i}") for i in range(len(self.kinds))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.tiled:
            y = ops.kquant_linear(x, self.segments, self.kinds, self.in_features,
                                  self.float_out)
        else:
            w = torch.cat([dequantize(raw, fmt, (raw.shape[0], self.in_features))
                           for fmt, raw in zip(self.formats, self.segments)])
            y = torch.mm(x, w.to(x.dtype).t())
            if self.float_out:
                y = y.float()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of the weight (an embedding lookup of the matrix), in `dtype`; a weight
        of one segment."""
        (fmt,), (data,) = self.formats, self.segments
        if self.tiled:
            return ops.kquant_rows(data, ids, fmt.kind, self.in_features).to(dtype)
        raw = data[ids.reshape(-1)]
        w = dequantize(raw, fmt, (raw.shape[0], self.in_features))
        return w.to(dtype).reshape(*ids.shape, self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{'+'.join(f.name for f in self.formats)}{', tiled' if self.tiled else ''}")


class KQuantEmbedding(nn.Module):
    """An embedding table kept as a K-quant matrix (GGUF's Q6_K `token_embd`), the same
    `KQuantLinear` as the head when they are tied: rows are dequantized as they are looked up."""

    def __init__(self, linear: KQuantLinear, dtype: torch.dtype) -> None:
        super().__init__()
        self.linear = linear
        # Empty: it carries the table's dtype and device for the code that asks
        # `embed_tokens.weight` (the rotary tables' dtype, compilation, the fused decode).
        device = linear.segments[0].device
        self.register_buffer("weight", torch.empty(0, linear.in_features, dtype=dtype,
                                                   device=device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.linear.rows(ids, self.weight.dtype)


def install_edges(model: nn.Module, weights: dict[str, KQuantWeight], tied: bool) -> None:
    """Keep a K-quant `embed_tokens.weight` (and the head tied to it) and a K-quant
    `lm_head.weight` as their codes: `KQuantEmbedding`, `KQuantLinear` with float32 logits.
    Where the kernels do not serve them, they are dense (the caller loads them so)."""
    table = model.embed_tokens.weight
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    for name, w in weights.items():
        if (w.out_features, w.in_features) != (vocab, hidden):
            raise ModelLoadError(f"{name}: checkpoint shape {(w.out_features, w.in_features)}, "
                                 f"model expects {(vocab, hidden)}")
        lin = KQuantLinear(w, None, table.device, table.dtype, float_out=True)
        if name == "embed_tokens.weight":
            model.embed_tokens = KQuantEmbedding(lin, table.dtype)
        if name == "lm_head.weight" or tied:
            model.lm_head = lin


def keeps_edge(w: KQuantWeight, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether an embedding / head stays as its codes on `device` (else it is loaded dense:
    the PyTorch path would dequantize the whole head at every step)."""
    return kernel_serves(device, dtype) and w.fits_kernel()
