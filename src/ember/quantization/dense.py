"""Dense float32 / bfloat16 weights in ember's column tiles (`DenseLinear`).

ATen's matmul picks its blocking by the number of rows, so a row's result depends on how
many rows share the call: a token's logits would depend on what else is in its step.
`DenseLinear` keeps the weight in column tiles [N / 16, K, 16] and computes with ember's CPU
kernel (`ember.kernels`, dense_linear): per output, one float32 FMA chain in input order,
the same for 1 row or 600. `quantization.use_column_tiles` swaps a model's dense projections and head for
it where the kernels run (the exactness mode's layers, a GGUF file's F16/BF16/F32 tensors).
"""

from __future__ import annotations

import torch
from torch import nn

from ember.kernels import ops

TILE = 16


def fits(m: nn.Module) -> bool:
    """Whether `m` is a plain dense linear the kernel runs: float32 or bfloat16, output rows a
    multiple of 16, inputs of 8."""
    return (type(m) is nn.Linear and m.weight.dtype in (torch.float32, torch.bfloat16)
            and m.out_features % TILE == 0 and m.in_features % 8 == 0)


class DenseLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        n, k = w.shape
        # Column tiles [N / 16, K, 16]: per tile of 16 rows, each input's 16 weights together.
        self.register_buffer("tiles", w.view(n // TILE, TILE, k).transpose(1, 2).contiguous())
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = ops.dense_linear(x.reshape(-1, shape[-1]).to(self.tiles.dtype), self.tiles)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{str(self.tiles.dtype).removeprefix('torch.')}, column tiles")

