"""Rotary position embeddings (HF's rotate-half layout), with Llama-3 (its parameters, or a GGUF
file's per-frequency divisors) and linear scaling."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ember.errors import ModelLoadError


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_len = scaling.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(
        self, head_dim: int, max_position: int, theta: float, scaling: dict[str, Any] | None
    ) -> None:
        super().__init__()
        self.head_dim, self.max_position, self.theta = head_dim, max_position, theta
        self.scaling = scaling or {}
        self.register_buffer("cos", torch.empty(max_position, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_position, head_dim), persistent=False)
        self.reset_tables()

    @torch.no_grad()
    def reset_tables(self) -> None:
        """(Re)compute the cos/sin tables: after building on the meta device, for instance."""
        if self.cos.is_meta:
            return
        d = self.head_dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        positions = torch.arange(self.max_position, dtype=torch.float32)
        rope_type = self.scaling.get("rope_type", self.scaling.get("type", "default"))
        if rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, self.scaling)
        elif rope_type == "freq_factors":  # a GGUF file's rope_freqs (Llama 3's scaling)
            factors = torch.tensor(self.scaling["freq_factors"], dtype=torch.float32)
            if factors.shape != inv_freq.shape:
                raise ModelLoadError(f"rope_freqs.weight holds {factors.numel()} factors, "
                                     f"the head size needs {inv_freq.numel()}")
            inv_freq = inv_freq / factors
        elif rope_type == "linear":
            positions = positions / self.scaling["factor"]
        elif rope_type != "default":
            raise ModelLoadError(
                f"unsupported rope_scaling type {rope_type!r}; supported: default, linear, llama3"
            )
        freqs = torch.outer(positions, inv_freq)
        # One [max_position, head_dim] table each for cos and sin, indexed by token position.
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos.copy_(emb.cos())
        self.sin.copy_(emb.sin())

    def forward(self, positions: torch.Tensor, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, 1, D] of the batch's positions, looked up once per step and
        shared by every layer."""
        return (self.cos[positions].unsqueeze(1).to(dtype),
                self.sin[positions].unsqueeze(1).to(dtype))


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, H, D], k: [T, Hkv, D]; cos, sin: [T, 1, D]."""
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)
