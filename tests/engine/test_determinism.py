"""Determinism in the default mode (the GGUF file's int4 and Q8_0 codes): a request gives the same
tokens, and bitwise the same logprobs, whatever shares its steps, however its prompt is
chunked, after a prefix-cache hit and after a preemption."""

from __future__ import annotations

import pytest

from ember import LLM, SamplingParams
from ember.engine.model_runner import kv_bytes_per_block
from engine_utils import assert_idle, text_ids

LENGTHS = [5, 12, 30, 47, 64, 90, 120, 160, 200, 250, 300, 350, 400, 470, 540, 600]
PARAMS = {
    "greedy": SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=1),
    "seeded": SamplingParams(temperature=1.0, seed=77, max_tokens=4, ignore_eos=True,
                             logprobs=1),
}


def results(outs) -> list[list[tuple[int, float]]]:
    """Per request, its tokens with their logprobs (compared bitwise)."""
    return [[(t, lp[t].logprob) for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
            for o in outs]


@pytest.fixture(scope="module")
def reference():
    """Each prompt alone, with the default token budget."""
    llm = LLM(max_model_len=2048)
    tok = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": text_ids(tok, n, seed=n)} for n in LENGTHS]
    alone = {name: [results(llm.generate([p], sp, use_tqdm=False))[0] for p in prompts]
             for name, sp in PARAMS.items()}
    return llm, prompts, alone


@pytest.mark.parametrize("budget", [64, 512, 2048])
def test_together_as_alone_whatever_the_token_budget(reference, budget):
    llm, prompts, alone = reference
    config = llm.llm_engine.scheduler.config  # the step's token budget, read every step
    default, config.max_num_batched_tokens = config.max_num_batched_tokens, budget
    try:
        for name, sp in PARAMS.items():
            assert results(llm.generate(prompts, sp, use_tqdm=False)) == alone[name], name
    finally:
        config.max_num_batched_tokens = default
    assert_idle(llm.llm_engine)


def test_a_prefix_cache_hit_changes_nothing(reference):
    llm, prompts, alone = reference
    longest = prompts[-1]
    llm.generate([longest], PARAMS["greedy"], use_tqdm=False)  # its blocks now cached
    hits_before = llm.llm_engine.block_manager.prefix_hits
    for name, sp in PARAMS.items():
        again = results(llm.generate([longest, *prompts[:4]], sp, use_tqdm=False))
        assert again == [alone[name][-1], *alone[name][:4]], name
    assert llm.llm_engine.block_manager.prefix_hits > hits_before
    assert_idle(llm.llm_engine)


def test_a_preemption_changes_nothing(reference):
    llm = reference[0]
    tok = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": text_ids(tok, 20 + 6 * i, seed=i)} for i in range(16)]
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=24, ignore_eos=True,
                            logprobs=1)
    alone = [results(llm.generate([p], params, use_tqdm=False))[0] for p in prompts]
    # 16 sequences of 44-134 tokens need ~96 blocks of 16 at their ends: a pool of 32 preempts.
    per_block = kv_bytes_per_block(llm.llm_engine.model_config, 16, llm.llm_engine.dtype)
    small = LLM(max_model_len=2048, kv_cache_memory=32 * per_block)
    outs = small.generate(prompts, params, use_tqdm=False)
    assert small.llm_engine.get_stats().num_preemptions > 0
    assert results(outs) == alone
    assert_idle(small.llm_engine)
