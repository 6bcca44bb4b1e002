"""What the quantized weight layouts share: codes `q` of shape [out_features, in_features], and
the per-tile order of their per-group values."""

from __future__ import annotations

import torch


class QuantizedCodes:
    q: torch.Tensor

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    @property
    def in_features(self) -> int:
        return self.q.shape[1]


def per_tile(a: torch.Tensor) -> torch.Tensor:
    """[N, groups] -> [N // 16, groups, 16]: per tile of 16 output rows, its per-group values
    (scales, zeros) group by group, the order the kernels read them in: one sequential
    stream beside the codes'."""
    n, groups = a.shape
    return a.reshape(n // 16, 16, groups).transpose(1, 2).contiguous()
