"""The model runner's batches on the real default model: a prompt prefilled in chunks of 1, 7,
64 or 600 tokens (the scheduler's token budget) leaves bitwise the same KV cache and gives the
same tokens and logprobs, in the default mode (every step through the fused C++ call, the
row-invariant matmul kernels and ember's attention kernel)."""

from __future__ import annotations

import pytest
import torch

from ember import LLM, SamplingParams, kernels

TEXT = ("The old lighthouse keeper climbed the stairs every evening, counting the steps as his "
        "father had taught him. At the top he lit the lamp, wound the clockwork that turned the "
        "lens, and wrote the weather in a small leather book. ")


def _prefill_in_chunks(llm: LLM, budget: int, prompt: list[int]):
    """Generate from `prompt` with a token budget of `budget` a step: the prompt's K/V (every
    layer, read through the request's blocks), the tokens, their top logprobs."""
    engine = llm.llm_engine
    engine.scheduler.config.max_num_batched_tokens = budget  # the one engine, rechunked
    runner = engine.runner
    tables: dict[str, list[int]] = {}
    prepare = runner._prepare

    def recording(sched):  # each request's blocks, as the runner sees them
        tables.update({r: list(runner.requests[r].block_table)
                       for r in sched.num_scheduled_tokens})
        return prepare(sched)

    runner._prepare = recording
    try:
        out = llm.generate({"prompt_token_ids": prompt},
                           SamplingParams(max_tokens=4, temperature=0.0, logprobs=5))[0]
    finally:
        runner._prepare = prepare
    (table,) = tables.values()
    pos = torch.arange(len(prompt))
    bs = runner.block_size
    slots = torch.tensor(table)[pos // bs] * bs + pos % bs
    kv = torch.stack([c[slots] for layer in runner.kv_caches for c in layer])
    completion = out.outputs[0]
    logprobs = [{t: lp.logprob for t, lp in step.items()} for step in completion.logprobs]
    return kv, list(completion.token_ids), logprobs


def test_chunked_prefill_is_bitwise_the_same_whatever_the_chunks():
    assert kernels.load()
    llm = LLM(enable_prefix_caching=False, max_model_len=1024)
    assert llm.llm_engine.model.fused_decode is not None
    prompt = llm.get_tokenizer().encode(TEXT * 20)[:650]
    kv, tokens, logprobs = _prefill_in_chunks(llm, 600, prompt)  # chunks of 600 and 50
    assert kv.shape[1] == 650 and len(tokens) == 4
    for budget in (64, 7, 1):
        other_kv, other_tokens, other_logprobs = _prefill_in_chunks(llm, budget, prompt)
        assert torch.equal(other_kv, kv), budget
        assert other_tokens == tokens and other_logprobs == logprobs, budget


def test_bfloat16_kv_cache_holds_twice_the_tokens_and_keeps_the_logits():
    from conftest import EXACT, engine_prefill_logits
    from ember.errors import ConfigError

    # 64 float32 blocks of the default model: 2 x 30 layers x 3 KV heads x 64 x 16 tokens x 4 B.
    budget = 64 * 2 * 30 * 3 * 64 * 16 * 4
    wide = LLM(max_model_len=512, kv_cache_memory=budget, **EXACT)
    half = LLM(max_model_len=512, kv_cache_memory=budget, kv_cache_dtype="bfloat16", **EXACT)
    assert wide.llm_engine.runner.kv_caches[0][0].dtype == torch.float32
    assert half.llm_engine.runner.kv_caches[0][0].dtype == torch.bfloat16
    assert wide.llm_engine.block_manager.num_blocks == 64
    assert half.llm_engine.block_manager.num_blocks == 128
    # Keys and values rounded to bfloat16 (8 mantissa bits): the logits move by a little.
    ids = wide.get_tokenizer().encode(TEXT * 3)
    a = engine_prefill_logits(wide.llm_engine, ids)
    b = engine_prefill_logits(half.llm_engine, ids)
    assert (a - b).abs().max() < 0.5 and (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95
    # Decoding through the fused step reads and writes the bfloat16 cache; one row or many,
    # a request's tokens stay its own.
    prompts = [{"prompt_token_ids": ids[:n]} for n in (9, 70, 150)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    together = [o.outputs[0].token_ids for o in half.generate(prompts, params, use_tqdm=False)]
    alone = [half.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    assert together == alone
    with pytest.raises(ConfigError, match="kv_cache_dtype must be one of"):
        LLM(max_model_len=64, kv_cache_dtype="float8")
    with pytest.raises(ConfigError, match="wider than the bfloat16 activations"):
        LLM(max_model_len=64, dtype="bfloat16", quantization="none", kv_cache_dtype="float32")

