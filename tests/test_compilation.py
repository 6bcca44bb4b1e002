"""Graph fusion: the compiled decoder layer (paged attention inside its graph) computes what
the eager model does, and a compiler failure leaves a working eager model."""

from __future__ import annotations

import logging

import torch

from ember import LLM, SamplingParams
from ember.compilation import compile_model
from ember.models.fused_decode import FusedDecode

PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = ["Hello there, how are", "The quick brown fox jumps over the lazy dog and then"]


def test_steps_in_the_fused_call_compile_nothing(tiny_llama_dir):
    """On CPU with ember's kernels every step runs in one call (`FusedDecode`): no layer graph
    is compiled or run."""
    llm = LLM(model=str(tiny_llama_dir), max_model_len=256)
    assert llm.llm_engine.model.fused_decode is not None
    assert not any("forward" in vars(layer) for layer in llm.llm_engine.model.layers)


def test_compiled_layers_are_used_and_match_eager(tiny_llama_dir, monkeypatch):
    # Every step through the layers' graphs (CUDA, tensor parallelism, no kernels).
    monkeypatch.setattr(FusedDecode, "build", classmethod(lambda cls, model: None))
    compiled = LLM(model=str(tiny_llama_dir), max_model_len=256)
    assert compiled.llm_engine.model.fused_decode is None
    # Every layer runs the compiled forward (a per-layer bound method of one compiled fn).
    assert all("forward" in vars(layer) for layer in compiled.llm_engine.model.layers)
    eager = LLM(model=str(tiny_llama_dir), max_model_len=256, enforce_eager=True)
    assert not any("forward" in vars(layer) for layer in eager.llm_engine.model.layers)
    # One sequence (decodes: the T=1 graph) and two together (the dynamic T>=2 graph: a
    # prefill of both, then decodes of two).
    for prompts in (PROMPTS[:1], PROMPTS):
        a = compiled.generate(prompts, PARAMS, use_tqdm=False)
        b = eager.generate(prompts, PARAMS, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    # A prompt arriving while another sequence decodes: one step holds a prefill chunk and a
    # decode token, which the attention op serves from the step's metadata.
    assert staggered(compiled) == staggered(eager)
    # Every graph was compiled at start: new token counts (prompts of 7, 70, 130 tokens)
    # reuse the warm-up's dynamic graph, no recompilation at run time.
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    compiled.generate([{"prompt_token_ids": list(range(3, 3 + n))} for n in (7, 70, 130)],
                      PARAMS, use_tqdm=False)
    assert torch._dynamo.utils.counters["frames"]["ok"] == frames


def staggered(llm: LLM) -> dict[str, list[int]]:
    engine = llm.llm_engine
    tok = llm.get_tokenizer()
    engine.add_request("first", tok.encode(PROMPTS[0]), PARAMS)
    for _ in range(3):
        engine.step()
    engine.add_request("second", tok.encode(PROMPTS[1]), PARAMS)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
    assert set(done) == {"first", "second"}
    return done


def test_compile_failure_falls_back_to_eager(tiny_llama_dir, monkeypatch, caplog):
    monkeypatch.setattr(FusedDecode, "build", classmethod(lambda cls, model: None))
    llm = LLM(model=str(tiny_llama_dir), max_model_len=256, enforce_eager=True)
    model = llm.llm_engine.model
    expected = llm.generate(PROMPTS, PARAMS, use_tqdm=False)

    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("inductor exploded")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    with caplog.at_level(logging.WARNING, logger="ember"):
        assert compile_model(model, llm.llm_engine.runner.kv_caches) is False
    assert "torch.compile failed (RuntimeError: inductor exploded); running eager" in caplog.text
    assert not any("forward" in vars(layer) for layer in model.layers)
    again = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in expected]
