"""ember against transformers on the real default model (the same GGUF, fp32)."""

from __future__ import annotations

import pytest
import torch

from conftest import engine_prefill_logits

from ember import SamplingParams

CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three prime numbers greater than 10.",
    "Translate 'good morning' into Spanish and German.",
    "def fibonacci(n):\n    # complete this Python function",
]
MAX_NEW = 48


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def prompt_ids(default_llm):
    tok = default_llm.get_tokenizer()
    return [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": c}]),
                   add_special_tokens=False)
        for c in CHATS
    ]


def test_chat_template_tokens_match_transformers(prompt_ids, gguf_path):
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    for chat, ids in zip(CHATS, prompt_ids):
        ref = hf_tok.apply_chat_template([{"role": "user", "content": chat}],
                                         add_generation_prompt=True, tokenize=True)
        assert ids == list(ref)


def test_prefill_logits_match(default_llm, hf_model, prompt_ids):
    engine = default_llm.llm_engine
    for ids in prompt_ids:
        ours = engine_prefill_logits(engine, ids)
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0].float()
        assert (ours - ref).abs().max().item() < 1e-3


def test_greedy_tokens_match(default_llm, hf_model, prompt_ids):
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW)
    outs = default_llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params,
                                use_tqdm=False)
    eos = default_llm.get_tokenizer().eos_token_ids[0]
    for ids, out in zip(prompt_ids, outs):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW,
                                    do_sample=False, eos_token_id=eos, pad_token_id=eos)
        assert out.outputs[0].token_ids == ref[0, len(ids):].tolist()


def test_cli_chat_answers_paris(gguf_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "ember", "generate", "--chat", "What is the capital of France?",
         "--max-tokens", "32"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
