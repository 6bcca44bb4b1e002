"""Tiny random HF checkpoints load and generate through the same path as the real model."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import write_tiny_llama
from ember import LLM, SamplingParams
from ember.errors import ConfigError, ModelLoadError

PROMPTS = ["Hello there, how are", "The quick brown fox jumps over the lazy dog and then"]


def hf_greedy(path, prompt_ids: list[int], max_new: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = model.generate(
        torch.tensor([prompt_ids]), max_new_tokens=max_new, do_sample=False,
        eos_token_id=None, pad_token_id=0,
    )
    return out[0, len(prompt_ids):].tolist()


def check_against_hf(path, max_new: int = 16) -> None:
    llm = LLM(model=str(path))
    params = SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    for out in outs:
        assert out.outputs[0].token_ids == hf_greedy(path, out.prompt_token_ids, max_new)
        assert out.outputs[0].finish_reason == "length"


def test_tiny_llama_matches_transformers(tiny_llama_dir):
    check_against_hf(tiny_llama_dir)


def test_sharded_checkpoint(tmp_path, hf_tokenizer_dir):
    path = write_tiny_llama(tmp_path / "sharded", hf_tokenizer_dir, seed=1, num_shards=3)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    check_against_hf(path)


def test_llama3_rope_scaling_and_tied_embeddings(tmp_path, hf_tokenizer_dir):
    path = write_tiny_llama(
        tmp_path / "llama3", hf_tokenizer_dir, seed=2, tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    )
    check_against_hf(path, max_new=24)


def test_qwen2_style_qkv_bias(tmp_path, hf_tokenizer_dir):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(3)
    cfg = Qwen2Config(vocab_size=49152, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=False)
    path = tmp_path / "qwen2"
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (path / f).write_bytes((hf_tokenizer_dir / f).read_bytes())
    check_against_hf(path)


def test_unsupported_architecture_is_refused(tmp_path, tiny_llama_dir):
    path = tmp_path / "gpt"
    path.mkdir()
    for f in tiny_llama_dir.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GPTBigCodeForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unsupported architecture 'GPTBigCodeForCausalLM'"
                                             ".*supported: LlamaForCausalLM.*Gemma3ForCausalLM"):
        LLM(model=str(path))


def test_missing_model_path():
    with pytest.raises(ModelLoadError, match="model path not found: /no/such/model"):
        LLM(model="/no/such/model")


def test_truncated_safetensors(tmp_path, tiny_llama_dir):
    path = tmp_path / "trunc"
    path.mkdir()
    for f in tiny_llama_dir.iterdir():
        data = f.read_bytes()
        (path / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    with pytest.raises(ModelLoadError, match="unreadable or truncated safetensors"):
        LLM(model=str(path))


def test_max_model_len_over_context(tiny_llama_dir):
    with pytest.raises(ConfigError, match=r"max_model_len=4096 is outside \[1, 1024\]"):
        LLM(model=str(tiny_llama_dir), max_model_len=4096)


def test_hub_id_without_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="'someone/some-model' is not a local path"):
        LLM(model="someone/some-model")
