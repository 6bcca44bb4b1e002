"""The decoder of every supported family (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, Gemma 3,
Phi-3, SmolLM) in plain PyTorch, with the family's choices from `ModelConfig.family`:
QKV bias, QK-norm, Gemma's four norms a layer with (1 + w) weights, GELU-tanh, scaled
embeddings, and sliding-window layers with a rotary base of their own.

The model knows nothing of scheduling: it takes a flat batch of tokens (all sequences'
new tokens concatenated), their positions, the per-layer KV cache and an `AttentionMetadata`.
Q/K/V and gate/up projections are fused into one matmul each; `load_weights` maps HF names
onto the fused parameters (Phi-3 stores them fused already).
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ember import kernels, memory
from ember.config import ModelConfig
from ember.errors import ModelLoadError
from ember.layers.attention import AttentionMetadata, PagedAttention, attention_metadata
from ember.layers.norm import RMSNorm
from ember.layers.rotary import RotaryEmbedding, apply_rotary
from ember.models.fused_decode import FusedDecode
from ember.quantization import QuantizedWeight, install_quantized, kquant
from ember.quantization.q8_0 import Q8_0Linear, Q8_0Weight

logger = logging.getLogger("ember")

KVCache = tuple[torch.Tensor, torch.Tensor]
_ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias
        )
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        family = cfg.family
        self.q_norm = self.k_norm = None
        if family.qk_norm:  # per head, before rotary
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, family.norm_offset)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, family.norm_offset)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim,
                                   cfg.attention_scale, cfg.layer_window(layer))

    def qkv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project and rotate: q [T, H, D], k and v [T, Hkv, D]."""
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, k, *rope)
        return q, k, v


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = _ACTIVATIONS[cfg.family.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        family = cfg.family

        def norm() -> RMSNorm:
            return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, family.norm_offset)

        self.input_layernorm = norm()
        self.self_attn = LlamaAttention(cfg, layer)
        # Llama's second norm is the MLP's input; Gemma's normalizes the attention's output
        # and two more surround the MLP (HF's names either way).
        self.post_attention_layernorm = norm()
        self.sandwich = family.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.mlp = LlamaMLP(cfg)
        # Which of the model's rotary tables this layer uses (1: the sliding layers' own).
        self.rope_index = int(cfg.rope_local_theta is not None and cfg.layer_window(layer) > 0)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin of the tokens' positions
        kv_cache: KVCache,
    ) -> torch.Tensor:
        h = self.input_layernorm(x)
        q, k, v = self.self_attn.qkv(h, rope)
        o = self.self_attn.o_proj(self.self_attn.attn(q, k, v, kv_cache[0], kv_cache[1]))
        if self.sandwich:
            x = x + self.post_attention_layernorm(o)
            return x + self.post_feedforward_layernorm(
                self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + o
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    # HF parameter name fragment -> (fused parameter fragment, shard index)
    stacked_params = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig, max_position: int) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.family.norm_offset)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.rotary = RotaryEmbedding(
            cfg.head_dim, max_position, cfg.rope_theta, cfg.rope_scaling
        )
        # Sliding layers with a base of their own (Gemma 3) rotate by unscaled tables of it.
        self.rotary_local = None
        if cfg.rope_local_theta is not None:
            self.rotary_local = RotaryEmbedding(cfg.head_dim, max_position,
                                                cfg.rope_local_theta, None)
        # Gemma multiplies the embeddings by sqrt(hidden), rounded to the model dtype (as
        # HF does): a buffer, so that `.to(dtype)` rounds it.
        self.register_buffer("embed_scale", torch.tensor(
            cfg.hidden_size**0.5 if cfg.family.scale_embeddings else 1.0), persistent=False)
        # Decode-only steps through one C++ call, where the CPU kernels serve the layers
        # (`models.fused_decode`; set up by `fuse_decode` once the weights are in).
        self.fused_decode: FusedDecode | None = None

    def reset_buffers(self) -> None:
        """The computed buffers after `to_empty`: rotary tables in float32, the embedding
        scale in the model dtype."""
        for rotary in (self.rotary, self.rotary_local):
            if rotary is not None:
                rotary.float().reset_tables()
        scale = self.config.hidden_size**0.5 if self.config.family.scale_embeddings else 1.0
        self.embed_scale.fill_(scale)

    def tie_weights(self) -> None:
        """Share the embedding with the head; again after `to_empty`, which unties them."""
        if self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """The final hidden states [T, hidden] of a flat batch described by `meta`."""
        # The residual stream stays float32 whatever the model dtype (as llama.cpp keeps it):
        # bf16 sums drift over 30 layers; only the matmuls' inputs are in the model dtype.
        if self.fused_decode is not None:  # every step on CPU: one path, see FusedDecode
            return self.fused_decode(input_ids, positions, kv_caches, meta)
        x = self.embed_tokens(input_ids)
        if self.config.family.scale_embeddings:
            x = x * self.embed_scale
        x = x.float()
        dtype = self.embed_tokens.weight.dtype
        ropes = [self.rotary(positions, dtype)]
        if self.rotary_local is not None:
            ropes.append(self.rotary_local(positions, dtype))
        with attention_metadata(meta):
            for layer, kv_cache in zip(self.layers, kv_caches):
                x = layer(x, ropes[layer.rope_index], kv_cache)
        return self.norm(x)

    def fuse_decode(self) -> bool:
        """Serve the steps with `FusedDecode` if the loaded layers allow it (the reason why
        not is logged)."""
        self.fused_decode = FusedDecode.build(self)
        return self.fused_decode is not None

    def pack_weights(self) -> torch.Tensor | None:
        """Put what a decode step reads (the layers, the final norm, the head) in one
        huge-page block, in the order it reads them (`ember.memory`; CPU only): the block."""
        modules = [*self.layers.modules(), self.norm, self.lm_head]
        return memory.pack([t for m in modules
                            for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))])

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # Logits in float32: sampling and logprobs need the precision.
        return self.lm_head(hidden).float()

    # ---- weights ----------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | QuantizedWeight]]) -> None:
        """Copy HF-named tensors into the (fused) parameters; every parameter must be set.
        Quantized weights (a GGUF file's Q4 tensors) replace their linear layer instead."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        quantized: dict[str, dict[int, QuantizedWeight]] = {}
        cfg = self.config
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        shard_sizes = {"qkv_proj": [q, kv, kv], "gate_up_proj": [cfg.intermediate_size] * 2}
        q8_head: Q8_0Weight | None = None
        kquant_edges: dict[str, kquant.KQuantWeight] = {}  # a GGUF's K-quant embedding / head
        table = self.embed_tokens.weight
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if isinstance(tensor, kquant.KQuantWeight) and name in ("embed_tokens.weight",
                                                                    "lm_head.weight"):
                if kquant.keeps_edge(tensor, table.device, table.dtype):
                    kquant_edges[name] = tensor
                    loaded.add(name)
                    continue
                tensor = tensor.dequantize().to(table.dtype)
            if isinstance(tensor, Q8_0Weight):  # a GGUF head, kept as it is where it runs
                if kernels.available(self.embed_tokens.weight.device) and tensor.fits_kernel():
                    q8_head = tensor
                    loaded.add(name)
                    continue
                if cfg.tie_word_embeddings:
                    continue  # the dense embedding (it comes too) is the head
                tensor = tensor.dequantize().to(self.embed_tokens.weight.dtype)
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # the embedding is the head
            shard = None
            for frag, (fused, index) in self.stacked_params.items():
                if f".{frag}." in name:
                    name, shard = name.replace(f".{frag}.", f".{fused}."), index
                    break
            if name not in params:
                continue  # e.g. rotary inv_freq buffers stored by some checkpoints
            fused = name.split(".")[-2]
            if shard is not None:
                loaded.add(f"{name}#{shard}")
            elif fused in shard_sizes:  # stored fused (Phi-3): every shard at once
                loaded |= {f"{name}#{i}" for i in range(len(shard_sizes[fused]))}
            else:
                loaded.add(name)
            target = params[name].data
            if shard is not None:
                sizes = shard_sizes[name.split(".")[-2]]
                target = target.narrow(0, sum(sizes[:shard]), sizes[shard])
            if not isinstance(tensor, torch.Tensor):
                shards = quantized.setdefault(name, {})
                shards[shard or 0] = tensor
                tensor = torch.empty(tensor.out_features, tensor.in_features, device="meta")
                if (len(shards) == (1 if shard is None else len(sizes))
                        and self.get_submodule(name.removesuffix(".weight")).bias is None):
                    # Complete (and no bias still to load): into ember's layout now, so that
                    # the file's codes unpacked one byte a weight are not all held at once.
                    install_quantized(self, {name: [shards[i] for i in sorted(shards)]},
                                      self.embed_tokens.weight.dtype)
                    del quantized[name]
            elif target.shape == tensor.shape:
                target.copy_(tensor)
            if target.shape != tensor.shape:
                raise ModelLoadError(f"{name}: checkpoint shape {tuple(tensor.shape)}, "
                                     f"model expects {tuple(target.shape)}")
        expected = set()
        for name in params:
            fused = name.split(".")[-2]
            if fused in shard_sizes:
                expected |= {f"{name}#{i}" for i in range(len(shard_sizes[fused]))}
            elif not (name == "lm_head.weight" and cfg.tie_word_embeddings):
                expected.add(name)
        missing = expected - loaded
        if missing:
            raise ModelLoadError(f"checkpoint lacks {len(missing)} tensors, e.g. "
                                 f"{sorted(missing)[:3]}")
        mixed = [n for n, shards in quantized.items()
                 if len(shards) < len(shard_sizes.get(n.split(".")[-2], [None]))]
        for name in mixed:
            # A fused projection whose other shards are of a type ember keeps dense (Gemma 3's
            # Q8_0 V beside Q5_0 Q and K): it runs dense, each shard the file's values.
            sizes = shard_sizes[name.split(".")[-2]]
            for shard, w in quantized.pop(name).items():
                params[name].data.narrow(0, sum(sizes[:shard]), sizes[shard]).copy_(
                    w.dequantize())
        if mixed:
            logger.info("%d fused projections mix quantized and dense shards (e.g. %s): they "
                        "run dense", len(mixed), mixed[0])
        install_quantized(self, {name: [shards[i] for i in sorted(shards)]
                                 for name, shards in quantized.items()},
                          self.embed_tokens.weight.dtype)
        kquant.install_edges(self, kquant_edges, cfg.tie_word_embeddings)
        if q8_head is not None:
            if (q8_head.out_features, q8_head.in_features) != (cfg.vocab_size, cfg.hidden_size):
                raise ModelLoadError(f"lm_head.weight: checkpoint shape {tuple(q8_head.q.shape)}")
            self.lm_head = Q8_0Linear(q8_head, self.embed_tokens.weight.device)
