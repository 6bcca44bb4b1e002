"""Group-wise asymmetric int4 weights: PyTorch's int4 weight-only matmul.

`Int4Weight` is the unpacked form: `q` in 0..15 per element, and per group of `group_size`
input columns a `scale` and a `zero`, with value = (q - 8) * scale + zero (the convention of
`aten._weight_int4pack_mm`). GGUF's blocks are this layout with group 32:
Q4_1 (value = q * d + m) is scale = d, zero = m + 8 d; Q4_0 (value = (q - 8) * d) is zero = 0.
`Int4Linear` packs it once for its device's kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ember.quantization.weight import QuantizedCodes

# The packed kernels' shape rules: output rows in tiles of 16.
_N_TILE = 16


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
        if device.type == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        else:  # CUDA: two nibbles a byte, high nibble first, then the tiled layout
            packed = torch.ops.aten._convert_weight_to_int4pack(
                (q[:, ::2] << 4 | q[:, 1::2]).contiguous(), 8)
        self.register_buffer("weight", packed)
        # [K // group, N, 2]: (scale, zero) per group and output row, in the activation dtype.
        sz = torch.stack([w.scale, w.zero], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("scales_and_zeros", sz.to(device=device, dtype=dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(device, dtype),
                                                           requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if x.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, self.weight, self.group_size, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm(
                x, self.weight, self.group_size, self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}")
