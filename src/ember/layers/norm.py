import torch
from torch import nn


class RMSNorm(nn.Module):
    """Normalises in float32 whatever the model dtype: low-precision variance loses accuracy.
    With `offset` 1 (Gemma) the scale is (1 + w), computed in float32 as HF does."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: the residual stream (float32) or a head's q / k; returns the matmuls' input,
        in the weight dtype."""
        dtype = self.weight.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (x * (self.offset + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)
