import torch
from torch import nn


class RMSNorm(nn.Module):
    """Normalises in float32 whatever the model dtype: low-precision variance loses accuracy."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: the residual stream (float32); returns the matmuls' input, in the weight dtype."""
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)
