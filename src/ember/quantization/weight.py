"""What the quantized weight layouts share: codes `q` of shape [out_features, in_features]."""

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
