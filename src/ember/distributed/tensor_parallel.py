"""Tensor parallelism as a transform of the plain model (gpt-fast's approach).

Every rank builds the ordinary `LlamaForCausalLM` from `shard_config(cfg, world)`: its share of
the attention heads, of the MLP's intermediate size and of the (padded) vocabulary. So:

- `qkv_proj` and `gate_up_proj` are column-parallel: a rank holds the output rows of its heads
  and of its slice of the intermediate size;
- `o_proj` and `down_proj` are row-parallel: a rank holds the matching input columns and
  computes a partial sum, which a forward hook on `o_proj` / the MLP block all-reduces;
- KV heads are split like the query heads; with fewer KV heads than ranks each KV head is
  replicated on the ranks whose query heads use it;
- `embed_tokens` is vocabulary-parallel (`VocabParallelEmbedding`): a rank embeds the ids in its
  range, zeros the others, and an all-reduce assembles the rows; `lm_head` holds the same range
  and the model runner gathers the logits on rank 0.

`shard_weights` narrows each checkpoint tensor to this rank's part as it is read, so a rank
never holds more than its shard plus one checkpoint tensor.

The collectives are forward hooks (on `o_proj`, the MLP block and the embedding); the
quantization transform carries a replaced linear's hooks over to its quantized successor.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ember.config import ModelConfig
from ember.errors import ConfigError


def _valid_sizes(cfg: ModelConfig) -> list[int]:
    return [n for n in range(1, cfg.num_attention_heads + 1) if _why_not(cfg, n) is None]


def _why_not(cfg: ModelConfig, world: int) -> str | None:
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    if heads % world:
        return f"num_attention_heads={heads} is not divisible by it"
    if kv_heads % world and world % kv_heads:
        return (f"num_key_value_heads={kv_heads} can be neither split across {world} ranks "
                f"nor replicated on them (neither divides the other)")
    if cfg.intermediate_size % world:
        return f"intermediate_size={cfg.intermediate_size} is not divisible by it"
    return None


def check_shardable(cfg: ModelConfig, world: int) -> None:
    """Refuse a model that cannot be split `world` ways (before any weight is read)."""
    reason = _why_not(cfg, world)
    if reason is not None:
        raise ConfigError(
            f"tensor_parallel_size={world} cannot split this model: {reason}; sizes that "
            f"can: {', '.join(map(str, _valid_sizes(cfg)))}"
        )


def num_kv_shards(cfg: ModelConfig, world: int) -> int:
    """How many distinct KV-head shards there are (fewer than ranks when replicated)."""
    return min(cfg.num_key_value_heads, world)


def local_vocab_size(cfg: ModelConfig, world: int) -> int:
    """Rows of the embedding / LM head per rank: the vocabulary padded to a multiple of world."""
    return -(-cfg.vocab_size // world)


def shard_config(cfg: ModelConfig, world: int) -> ModelConfig:
    """The hyper-parameters of one rank's share of the model."""
    if world == 1:
        return cfg
    return dataclasses.replace(
        cfg,
        num_attention_heads=cfg.num_attention_heads // world,
        num_key_value_heads=cfg.num_key_value_heads // num_kv_shards(cfg, world),
        intermediate_size=cfg.intermediate_size // world,
        vocab_size=local_vocab_size(cfg, world),
    )


# ---- the model transform ----------------------------------------------------------------
def _all_reduce_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of a block ending in a row-parallel projection: sum the partial results."""
    dist.all_reduce(output)
    return output


class VocabParallelEmbedding(nn.Embedding):
    """Rows [vocab_start, vocab_start + num_embeddings) of the embedding; an all-reduce
    assembles each token's row from the rank that holds it."""

    def __init__(self, num_embeddings: int, embedding_dim: int, vocab_start: int) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self.vocab_start = vocab_start

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.vocab_start
        inside = (local >= 0) & (local < self.num_embeddings)
        x = F.embedding(torch.where(inside, local, 0), self.weight)
        x = x.masked_fill(~inside.unsqueeze(-1), 0)
        dist.all_reduce(x)
        return x


def parallelize(model: nn.Module, rank: int, world: int) -> None:
    """Add the collectives to a model built from `shard_config` (on the meta device, before
    its weights are allocated)."""
    for layer in model.layers:
        layer.self_attn.o_proj.register_forward_hook(_all_reduce_output)
        layer.mlp.register_forward_hook(_all_reduce_output)
    rows, dim = model.embed_tokens.weight.shape
    model.embed_tokens = VocabParallelEmbedding(rows, dim, rank * rows)
    model.tie_weights()


def gather_logits(logits: torch.Tensor, vocab_size: int, rank: int, world: int
                  ) -> torch.Tensor | None:
    """Every rank's [B, V/world] slice -> the [B, V] logits on rank 0 (None elsewhere)."""
    logits = logits.contiguous()
    parts = [torch.empty_like(logits) for _ in range(world)] if rank == 0 else None
    dist.gather(logits, parts, dst=0)
    return torch.cat(parts, dim=-1)[:, :vocab_size] if parts is not None else None


# ---- weights ------------------------------------------------------------------------------
def shard_weights(
    weights: Iterable[tuple[str, torch.Tensor]], cfg: ModelConfig, rank: int, world: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Narrow each HF-named checkpoint tensor to this rank's part, one tensor at a time."""
    kv_shards = num_kv_shards(cfg, world)
    kv_index = rank * kv_shards // world  # replicated KV heads: consecutive ranks share one
    # HF name fragment -> (dimension, number of shards, this rank's shard)
    plan = {
        "q_proj": (0, world, rank), "k_proj": (0, kv_shards, kv_index),
        "v_proj": (0, kv_shards, kv_index), "o_proj": (1, world, rank),
        "gate_proj": (0, world, rank), "up_proj": (0, world, rank), "down_proj": (1, world, rank),
    }
    rows = local_vocab_size(cfg, world)
    for name, tensor in weights:
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            part = tensor[rank * rows : (rank + 1) * rows]
            if part.shape[0] < rows:  # the padding rows of the last ranks
                part = torch.cat([part, part.new_zeros(rows - part.shape[0], *part.shape[1:])])
            yield name, part
            continue
        for frag, (dim, shards, index) in plan.items():
            if f".{frag}." in name and dim < tensor.dim():
                size = tensor.shape[dim] // shards
                tensor = tensor.narrow(dim, index * size, size)
                break
        yield name, tensor
