"""The model runner's batches on the real default model: a prompt prefilled in chunks of 1, 7,
64 or 600 tokens (the scheduler's token budget) leaves bitwise the same KV cache and gives the
same tokens and logprobs, in the default mode (every step through the fused C++ call, the
row-invariant matmul kernels and ember's attention kernel)."""

from __future__ import annotations

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
