"""Architecture registry: HF architecture names and GGUF `general.architecture` values ->
the model class (one decoder, with each family's choices in `config.FAMILIES`)."""

from __future__ import annotations

from torch import nn

from ember.config import FAMILIES, ModelConfig
from ember.models.llama import LlamaForCausalLM

_REGISTRY: dict[str, type[nn.Module]] = {family: LlamaForCausalLM for family in FAMILIES}


def build_model(cfg: ModelConfig, max_position: int) -> nn.Module:
    # ModelConfig already refused architectures outside HF_ARCHITECTURES.
    return _REGISTRY[cfg.family.name](cfg, max_position)
