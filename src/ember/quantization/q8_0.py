"""GGUF's Q8_0 weights as they are: int8 codes with one scale per 32 inputs (value = q * d).

The LM head of most GGUF files (and the embedding it is tied to, in small models) is Q8_0.
Run dense, it is the largest matrix a decode step reads: 28M weights for the default model,
56 MB in bf16. `Q8_0Linear` keeps the file's codes and computes with ember's CPU kernel
(`ember.kernels`, q8_0_linear) at 1.06 bytes a weight, exactly the file's values, accumulating
in float32; its output (the logits) is float32. It is used only where that kernel runs
(`kernels.available`); elsewhere the head stays dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ember.kernels import ops
from ember.quantization.weight import QuantizedCodes

GROUP = 32


@dataclass
class Q8_0Weight(QuantizedCodes):
    q: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N, K // 32] float32 (GGUF's float16 d, widened)

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        return (self.q.float().view(n, k // GROUP, GROUP) * self.scale[..., None]).view(n, k)


# From this many rows on (a batch of decodes), a GEMM is compute-bound, and the dense tied
# embedding, when there is one, runs it faster (bf16 dot-product instructions).
DENSE_MIN_ROWS = 8


class Q8_0Linear(nn.Module):
    def __init__(self, w: Q8_0Weight, device: torch.device,
                 dense: torch.Tensor | None = None) -> None:
        """`dense`: the same matrix in the model dtype, when the model holds it anyway (a
        head tied to the embedding), for batches of `DENSE_MIN_ROWS` rows or more."""
        super().__init__()
        self.in_features, self.out_features = w.in_features, w.out_features
        self.register_buffer("weight", w.q.to(device).contiguous())
        self.register_buffer("scales", w.scale.to(device, torch.float32).contiguous())
        self.dense = dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.dense is not None and x.shape[0] >= DENSE_MIN_ROWS:
            y = torch.nn.functional.linear(x.to(self.dense.dtype), self.dense).float()
        else:
            y = ops.q8_0_linear(x, self.weight, self.scales)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, Q8_0"
