"""GGUF tensor types: every type's values (gguf's numpy `quants.dequantize` is the reference),
ember's K-quant kernels against a matmul with those values, and bad files refused clearly.

Any bit pattern is a valid block, so the blocks here are random bytes (with float16 fields
set to moderate values), not the output of a quantizer."""

from __future__ import annotations

import logging

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT

from ember import kernels
from ember.kernels import ops
from ember.errors import ModelLoadError
from ember.loading import gguf as ember_gguf
from ember.loading.gguf import dequantize, load_gguf, quantized_tensor
from ember.quantization import kquant
from ember.quantization.kquant import FORMATS, KQuantLinear, KQuantWeight
from gguf_files import BYTE_CHARS, write_gguf

CPU = torch.device("cpu")
# Byte offsets of the float16 fields (d, dmin / m) within a block, per type.
_HALF_FIELDS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q5_0": (0,), "Q5_1": (0, 2),
                "Q3_K": (108,)}


def random_blocks(name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """[rows, cols / block * block_bytes] random blocks of type `name`."""
    block, size = gguf.GGML_QUANT_SIZES[QT[name]]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for at in _HALF_FIELDS.get(name, ()):
        halves = (rng.standard_normal((rows, cols // block)) * 0.02).astype(np.float16)
        raw[..., at:at + 2] = halves.view(np.uint8).reshape(rows, cols // block, 2)
    return raw.reshape(rows, -1)


def reference(raw: np.ndarray, name: str) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(raw, QT[name]))


# ---- values ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FORMATS))
def test_kquant_values_are_ggufs(name):
    raw = random_blocks(name, 48, 512)
    ours = dequantize(torch.from_numpy(raw), QT[name], (48, 512))
    assert torch.equal(ours, reference(raw, name))
    w = KQuantWeight.of(torch.from_numpy(raw), FORMATS[name], 512)
    assert torch.equal(w.dequantize(), ours)


@pytest.mark.parametrize("qtype", ember_gguf.DEQUANTIZED_AT_LOAD, ids=lambda t: t.name)
def test_types_without_kernels_dequantize_as_gguf(qtype):
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(int(qtype)).integers(0, 256, (4, 2 * size), dtype=np.uint8)
    ours = dequantize(torch.from_numpy(raw), qtype, (4, 2 * block))
    torch.testing.assert_close(ours, torch.from_numpy(gguf.quants.dequantize(raw, qtype)),
                               rtol=0, atol=0, equal_nan=True)


def test_every_gguf_type_has_a_story():
    """Each type is run in its own precision, dense, dequantized at load, or refused."""
    native = set(ember_gguf.NATIVE_TYPES)
    assert {"Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1"} == native
    at_load = {t.name for t in ember_gguf.DEQUANTIZED_AT_LOAD}
    assert {"Q2_K", "Q3_K", "IQ4_XS", "IQ2_XXS"} <= at_load
    supported = set(ember_gguf.SUPPORTED_TENSOR_TYPES)
    assert native | at_load | {"F32", "F16", "BF16"} == supported
    refused = {t.name for t in QT} - supported
    assert {"I8", "I32", "F64"} <= refused


# ---- kernels --------------------------------------------------------------------------------


def _linear(name: str, rows: int, cols: int, seed: int = 0) -> tuple[KQuantWeight, torch.Tensor]:
    raw = random_blocks(name, rows, cols, seed)
    return KQuantWeight.of(torch.from_numpy(raw), FORMATS[name], cols), reference(raw, name)


def _assert_bf16_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                       tolerance: float = 8e-3) -> None:
    """y (activations x, weight w) equals x @ w.T within bf16's rounding (of the weight on the
    dense path, and of the output), relative to the size of the terms."""
    ref = F.linear(x.float(), w)
    scale = F.linear(x.float().abs(), w.abs())
    err = (y.float() - ref).abs()
    assert bool((err <= tolerance * scale + 1e-6).all()), float((err / (scale + 1e-6)).max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("rows", [1, 4, 7, 8, 20, 512])
def test_kquant_linear_computes_with_the_files_values(name, rows, dtype):
    """The few-row path (codes decoded as they stream) and the many-row one (a tile decoded
    once), against a matmul with gguf's dequantization of the same blocks, for both
    activation dtypes."""
    assert kernels.load() and kquant.kernel_serves(CPU, dtype)
    w, dense = _linear(name, 80, 512, seed=rows)
    lin = KQuantLinear(w, None, CPU, dtype)
    assert lin.tiled
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows)).to(dtype)
    y = lin(x)
    assert y.dtype == dtype and y.shape == (rows, 80)
    _assert_bf16_close(y, x, dense)
    logits = KQuantLinear(w, None, CPU, dtype, float_out=True)(x)
    assert logits.dtype == torch.float32
    _assert_bf16_close(logits, x, dense)
    if dtype == torch.float32:  # float32 all the way: float32's rounding only
        _assert_bf16_close(y, x, dense, tolerance=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", list(FORMATS))
def test_kquant_rows_do_not_depend_on_the_row_count(name, dtype):
    """Every row of a call, 1 to 600 rows, bitwise what a one-row call gives."""
    assert kernels.load()
    w, _ = _linear(name, 48, 256, seed=5)
    lin = KQuantLinear(w, None, CPU, dtype)
    x = torch.randn(600, 256, generator=torch.Generator().manual_seed(5)).to(dtype)
    alone = torch.cat([lin(x[i:i + 1]) for i in range(600)])
    for rows in [*range(2, 21), 64, 600]:
        assert torch.equal(lin(x[:rows]), alone[:rows]), (name, rows)


@pytest.mark.parametrize("rows", [3, 24])
def test_mixed_types_fuse_into_one_layer(rows):
    """A fused Q/K/V of Q4_K, Q4_K and Q6_K parts (llama.cpp's Q4_K_M) runs as one op."""
    assert kernels.load()
    parts = [_linear("Q4_K", 32, 256, 1), _linear("Q4_K", 16, 256, 2), _linear("Q6_K", 16, 256, 3)]
    w = KQuantWeight.cat([p for p, _ in parts])
    assert [fmt.name for fmt, _ in w.segments] == ["Q4_K", "Q6_K"] and w.out_features == 64
    lin = KQuantLinear(w, None, CPU, torch.bfloat16)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(0)).bfloat16()
    _assert_bf16_close(lin(x), x, torch.cat([d for _, d in parts]))


@pytest.mark.parametrize("name", list(FORMATS))
def test_rows_of_the_tiles_are_the_files_values(name):
    assert kernels.load()
    w, dense = _linear(name, 48, 256)
    lin = KQuantLinear(w, None, CPU, torch.bfloat16)
    fmt = FORMATS[name]  # the layout kernels/kquant.cpp reads: as large as the file's blocks
    per_block = fmt.meta_bytes + fmt.block // 2 * fmt.record_bytes
    assert lin.segment_0.shape == (3, 256 // fmt.block, per_block)
    assert 1 <= per_block / (16 * fmt.block_bytes) <= 1.03
    ids = torch.tensor([[0, 47], [17, 17]])
    rows = ops.kquant_rows(lin.segment_0, ids, FORMATS[name].kind, 256)
    assert torch.equal(rows, dense[ids])
    assert torch.equal(lin.rows(ids, torch.float32), dense[ids])


def test_pytorch_fallback_without_the_kernels(monkeypatch):
    """Where the kernels do not serve (EMBER_DISABLE_CPU_KERNELS=1, no AVX512-BF16, float32
    activations) the layer keeps the file's bytes and dequantizes them in PyTorch."""
    monkeypatch.setattr(kquant, "kernel_serves", lambda device, dtype: False)
    w, dense = _linear("Q6_K", 32, 256)
    lin = KQuantLinear(w, None, CPU, torch.bfloat16)
    assert not lin.tiled and torch.equal(lin.segment_0, w.segments[0][1])
    x = torch.randn(5, 256).bfloat16()
    _assert_bf16_close(lin(x), x, dense)
    assert torch.equal(lin.rows(torch.tensor([3, 1]), torch.float32), dense[[3, 1]])
    f32 = KQuantLinear(w, None, CPU, torch.float32)
    torch.testing.assert_close(f32(x.float()), F.linear(x.float(), dense))


def test_kquant_linear_compiles_without_a_graph_break():
    assert kernels.load()
    w, dense = _linear("Q4_K", 32, 256)
    lin = KQuantLinear(w, None, CPU, torch.bfloat16)
    compiled = torch.compile(lin, fullgraph=True, dynamic=True)
    for rows in (2, 33):
        x = torch.randn(rows, 256).bfloat16()
        assert torch.equal(compiled(x), lin(x))


# ---- files ----------------------------------------------------------------------------------


def test_a_kquant_file_keeps_its_codes(tmp_path):
    """keep_quantized: K-quant projections come as the file's blocks (no re-quantization);
    Q/K rows un-permuted by rows of bytes."""
    raw_q = random_blocks("Q4_K", 64, 256, 1)
    raw_up = random_blocks("Q5_0", 128, 256, 2)
    path = write_gguf(tmp_path / "k.gguf", {
        "blk.0.attn_q.weight": (raw_q, QT.Q4_K),
        "blk.0.ffn_up.weight": (raw_up, QT.Q5_0),
    })
    got = dict(load_gguf(path, torch.bfloat16, keep_quantized=True)[1])
    q, up = got["model.layers.0.self_attn.q_proj.weight"], got["model.layers.0.mlp.up_proj.weight"]
    assert isinstance(q, KQuantWeight) and isinstance(up, KQuantWeight)
    assert torch.equal(up.segments[0][1], torch.from_numpy(raw_up))
    perm = ember_gguf.unpermute_rope(torch.arange(64), 4)
    assert torch.equal(q.dequantize(), reference(raw_q, "Q4_K")[perm])
    dense = dict(load_gguf(path, torch.float32)[1])
    assert torch.equal(dense["model.layers.0.self_attn.q_proj.weight"], q.dequantize())


def test_types_without_kernels_load_dequantized_with_a_warning(tmp_path, caplog):
    raw = random_blocks("Q3_K", 128, 256)
    path = write_gguf(tmp_path / "q3k.gguf", {"blk.0.ffn_up.weight": (raw, QT.Q3_K)})
    with caplog.at_level(logging.WARNING, logger="ember"):
        got = dict(load_gguf(path, torch.float32, keep_quantized=True)[1])
    assert "no kernels for GGUF type(s) Q3_K" in caplog.text
    assert torch.equal(got["model.layers.0.mlp.up_proj.weight"],
                       torch.from_numpy(gguf.quants.dequantize(raw, QT.Q3_K)))


def test_unsupported_tensor_type_is_named(tmp_path):
    path = write_gguf(tmp_path / "i32.gguf",
                      {"blk.0.ffn_up.weight": (np.zeros((128, 64), np.int32), None)})
    with pytest.raises(ModelLoadError, match=r"'blk.0.ffn_up.weight' has type I32, which ember "
                                             r"cannot load; supported: F32, F16, BF16, Q8_0"):
        load_gguf(path, torch.float32)


def _patch_tensor_info(path, name: str, *, dims: list[int] | None = None,
                       type_id: int | None = None) -> None:
    """Rewrite a tensor's dims or type id in the file's tensor info (the data stays)."""
    data = bytearray(path.read_bytes())
    at = data.index(name.encode()) + len(name)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    if dims is not None:
        assert len(dims) == n_dims
        for i, n in enumerate(dims):
            data[at + 4 + 8 * i:at + 12 + 8 * i] = n.to_bytes(8, "little")
    if type_id is not None:
        data[at + 4 + 8 * n_dims:at + 8 + 8 * n_dims] = type_id.to_bytes(4, "little")
    path.write_bytes(bytes(data))


def _two_tensor_file(tmp_path):
    return write_gguf(tmp_path / "bad.gguf", {
        "blk.0.ffn_up.weight": (random_blocks("Q4_K", 64, 256), QT.Q4_K),
        "blk.0.ffn_down.weight": (np.ones((64, 128), np.float32), None),
    })


def test_truncated_tensor_data(tmp_path):
    path = _two_tensor_file(tmp_path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match=r"bad.gguf: corrupt or truncated GGUF file: tensor "
                                             r"'blk.0.ffn_down.weight' \(F32, 64 x 128: 32768 "
                                             r"bytes at \d+\) runs past the end of the file"):
        load_gguf(path, torch.float32)


def test_tensor_data_past_the_end(tmp_path):
    path = _two_tensor_file(tmp_path)
    _patch_tensor_info(path, "blk.0.ffn_down.weight", dims=[128, 6400])
    with pytest.raises(ModelLoadError, match=r"'blk.0.ffn_down.weight' \(F32, 6400 x 128.*"
                                             r"runs past the end of the file"):
        load_gguf(path, torch.float32)


def test_tensor_size_disagrees_with_type_and_shape(tmp_path):
    path = _two_tensor_file(tmp_path)
    _patch_tensor_info(path, "blk.0.ffn_up.weight", type_id=int(QT.Q6_K))  # 210 bytes, not 144
    with pytest.raises(ModelLoadError, match=r"'blk.0.ffn_up.weight': Q6_K of shape 64 x 256 is "
                                             r"13440 bytes, but the next tensor "
                                             r"'blk.0.ffn_down.weight' starts 9216 bytes after it"):
        load_gguf(path, torch.float32)


def test_rows_that_are_not_whole_blocks(tmp_path):
    path = _two_tensor_file(tmp_path)
    _patch_tensor_info(path, "blk.0.ffn_up.weight", dims=[200, 64])
    with pytest.raises(ModelLoadError, match=r"'blk.0.ffn_up.weight' \(Q4_K, 64 x 200\): rows of "
                                             r"200 values are not whole Q4_K blocks of 256"):
        load_gguf(path, torch.float32)


def test_unknown_type_id(tmp_path):
    path = _two_tensor_file(tmp_path)
    _patch_tensor_info(path, "blk.0.ffn_down.weight", type_id=250)
    with pytest.raises(ModelLoadError, match=r"bad.gguf: tensor 'blk.0.ffn_down.weight' has "
                                             r"unknown GGML type id 250"):
        load_gguf(path, torch.float32)


def test_quantized_tensor_of_a_vector_is_none(tmp_path):
    path = write_gguf(tmp_path / "v.gguf", {"output_norm.weight": (np.ones(64, np.float32), None)})
    t = ember_gguf.open_gguf(path).tensors[0]
    assert quantized_tensor(t) is None


# ---- a model --------------------------------------------------------------------------------

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 256, 512, 4, 2, 2


def write_q4_k_m_model(path, vocab: int = 272):
    """A tiny Llama as llama.cpp's Q4_K_M lays one out: Q4_K projections, Q6_K V and down
    projections, a tied Q6_K embedding, F32 norms; random blocks, a byte-level vocabulary."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    tokens = [*BYTE_CHARS, "he", "ll"]
    tokens += [f"<unused{i}>" for i in range(vocab - len(tokens) - 1)] + ["<s>"]
    w.add_token_list(tokens)
    w.add_token_types([1] * (vocab - 1) + [3])
    w.add_token_merges(["h e", "l l"])
    w.add_bos_token_id(vocab - 1)
    w.add_eos_token_id(vocab - 1)
    seed = iter(range(1000))

    def blocks(name: str, rows: int, cols: int) -> tuple[np.ndarray, QT]:
        return random_blocks(name, rows, cols, next(seed)), QT[name]

    tensors = {"token_embd.weight": blocks("Q6_K", vocab, HIDDEN),
               "output_norm.weight": (np.ones(HIDDEN, np.float32), None)}
    head_dim = HIDDEN // HEADS
    for i in range(LAYERS):
        tensors |= {
            f"blk.{i}.attn_norm.weight": (np.ones(HIDDEN, np.float32), None),
            f"blk.{i}.ffn_norm.weight": (np.ones(HIDDEN, np.float32), None),
            f"blk.{i}.attn_q.weight": blocks("Q4_K", HIDDEN, HIDDEN),
            f"blk.{i}.attn_k.weight": blocks("Q4_K", KV_HEADS * head_dim, HIDDEN),
            f"blk.{i}.attn_v.weight": blocks("Q6_K", KV_HEADS * head_dim, HIDDEN),
            f"blk.{i}.attn_output.weight": blocks("Q4_K", HIDDEN, HIDDEN),
            f"blk.{i}.ffn_gate.weight": blocks("Q4_K", FFN, HIDDEN),
            f"blk.{i}.ffn_up.weight": blocks("Q5_K", FFN, HIDDEN),
            f"blk.{i}.ffn_down.weight": blocks("Q6_K", HIDDEN, FFN),
        }
    for name, (array, raw_dtype) in tensors.items():
        w.add_tensor(name, array, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _greedy(llm, prompts):
    from ember import SamplingParams

    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_a_q4_k_m_file_runs_from_its_codes(tmp_path):
    """Default mode: every K-quant tensor stays the file's codes (the tied Q6_K embedding and
    head too), the resident weights are within 10% of the file, and the fused decode step
    serves the layers with the same tokens as the layers themselves."""
    from ember import LLM
    from ember.quantization import weight_bytes
    from ember.quantization.kquant import KQuantEmbedding

    assert kernels.load()
    path = write_q4_k_m_model(tmp_path / "tiny-q4_k_m.gguf")
    llm = LLM(model=str(path), max_model_len=128, enforce_eager=True)
    model = llm.llm_engine.model
    for layer in model.layers:
        linears = (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                   layer.mlp.down_proj)
        assert all(isinstance(m, KQuantLinear) and m.tiled for m in linears)
        assert [f.name for f in layer.self_attn.qkv_proj.formats] == ["Q4_K", "Q6_K"]
        assert [f.name for f in layer.mlp.gate_up_proj.formats] == ["Q4_K", "Q5_K"]
    assert isinstance(model.embed_tokens, KQuantEmbedding)
    assert model.lm_head is model.embed_tokens.linear and model.lm_head.formats[0].name == "Q6_K"
    file_size = path.stat().st_size
    assert abs(weight_bytes(model) - file_size) <= 0.1 * file_size

    assert model.fused_decode is not None
    prompts = ["hello hello", "he ll o"]
    fused = _greedy(llm, prompts)
    model.fused_decode = None
    assert _greedy(llm, prompts) == fused
