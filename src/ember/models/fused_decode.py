"""Decode steps through one C++ call: `ember_cpu.decode_layers`, from token ids to final norm.

A step where every sequence decodes one token spends a fifth of its time entering ~200 small
kernels from Python, layer after layer (Dynamo guards, wrappers, thread start-ups), at ~100 µs
a layer for the default model. `FusedDecode` hands the whole step but the head to ember's CPU
kernels instead (`ember.kernels`, decode.cpp): the embedding lookup, the rotary tables' rows,
the same arithmetic as `LlamaDecoderLayer` (tested against it) with the projections' own matmul
kernels and the paged decode attention, and the final norm. Steps with a prompt chunk keep the
compiled layers (prefill is compute-bound: one graph, big GEMMs).

It serves a model whose projections are int4 (ember's or ATen's CPU layout), int8 or dense, without
biases or tensor parallelism's hooks, on CPU with the kernels built; `FusedDecode.build`
returns None otherwise, and the layers run as before.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ember import kernels
from ember.layers.attention import AttentionMetadata
from ember.quantization.int4 import DENSE_MIN_TOKENS, DENSE_MIN_TOKENS_TILED, Int4Linear
from ember.quantization.int8 import Int8Linear

logger = logging.getLogger("ember")

KVCache = tuple[torch.Tensor, torch.Tensor]


def _projection(m: nn.Module, dtype: torch.dtype) -> list[torch.Tensor] | None:
    """The 4 tensors decode.cpp takes for one projection, or None if it cannot run it."""
    if m._forward_hooks or getattr(m, "bias", None) is not None:
        return None
    none = torch.empty(0, dtype=dtype)
    if isinstance(m, Int4Linear) and m.tiled:
        return [m.tiles, m.tile_scales, m.tile_zeros, none]
    if isinstance(m, Int4Linear) and m.dense_for_many_rows:
        return [m.weight, m.scales_and_zeros, m.dense_scales, m.dense_zeros]
    if isinstance(m, Int8Linear):
        return [m.weight, m.scales, none, none]
    if type(m) is nn.Linear and m.weight.dtype == dtype:
        return [m.weight, none, none, none]
    return None


class FusedDecode:
    def __init__(self, edges: list[torch.Tensor], params: list[torch.Tensor], num_heads: int,
                 num_kv_heads: int, group_size: int, dense_min_rows: int, eps: float,
                 scale: float) -> None:
        # The model's embedding, rotary cos and sin tables and final norm weight (the tensors
        # themselves, not the model: no reference cycle keeps a dropped model alive).
        self.edges = edges
        self.params = params
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.group_size, self.dense_min_rows = group_size, dense_min_rows
        self.eps, self.scale = eps, scale

    @classmethod
    def build(cls, model: nn.Module) -> "FusedDecode | None":
        """The fused decode of `model` (a `LlamaForCausalLM`), if its layers allow one;
        else None, with the reason in the log."""
        dtype = model.embed_tokens.weight.dtype
        if not kernels.available(model.embed_tokens.weight.device) or dtype not in (
                torch.float32, torch.bfloat16):
            return None
        cfg = model.config
        family = cfg.family
        missing = [what for what, needed in (
            ("QKV bias", cfg.attention_bias), ("QK-norm", family.qk_norm),
            ("sandwich norms", family.sandwich_norms), ("(1+w) norms", family.norm_offset),
            ("GELU-tanh", family.hidden_act != "silu"),
            ("scaled embeddings", family.scale_embeddings),
            ("sliding windows", cfg.sliding_window is not None)) if needed]
        if missing:
            logger.info("decode steps run the compiled layers: the fused decode step lacks "
                        "%s", ", ".join(missing))
            return None
        params: list[torch.Tensor] = []
        group_sizes, tiled = set(), set()
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            parts = [_projection(m, dtype) for m in
                     (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            if any(p is None for p in parts) or any(n.dtype != dtype for n in norms) or (
                    layer._forward_hooks or attn._forward_hooks or mlp._forward_hooks):
                return None
            params += [norms[0], *parts[0], *parts[1], norms[1], *parts[2], *parts[3]]
            int4 = [m for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
                    if isinstance(m, Int4Linear)]
            group_sizes |= {m.group_size for m in int4}
            tiled |= {m.tiled for m in int4}
        if len(group_sizes) > 1 or len(tiled) > 1:
            return None
        norm = model.norm.weight
        if norm.dtype != dtype or model.rotary.cos.dtype != torch.float32:
            return None
        first = model.layers[0]
        edges = [model.embed_tokens.weight, model.rotary.cos, model.rotary.sin, norm]
        return cls(edges, params, first.self_attn.num_heads, first.self_attn.num_kv_heads,
                   group_sizes.pop() if group_sizes else 32,
                   DENSE_MIN_TOKENS_TILED if tiled == {True} else DENSE_MIN_TOKENS,
                   first.input_layernorm.eps, first.self_attn.attn.scale)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 kv_caches: list[KVCache], meta: AttentionMetadata) -> torch.Tensor:
        """The final norm's output [T, hidden] (the head's input), for a step of decodes only
        (`meta.decode` covers every row, in order)."""
        d = meta.decode
        embedding, cos, sin, norm = self.edges
        return torch.ops.ember_cpu.decode_layers(
            input_ids, positions, embedding, cos, sin, self.params, norm,
            [k for k, _ in kv_caches], [v for _, v in kv_caches],
            meta.slot_mapping, d.block_tables, d.context_lens, d.block_size, self.num_heads,
            self.num_kv_heads, self.group_size, self.dense_min_rows, self.eps, self.scale)
