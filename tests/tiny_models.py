"""Tiny random checkpoints of every supported family, written by transformers (HF format) and,
from the same weights, as a GGUF file the way llama.cpp's converter writes one (gguf-py's
tensor name map, Q/K rows permuted for Llama/Mistral, Gemma's norms stored as 1 + w,
Llama 3's rope scaling as `rope_freqs`), with SmolLM2's tokenizer (vocab 49152)."""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import torch

COMMON = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1,
              tie_word_embeddings=False)
WINDOW = 8  # the sliding window of the families given one: prompts are longer

# family -> (transformers config and model class names, GGUF architecture, config overrides)
FAMILIES = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", "llama", dict(
        rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    # llama.cpp writes Mistral as `llama`; current Mistral models have no sliding window.
    "mistral": ("MistralConfig", "MistralForCausalLM", "llama", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "qwen2", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "qwen3", dict(head_dim=32)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", "gemma3", dict(
        num_attention_heads=2, num_key_value_heads=1, head_dim=256, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_theta=1000000.0, rope_local_base_freq=10000.0, query_pre_attn_scalar=256,
        tie_word_embeddings=True)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", "phi3", dict(sliding_window=WINDOW)),
}


def write_hf(family: str, out: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """A random checkpoint of `family` in HF format. Every weight (norms and biases too) is
    random and a float16 value, so that a GGUF file holds it exactly in F16."""
    import transformers

    config_cls, model_cls, _, family_overrides = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**COMMON, **family_overrides, **overrides})
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # around 1 (Gemma: around 0, it adds the 1)
                p.copy_(torch.rand_like(p) * 0.6 + (0.7 if family != "gemma3" else -0.3))
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.5)
            p.copy_(p.half().float())
    model.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / f).exists():
            (out / f).write_bytes((tokenizer_dir / f).read_bytes())
    return out


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter's Q/K row permutation (HF rotate-half -> interleaved pairs)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_factors(cfg) -> np.ndarray:
    """What llama.cpp's converter stores as rope_freqs.weight for Llama 3 scaling."""
    s = cfg.rope_scaling
    dim = cfg.head_dim
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(s["factor"])
        else:
            smooth = ((s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"])
                      / (s["high_freq_factor"] - s["low_freq_factor"]))
            factors.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def write_gguf(family: str, hf_dir: Path, out: Path, tokenizer_gguf: Path) -> Path:
    """The HF checkpoint at `hf_dir` as a GGUF file: matrices F16, vectors F32, with the
    tokenizer of the GGUF file `tokenizer_gguf`."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    arch = FAMILIES[family][2]
    cfg = AutoConfig.from_pretrained(hf_dir)
    state = load_file(str(hf_dir / "model.safetensors"))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    w = gguf.GGUFWriter(str(out), arch)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if getattr(cfg, "sliding_window", None):
        w.add_sliding_window(cfg.sliding_window)
    if family == "gemma3":
        w.add_uint32("gemma3.attention.sliding_window_pattern", 2)  # layer 1 of 0..2 global
        assert cfg.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    reader = gguf.GGUFReader(tokenizer_gguf)
    tok = {k: reader.get_field(k).contents() for k in reader.fields if k.startswith("tokenizer.")}
    w.add_tokenizer_model(tok["tokenizer.ggml.model"])
    w.add_tokenizer_pre(tok.get("tokenizer.ggml.pre", "default"))
    w.add_token_list(tok["tokenizer.ggml.tokens"])
    w.add_token_types(tok["tokenizer.ggml.token_type"])
    w.add_token_merges(tok["tokenizer.ggml.merges"])
    w.add_bos_token_id(tok["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(tok["tokenizer.ggml.eos_token_id"])
    if family == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_rope_factors(cfg))
    for name, tensor in state.items():
        base, _, kind = name.rpartition(".")
        gguf_name = names.get_name(base)
        assert gguf_name is not None, name
        data = tensor.float().numpy()
        if arch in ("llama", "mistral") and base.endswith(("q_proj", "k_proj")):
            heads = cfg.num_attention_heads if base.endswith("q_proj") else cfg.num_key_value_heads
            data = _permute(data, heads)
        if family == "gemma3" and base.endswith("norm"):
            data = data + 1  # llama.cpp stores Gemma's norms as (1 + w)
        w.add_tensor(f"{gguf_name}.{kind}", data.astype(np.float16 if data.ndim == 2 else np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
