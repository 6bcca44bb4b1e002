"""Weight-only quantization: small transforms of a plain model (gpt-fast's approach).

The model is built and loaded with `nn.Linear`s; a method here replaces the projection
layers with a quantized linear whose forward is one PyTorch weight-only-quantized matmul:

- `int8`: per-output-channel symmetric int8 (ember's `int8_linear` on CPU, else
  `aten._weight_int8pack_mm`).
- `int4`: group-wise asymmetric int4 (`aten._weight_int4pack_mm[_for_cpu]`).

GGUF files need no transform: their Q4_0/Q4_1 tensors arrive as `Int4Weight`s (the same
layout, no re-quantization), their K-quant and Q5_0/Q5_1 tensors as `KQuantWeight`s (the
file's blocks, run by `KQuantLinear`), installed while loading (`install_quantized`), and a
Q8_0 head as a `Q8_0Weight`.

On CPU with ember's kernels, the dense layers left (float32 / bfloat16) move to column tiles
(`use_column_tiles`, `dense.DenseLinear`), so that every matmul's rows are independent of the
row count.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ember.errors import ConfigError
from ember.quantization import dense
from ember.quantization.int4 import Int4Linear, Int4Weight
from ember.quantization.int8 import Int8Linear, Int8Weight
from ember.quantization.kquant import KQuantLinear, KQuantWeight

logger = logging.getLogger("ember")

QuantizedWeight = Int4Weight | Int8Weight | KQuantWeight
METHODS = ("auto", "none", "int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)
# The projections of every decoder layer; the LM head is kept at int8 at most (int4 logits
# cost accuracy for little speed: the head is one matrix of 31).
_LAYER_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def check_method(method: str, group_size: int) -> None:
    if method not in METHODS:
        raise ConfigError(f"unsupported quantization {method!r}; supported: {', '.join(METHODS)}")
    if group_size not in INT4_GROUP_SIZES:
        raise ConfigError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size}")


def to_quantized_linear(w: QuantizedWeight, bias: torch.Tensor | None, device: torch.device,
                        dtype: torch.dtype) -> nn.Module:
    if isinstance(w, KQuantWeight):  # any shape: its own PyTorch path where no kernel fits
        return KQuantLinear(w, bias, device, dtype)
    if not w.fits_kernel():  # e.g. a tiny test model's 40 output rows: int4 packs by 16
        dense = nn.Linear(w.in_features, w.out_features, bias=bias is not None,
                          device=device, dtype=dtype)
        dense.weight.data.copy_(w.dequantize())
        if bias is not None:
            dense.bias.data.copy_(bias)
        return dense.requires_grad_(False)
    cls = Int4Linear if isinstance(w, Int4Weight) else Int8Linear
    return cls(w, bias, device, dtype)


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    """Swap a submodule, keeping its forward hooks (tensor parallelism's all-reduce)."""
    new._forward_hooks.update(model.get_submodule(path)._forward_hooks)
    model.set_submodule(path, new)


def install_quantized(model: nn.Module, weights: dict[str, list[QuantizedWeight]],
                      dtype: torch.dtype) -> None:
    """Replace each `<module>.weight` named in `weights` (its fused shards, in order) with the
    quantized linear of their concatenation."""
    for name, shards in weights.items():
        path = name.removesuffix(".weight")
        old = model.get_submodule(path)
        w = type(shards[0]).cat(shards)
        if (w.out_features, w.in_features) != tuple(old.weight.shape):
            raise ConfigError(f"{name}: quantized shape {(w.out_features, w.in_features)}, "
                              f"model expects {tuple(old.weight.shape)}")
        _replace(model, path, to_quantized_linear(w, old.bias, old.weight.device, dtype))


@torch.no_grad()
def quantize_model(model: nn.Module, method: str, group_size: int) -> int:
    """Quantize the dense projections of `model` in place; returns how many were replaced."""
    targets = [name for name, m in model.named_modules()
               if type(m) is nn.Linear and name.split(".")[-1] in _LAYER_LINEARS]
    if type(getattr(model, "lm_head", None)) is nn.Linear:
        targets.append("lm_head")
    for name in targets:
        old = model.get_submodule(name)
        dense = old.weight.detach().float()
        if method == "int4" and name != "lm_head":
            w: QuantizedWeight = Int4Weight.quantize(dense, group_size)
        else:
            w = Int8Weight.quantize(dense)
        _replace(model, name, to_quantized_linear(w, old.bias, old.weight.device,
                                                  old.weight.dtype))
    return len(targets)


def use_column_tiles(model: nn.Module) -> int:
    """Replace every dense linear of `model` the column-tile kernel runs (`dense.fits`) with a
    `DenseLinear`; returns how many. A head tied to the embedding gets its own copy."""
    names = [name for name, m in model.named_modules() if dense.fits(m)]
    for name in names:
        _replace(model, name, dense.DenseLinear(model.get_submodule(name)))
    return len(names)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (quantized weights included): the memory the
    weights take, and what one decode step reads (the tied head counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen or t.is_meta:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
