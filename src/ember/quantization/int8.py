"""Per-output-channel symmetric int8 weights (value = q * scale).

Where ember's CPU kernels run (and the outputs are a multiple of 16), `Int8Linear` keeps the
codes in column tiles and computes with `int8_linear` (float32 FMAs, each row the same
whatever the number of rows); elsewhere with PyTorch's int8 weight-only matmul
(`aten._weight_int8pack_mm`: y = (x @ q.T) * scale)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ember import kernels
from ember.kernels import ops
from ember.quantization.weight import QuantizedCodes, per_tile


@dataclass
class Int8Weight(QuantizedCodes):
    q: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N] float32

    @classmethod
    def quantize(cls, w: torch.Tensor) -> "Int8Weight":
        w = w.float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-8)
        q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        return cls(q, scale)

    @classmethod
    def cat(cls, parts: list["Int8Weight"]) -> "Int8Weight":
        return cls(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]))

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]

    def fits_kernel(self) -> bool:
        return True


class Int8Linear(nn.Module):
    def __init__(self, w: Int8Weight, bias: torch.Tensor | None, device: torch.device,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = w.in_features, w.out_features
        n, k = w.q.shape
        self.columns = kernels.available(device) and n % 16 == 0 and k % 8 == 0
        if self.columns:  # [N / 16, K, 16] codes and [N / 16, 1, 16] float32 scales (one group)
            self.register_buffer("codes", w.q.view(n // 16, 16, k).transpose(1, 2).contiguous()
                                 .to(device))
            self.register_buffer("scales", per_tile(w.scale.float()[:, None]).to(device))
        else:
            self.register_buffer("weight", w.q.to(device))
            self.register_buffer("scales", w.scale.to(device=device, dtype=dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(device, dtype),
                                                           requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.columns:
            y = ops.int8_linear(x, self.codes, self.scales).to(x.dtype)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
