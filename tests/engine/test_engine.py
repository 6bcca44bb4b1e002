"""The engine core on the real model: continuous batching, chunked prefill, preemption,
prefix caching, aborts and leaks."""

from __future__ import annotations

import pytest

from ember import LLM, SamplingParams
from ember.engine.model_runner import kv_bytes_per_block
from conftest import EXACT
from engine_utils import assert_idle, text_ids

def token_ids(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=2048, **EXACT)


def test_batch_invariance_greedy_and_seeded(llm):
    """The exactness mode's dense layers (column tiles) and attention: together as alone
    (the default mode's own test: test_determinism.py)."""
    tok = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": text_ids(tok, n, seed=n)} for n in (5, 170, 600)]
    for params in (SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                   SamplingParams(temperature=1.0, seed=1234, max_tokens=4, ignore_eos=True)):
        together = token_ids(llm.generate(prompts, params, use_tqdm=False))
        alone = [token_ids(llm.generate([p], params, use_tqdm=False))[0] for p in prompts]
        assert together == alone
    assert_idle(llm.llm_engine)


def test_chunked_prefill_keeps_decodes_going():
    llm = LLM(max_model_len=2048, **EXACT, max_num_batched_tokens=64)
    engine = llm.llm_engine
    tok = llm.get_tokenizer()
    decode = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    for i in range(4):
        engine.add_request(f"d{i}", text_ids(tok, 10, seed=i), decode)
    while True:  # until all four have their first token
        outs = engine.step()
        if len(outs) == 4 and all(len(o.outputs[0].token_ids) >= 1 for o in outs):
            break
    engine.add_request("long", text_ids(tok, 1000, seed=99),
                       SamplingParams(temperature=0, max_tokens=2))
    steps = 0
    while True:
        outs = {o.request_id: o for o in engine.step()}
        steps += 1
        assert {f"d{i}" for i in range(4)} <= set(outs), f"a decode stalled at step {steps}"
        if "long" in outs:
            break
    # 1000 prompt tokens over steps of 64 - 4 decode tokens each.
    assert steps >= 1000 // 60
    for i in range(4):
        engine.abort_request(f"d{i}")
    engine.abort_request("long")
    assert_idle(engine)


def test_preemption_gives_identical_outputs(llm):
    tok = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": text_ids(tok, 20 + 6 * i, seed=i)} for i in range(16)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    reference = token_ids(llm.generate(prompts, params, use_tqdm=False))

    # 16 sequences of 32-122 tokens need ~80 blocks of 16 at their ends: a pool of 32 preempts.
    per_block = kv_bytes_per_block(llm.llm_engine.model_config, 16, llm.llm_engine.dtype)
    small = LLM(max_model_len=2048, **EXACT, kv_cache_memory=32 * per_block)
    assert small.llm_engine.block_manager.num_blocks == 32
    outs = small.generate(prompts, params, use_tqdm=False)
    assert token_ids(outs) == reference
    assert small.llm_engine.get_stats().num_preemptions > 0
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    assert_idle(small.llm_engine)


def test_request_that_can_never_fit(llm):
    from ember.errors import InvalidRequestError

    per_block = kv_bytes_per_block(llm.llm_engine.model_config, 16, llm.llm_engine.dtype)
    small = LLM(max_model_len=2048, **EXACT, kv_cache_memory=4 * per_block)
    with pytest.raises(InvalidRequestError, match="needs 5 KV blocks.*only 4"):
        small.generate([list(range(100, 170))], SamplingParams(max_tokens=10), use_tqdm=False)
    assert_idle(small.llm_engine)


def test_prefix_caching_reuses_512_token_prefix(llm):
    tok = llm.get_tokenizer()
    prefix = text_ids(tok, 512, seed=7)
    a = prefix + text_ids(tok, 20, seed=8)
    b = prefix + text_ids(tok, 30, seed=9)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    llm.generate([a], params, use_tqdm=False)
    out_b = llm.generate([b], params, use_tqdm=False)[0]
    assert out_b.num_cached_tokens >= 480

    uncached = LLM(max_model_len=2048, **EXACT, enable_prefix_caching=False)
    ref = uncached.generate([b], params, use_tqdm=False)[0]
    assert ref.num_cached_tokens == 0
    assert out_b.outputs[0].token_ids == ref.outputs[0].token_ids
    assert llm.llm_engine.get_stats().prefix_cache_hit_rate > 0
    assert_idle(llm.llm_engine)


def test_n_samples_share_prompt_blocks(llm):
    tok = llm.get_tokenizer()
    prompt = text_ids(tok, 64, seed=11)
    out = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8,
                                                ignore_eos=True), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # the samples differ
    assert_idle(llm.llm_engine)


def test_aborts_mid_prefill_and_mid_decode_leak_nothing():
    llm = LLM(max_model_len=2048, **EXACT, max_num_batched_tokens=64)
    engine = llm.llm_engine
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    engine.add_request("prefilling", text_ids(tok, 500, seed=1), params)
    engine.add_request("decoding", text_ids(tok, 8, seed=2), params)
    engine.add_request("queued", text_ids(tok, 8, seed=3), params)
    engine.step()
    req = engine._children["prefilling"][0].children[0]
    assert 0 < req.num_computed_tokens < 500  # mid-prefill
    engine.abort_request("prefilling")
    while not engine._parents["decoding"].children[0].output_token_ids:
        engine.step()
    engine.abort_request("decoding")
    engine.abort_request("queued")
    assert_idle(engine)
    # The engine still serves after the aborts.
    out = llm.generate([text_ids(tok, 8, seed=4)], SamplingParams(max_tokens=4), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    assert_idle(engine)


def test_stats_and_metrics(llm):
    out = llm.generate(["Hello"], SamplingParams(max_tokens=4, ignore_eos=True),
                       use_tqdm=False)[0]
    m = out.metrics
    assert m.time_to_first_token is not None and m.time_to_first_token > 0
    assert m.queue_time is not None and 0 <= m.queue_time <= m.time_to_first_token
    assert m.finished_time is not None and m.finished_time >= m.last_token_time
    assert m.last_token_time >= m.first_token_time
    stats = llm.llm_engine.get_stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total and stats.num_running == 0


def test_unseeded_engines_draw_fresh_seeds():
    from ember.engine.llm_engine import engine_rng

    # No configured seed: fresh entropy at every start, so sampling never repeats across
    # restarts; a configured one reproduces.
    assert engine_rng(None).getrandbits(63) != engine_rng(None).getrandbits(63)
    assert engine_rng(5).getrandbits(63) == engine_rng(5).getrandbits(63)
    from ember.config import EngineConfig
    assert EngineConfig().seed is None
