"""GGUF's Q8_0 weights as they are: int8 codes with one scale per 32 inputs (value = q * d).

The LM head of most GGUF files (and the embedding it is tied to, in small models) is Q8_0.
Run dense, it is the largest matrix a decode step reads: 28M weights for the default model,
56 MB in bf16. `Q8_0Linear` keeps the file's codes, in ember's column tiles, and computes with
ember's CPU kernel (`ember.kernels`, int8_linear) at 1.13 bytes a weight, exactly the file's
values, accumulating in float32, each row of logits the same whatever the number of rows; its
output (the logits) is float32. It is used only where that kernel runs (`kernels.available`,
a vocabulary of a multiple of 16); elsewhere the head stays dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ember.kernels import ops
from ember.quantization.weight import QuantizedCodes, per_tile

GROUP = 32


@dataclass
class Q8_0Weight(QuantizedCodes):
    q: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N, K // 32] float32 (GGUF's float16 d, widened)

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        return (self.q.float().view(n, k // GROUP, GROUP) * self.scale[..., None]).view(n, k)

    def fits_kernel(self) -> bool:
        return self.out_features % 16 == 0 and self.in_features % GROUP == 0


class Q8_0Linear(nn.Module):
    def __init__(self, w: Q8_0Weight, device: torch.device) -> None:
        super().__init__()
        self.in_features, self.out_features = w.in_features, w.out_features
        n, k = w.q.shape
        # Column tiles [N / 16, K, 16]: per tile of 16 rows, each input's 16 codes together.
        self.register_buffer("codes", w.q.view(n // 16, 16, k).transpose(1, 2).contiguous().to(device))
        # [N / 16, K / 32, 16]: per tile, group by group, as the kernel reads them.
        self.register_buffer("scales", per_tile(w.scale).to(device, torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = ops.int8_linear(x.reshape(-1, shape[-1]), self.codes, self.scales)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, Q8_0"
