"""Graph fusion: the compiled decoder regions compute what the eager model does, and a
compiler failure leaves a working eager model."""

from __future__ import annotations

import logging

import torch

from ember import LLM, SamplingParams
from ember.compilation import REGIONS, compile_layers

PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = ["Hello there, how are", "The quick brown fox jumps over the lazy dog and then"]


def test_compiled_regions_are_used_and_match_eager(tiny_llama_dir):
    compiled = LLM(model=str(tiny_llama_dir), max_model_len=256)
    layer = compiled.llm_engine.model.layers[0]
    assert all(name in vars(layer) for name in REGIONS)  # per-layer compiled bound methods
    eager = LLM(model=str(tiny_llama_dir), max_model_len=256, enforce_eager=True)
    assert not any(name in vars(eager.llm_engine.model.layers[0]) for name in REGIONS)
    # One sequence (the T=1 graph) and two together (the dynamic T>=2 graph).
    for prompts in (PROMPTS[:1], PROMPTS):
        a = compiled.generate(prompts, PARAMS, use_tqdm=False)
        b = eager.generate(prompts, PARAMS, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]


def test_compile_failure_falls_back_to_eager(tiny_llama_dir, monkeypatch, caplog):
    llm = LLM(model=str(tiny_llama_dir), max_model_len=256, enforce_eager=True)
    model = llm.llm_engine.model
    expected = llm.generate(PROMPTS, PARAMS, use_tqdm=False)

    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("inductor exploded")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    with caplog.at_level(logging.WARNING, logger="ember"):
        assert compile_layers(model, llm.llm_engine.dtype) is False
    assert "torch.compile failed (RuntimeError: inductor exploded); running eager" in caplog.text
    assert not any(name in vars(model.layers[0]) for name in REGIONS)
    again = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in expected]
