"""Architecture registry: HF architecture name -> model class."""

from __future__ import annotations

from torch import nn

from ember.config import SUPPORTED_ARCHITECTURES, ModelConfig
from ember.models.llama import LlamaForCausalLM

_REGISTRY: dict[str, type[nn.Module]] = {arch: LlamaForCausalLM for arch in SUPPORTED_ARCHITECTURES}


def build_model(cfg: ModelConfig, max_position: int) -> nn.Module:
    # ModelConfig already refused architectures outside SUPPORTED_ARCHITECTURES.
    return _REGISTRY[cfg.architecture](cfg, max_position)
