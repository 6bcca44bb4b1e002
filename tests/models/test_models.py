"""Every supported family (Llama 3 with llama3 rope scaling, Mistral, Qwen2 with QKV bias,
Qwen3, Gemma 3 and Phi-3 with prompts longer than their sliding window): a tiny random
HF checkpoint written by transformers, and the same weights as a GGUF file, give transformers'
float32 greedy tokens in the exactness mode, through the compiled prompt step and the fused
decode step."""

from __future__ import annotations

import pytest
import torch

from conftest import EXACT
from ember import LLM, SamplingParams
from tiny_models import FAMILIES, WINDOW, write_gguf, write_hf

# Both longer than the window; the second is a prompt of one token less than 2 windows.
PROMPTS = ["The quick brown fox jumps over the lazy dog and then runs far away into the woods",
           "Hello there, how are you doing on this fine day?"]
MAX_NEW = 12


def hf_greedy(path, prompt_ids: list[int], max_new: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module", params=list(FAMILIES))
def checkpoint(request, tmp_path_factory, hf_tokenizer_dir, gguf_path):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    hf_dir = write_hf(family, root / "hf", hf_tokenizer_dir)
    return family, hf_dir, write_gguf(family, hf_dir, root / f"{family}.gguf", gguf_path)


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_family_matches_transformers(checkpoint, fmt):
    family, hf_dir, gguf_file = checkpoint
    llm = LLM(model=str(hf_dir if fmt == "hf" else gguf_file), max_model_len=128,
              **EXACT)
    model = llm.llm_engine.model
    hf_family = {"llama3": "llama"}.get(family, family)
    assert model.config.family.name == (FAMILIES[family][2] if fmt == "gguf" else hf_family)
    assert model.fused_decode is not None  # every step: the fused C++ call
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    for out in outs:
        if FAMILIES[family][3].get("sliding_window"):
            assert len(out.prompt_token_ids) > WINDOW
        assert out.outputs[0].token_ids == hf_greedy(hf_dir, out.prompt_token_ids, MAX_NEW)


@pytest.mark.parametrize("family", ["gemma3", "phi3"])
def test_sliding_window_in_chunked_prefill(tmp_path, hf_tokenizer_dir, family):
    """Prompts longer than the window, prefilled in chunks shorter than it: each later chunk
    reads only the keys inside its queries' windows from the cache."""
    hf_dir = write_hf(family, tmp_path / family, hf_tokenizer_dir, seed=1)
    llm = LLM(model=str(hf_dir), max_model_len=128, max_num_batched_tokens=5,
              enforce_eager=True, **EXACT)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    for out in llm.generate(PROMPTS, params, use_tqdm=False):
        assert len(out.prompt_token_ids) > 2 * WINDOW - 5
        assert out.outputs[0].token_ids == hf_greedy(hf_dir, out.prompt_token_ids, MAX_NEW)
