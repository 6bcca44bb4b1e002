"""CPU steps through one C++ call: `ember_cpu.decode_layers`, from token ids to final norm.

A step where every sequence decodes one token spends a fifth of its time entering ~200 small
kernels from Python, layer after layer (Dynamo guards, wrappers, thread start-ups).
`FusedDecode` hands the whole step but the head to ember's CPU
kernels instead (`ember.kernels`, decode.cpp): the embedding lookup, the rotary tables' rows,
the same arithmetic as `LlamaDecoderLayer` (tested against it) with the projections' own matmul
kernels and the paged attention kernel, and the final norm. It runs every step, prompt chunks
and speculative verify rows included (named for the decode steps it was first made for): one
path, each row's arithmetic independent of the others', so that with the kernels' fixed
reduction orders a token's result does not depend on the step it is in.

It serves a model of every supported family (QKV bias, QK-norm, Gemma's norms, GELU-tanh,
scaled embeddings and sliding windows included: `FamilyArgs`) whose projections are int4
(ember's or ATen's CPU layout), GGUF K-quants (`KQuantLinear`: Q4_K, Q5_K, Q6_K, Q5_0, Q5_1,
up to 3 types in a fused projection), int8 or dense, with a dense or K-quant embedding,
without tensor parallelism's hooks, on CPU with the kernels built; `FusedDecode.build` returns
None otherwise (and logs why), and the
layers run as before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ember import kernels
from ember.kernels import ops
from ember.kernels.decode_schema import LayerTensors, ModelDims, Projection
from ember.layers.attention import AttentionMetadata
from ember.quantization.dense import DenseLinear
from ember.quantization.int4 import Int4Linear
from ember.quantization.int8 import Int8Linear
from ember.quantization.kquant import KQuantEmbedding, KQuantLinear

logger = logging.getLogger("ember")

KVCache = tuple[torch.Tensor, torch.Tensor]


def _projection(m: nn.Module, dtype: torch.dtype, bias_ok: bool = False) -> Projection | None:
    """The 4 tensors decode.cpp takes for one projection, or None if it cannot run it (a
    bias only where `bias_ok`: it travels in the layer's qkv_bias)."""
    if m._forward_hooks or (getattr(m, "bias", None) is not None and not bias_ok):
        return None
    none = torch.empty(0, dtype=dtype)
    if isinstance(m, Int4Linear) and m.tiled:
        tensors = (m.tiles, m.tile_scales, m.tile_zeros, none)
    elif isinstance(m, Int4Linear) and m.columns:
        tensors = (m.col_codes, m.col_scales, m.col_offsets, none)
    elif isinstance(m, Int8Linear) and m.columns:
        tensors = (m.codes, m.scales, none, none)
    elif isinstance(m, DenseLinear) and m.tiles.dtype == dtype:
        tensors = (m.tiles, none, none, none)
    elif isinstance(m, KQuantLinear) and m.tiled and len(m.kinds) <= 3 and not m.float_out:
        segments = m.segments
        empty = torch.empty(0, dtype=torch.uint8)
        tensors = (segments[0], torch.tensor(m.kinds), *segments[1:],
                   *[empty] * (3 - len(segments)))
    elif type(m) is nn.Linear and m.weight.dtype == dtype:
        tensors = (m.weight, none, none, none)
    else:
        return None
    return Projection(tensors, m.out_features, m.in_features)


def _vector(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A layer's extra vector as decode.cpp takes it (empty where absent), or None if its
    dtype is not the activations'."""
    if t is None:
        return torch.empty(0, dtype=dtype)
    return t if t.dtype == dtype and t.is_contiguous() else None


@dataclass
class FamilyArgs:
    """decode_layers' arguments for what a family does differently from Llama (decode.cpp's
    FamilyArgs; its per-layer tensors, QKV bias, QK-norm and Gemma's norms, are entries of
    the layer schema): per layer the sliding window; the sliding layers' rotary tables."""

    windows: list[int]
    local_cos: torch.Tensor
    local_sin: torch.Tensor
    norm_offset: float
    activation: int  # 0: SiLU, 1: GELU-tanh
    embed_scale: float


class FusedDecode:
    def __init__(self, edges: list[torch.Tensor], params: list[torch.Tensor], num_heads: int,
                 num_kv_heads: int, group_size: int, eps: float,
                 scale: float, embedding_kind: int, intermediate_size: int,
                 family: FamilyArgs) -> None:
        # The model's embedding, rotary cos and sin tables and final norm weight (the tensors
        # themselves, not the model: no reference cycle keeps a dropped model alive).
        self.edges = edges
        self.params = params
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.group_size = group_size
        self.eps, self.scale = eps, scale
        self.embedding_kind = embedding_kind  # -1: a dense table
        self.intermediate_size = intermediate_size
        self.family = family

    @classmethod
    def build(cls, model: nn.Module) -> "FusedDecode | None":
        """The fused decode of `model` (a `LlamaForCausalLM`), if its layers allow one; else
        None, with the reason in the log. A layer whose tensors do not fit the layer schema
        (decode_schema.h: a model change that misaligns them) raises `SchemaError`."""
        dtype = model.embed_tokens.weight.dtype
        if not kernels.available(model.embed_tokens.weight.device) or dtype not in (
                torch.float32, torch.bfloat16):
            return None  # no kernels (said at load) or an activation dtype they do not take
        params: list[torch.Tensor] = []
        group_sizes, tiled = set(), set()
        first = model.layers[0]
        dims = ModelDims(model.norm.weight.numel(), first.self_attn.num_heads,
                         first.self_attn.num_kv_heads, model.rotary.cos.shape[1],
                         model.config.intermediate_size)
        for i, layer in enumerate(model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            parts = [_projection(attn.qkv_proj, dtype, bias_ok=True),
                     *(_projection(m, dtype) for m in linears[1:])]
            # The MLP's input norm: Llama's second norm, Gemma's third.
            mlp_norm = (layer.pre_feedforward_layernorm if layer.sandwich
                        else layer.post_attention_layernorm)
            norms = (layer.input_layernorm.weight, mlp_norm.weight)
            extra = [_vector(t, dtype) for t in (
                attn.qkv_proj.bias,
                attn.q_norm.weight if attn.q_norm is not None else None,
                attn.k_norm.weight if attn.k_norm is not None else None,
                layer.post_attention_layernorm.weight if layer.sandwich else None,
                layer.post_feedforward_layernorm.weight if layer.sandwich else None)]
            if any(p is None for p in parts) or any(n.dtype != dtype for n in norms) or (
                    any(e is None for e in extra) or
                    layer._forward_hooks or attn._forward_hooks or mlp._forward_hooks):
                which = [type(m).__name__ for m, p in zip(linears, parts) if p is None]
                return _cannot(f"layer {i}'s projections {which} (hooks or layouts "
                               "decode_layers does not run)" if which else
                               f"layer {i}'s norms, biases or hooks")
            params += LayerTensors({
                "input_norm": norms[0], "qkv_proj": parts[0], "o_proj": parts[1],
                "mlp_norm": norms[1], "gate_up_proj": parts[2], "down_proj": parts[3],
                "qkv_bias": extra[0], "q_norm": extra[1], "k_norm": extra[2],
                "post_attention_norm": extra[3], "post_feedforward_norm": extra[4],
            }).flat(i, dims, dtype)
            int4 = [m for m in linears if isinstance(m, Int4Linear)]
            group_sizes |= {m.group_size for m in int4}
            tiled |= {m.tiled for m in int4}
        if len(group_sizes) > 1 or len(tiled) > 1:
            return _cannot("int4 layers of several group sizes or layouts")
        norm = model.norm.weight
        if norm.dtype != dtype or model.rotary.cos.dtype != torch.float32:
            return _cannot("the final norm's or the rotary tables' dtype")
        embedding, embedding_kind = model.embed_tokens.weight, -1
        if isinstance(model.embed_tokens, KQuantEmbedding):
            lin = model.embed_tokens.linear
            if not lin.tiled:
                return _cannot("a K-quant embedding without the kernels' layout")
            embedding, embedding_kind = lin.segments[0], lin.kinds[0]
        edges = [embedding, model.rotary.cos, model.rotary.sin, norm]
        family = model.config.family
        local = model.rotary_local
        empty = torch.empty(0)
        family_args = FamilyArgs(
            [layer.self_attn.attn.window for layer in model.layers],
            local.cos if local is not None else empty, local.sin if local is not None else empty,
            family.norm_offset, {"silu": 0, "gelu_tanh": 1}[family.hidden_act],
            float(model.embed_scale))
        return cls(edges, params, first.self_attn.num_heads, first.self_attn.num_kv_heads,
                   group_sizes.pop() if group_sizes else 32,
                   first.input_layernorm.eps, first.self_attn.attn.scale, embedding_kind,
                   dims.inter, family_args)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 kv_caches: list[KVCache], meta: AttentionMetadata) -> torch.Tensor:
        """The final norm's output [T, hidden] (the head's input), for any step: each
        sequence's query rows from `meta.query_start_loc` (one for a decode; a prompt chunk's
        or a verify's several)."""
        f = self.family
        embedding, cos, sin, norm = self.edges
        return ops.decode_layers(
            input_ids, positions, embedding, cos, sin, self.params, norm,
            [k for k, _ in kv_caches], [v for _, v in kv_caches],
            meta.slot_mapping, meta.block_tables, meta.query_start_loc, meta.seq_lens,
            meta.block_size, self.num_heads, self.num_kv_heads, self.group_size, self.eps,
            self.scale, self.embedding_kind, self.intermediate_size, f.windows, f.local_cos,
            f.local_sin, f.norm_offset, f.activation, f.embed_scale)


def _cannot(reason: str) -> None:
    logger.info("decode steps run layer by layer, not in one call of the CPU kernels "
                "(decode_layers): %s", reason)
    return None
