"""Draft-model speculation through the whole engine on the real default model: the same model
in another precision drafts (the int4 GGUF for the float32 exactness mode; the GGUF for
itself in the default mode), outputs identical to plain decoding (greedy and seeded), no
leaked KV block, prefix-cache hits drafted from the draft's cached K/V; bad draft models
refused by name.

One speculating engine per mode, with a KV pool small enough that four concurrent requests
preempt each other; the plain references are engines without speculation.
"""

from __future__ import annotations

import pytest

from conftest import EXACT, write_tiny_llama
from engine_utils import abort_mid_verification, assert_no_block_in_use
from engine_utils import first_outputs as generate
from ember import LLM, SamplingParams
from ember.config import EngineConfig, SpeculativeConfig
from ember.errors import ConfigError
from ember.loading.gguf import default_gguf_path

SMALL_POOL = 12_000_000  # bytes: 8 float32 blocks of 16 tokens for both caches; 4 requests need ~14
PROMPTS = [
    "Repeat exactly: the lighthouse keeper wound the clockwork and lit the lamp.",
    "Write a short poem about the sea.",
    "What is the capital of France? Answer in one sentence.",
    "Name three colours.",
]


def draft_config(**extra) -> dict:
    return {"method": "draft_model", "model": str(default_gguf_path()),
            "num_speculative_tokens": 4, "disable_by_batch_size": 64, **extra}


def chat_ids(llm: LLM, text: str) -> list[int]:
    tok = llm.get_tokenizer()
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]),
                      add_special_tokens=False)


@pytest.fixture(scope="module")
def exact(default_llm):
    """(plain, speculating) in the exactness mode; the int4 default model drafts."""
    spec = LLM(max_model_len=512, kv_cache_memory=SMALL_POOL, **EXACT,
               speculative_config=draft_config(quantization="int4"))
    yield default_llm, spec
    del spec


def test_draft_precision_and_shared_kv_pool(exact):
    _, spec = exact
    drafter = spec.llm_engine.runner.drafter
    assert drafter is not None and spec.llm_engine.quantization == "none"
    assert drafter.runner.model.fused_decode is not None  # the int4 model's own kernels
    # The draft's cache mirrors the target's blocks; both fit the one KV budget.
    assert drafter.runner.num_blocks == spec.llm_engine.runner.num_blocks
    bytes_per_block = sum(2 * k.numel() * k.element_size() // drafter.runner.num_blocks
                          for runner in (drafter.runner, spec.llm_engine.runner)
                          for k, _ in runner.kv_caches)
    assert drafter.runner.num_blocks == SMALL_POOL // bytes_per_block


def test_exactness_mode_greedy_alone_prefix_hit_and_preemption_match_plain(exact):
    plain, spec = exact
    prompts = [chat_ids(spec, p) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=20)
    expected = [o.token_ids for o in generate(plain, prompts, params)]
    stats = spec.llm_engine.scheduler.spec_stats

    got = generate(spec, prompts[0], params)[0]
    assert got.token_ids == expected[0]
    # The same model drafts: nearly every draft is accepted.
    assert stats.num_accepted_tokens >= 0.8 * stats.num_draft_tokens > 0

    # Again: the prompt's blocks come from the prefix cache, and so does the draft's K/V of
    # them (written in the same steps as the target's): its drafts are as good as before.
    drafted, accepted = stats.num_draft_tokens, stats.num_accepted_tokens
    again = spec.generate(prompts[0], params, use_tqdm=False)[0]
    assert again.num_cached_tokens > 0 and again.outputs[0].token_ids == expected[0]
    drafted, accepted = stats.num_draft_tokens - drafted, stats.num_accepted_tokens - accepted
    assert accepted >= 0.8 * drafted > 0

    # Four at once in a pool too small for them: preemptions, the same outputs.
    preempted = spec.llm_engine.scheduler.num_preemptions
    outs = generate(spec, prompts, params)
    assert spec.llm_engine.scheduler.num_preemptions > preempted
    assert [o.token_ids for o in outs] == expected
    assert_no_block_in_use(spec)


def test_seeded_sampling_reproduces_and_matches_plain(exact):
    plain, spec = exact
    prompt = chat_ids(spec, PROMPTS[1])
    stats = spec.llm_engine.scheduler.spec_stats
    accepted = stats.num_accepted_tokens
    params = SamplingParams(temperature=0.8, max_tokens=24, seed=7)
    first, again = generate(spec, prompt, params)[0], generate(spec, prompt, params)[0]
    assert first.token_ids == again.token_ids == generate(plain, prompt, params)[0].token_ids
    # The draft samples with the request's noise: its samples are mostly the target's.
    assert stats.num_accepted_tokens - accepted >= 24


def test_abort_mid_verification_leaks_no_block(exact):
    _, spec = exact
    abort_mid_verification(spec.llm_engine, chat_ids(spec, PROMPTS[1]),
                           SamplingParams(temperature=0, max_tokens=40),
                           lambda sched: sched.num_lookahead_tokens)
    assert_no_block_in_use(spec)


def test_default_mode_greedy_matches_plain():
    """The GGUF drafting for itself, four requests at once."""
    plain = LLM(max_model_len=512)
    prompts = [chat_ids(plain, p) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=16)
    expected = [o.token_ids for o in generate(plain, prompts, params)]
    del plain
    spec = LLM(max_model_len=512, speculative_config=draft_config())
    assert [o.token_ids for o in generate(spec, prompts, params)] == expected
    stats = spec.llm_engine.scheduler.spec_stats
    assert stats.num_accepted_tokens == stats.num_draft_tokens > 0  # itself: all accepted
    assert_no_block_in_use(spec)


def test_a_smaller_model_with_the_same_vocabulary_drafts(tmp_path, hf_tokenizer_dir, exact):
    """A random two-layer model (SmolLM2's tokenizer): its drafts are mostly rejected, the
    output is the target's all the same."""
    plain, _ = exact
    tiny = write_tiny_llama(tmp_path / "tiny", hf_tokenizer_dir)
    spec = LLM(max_model_len=512, **EXACT,
               speculative_config=draft_config(model=str(tiny), num_speculative_tokens=2))
    prompt = chat_ids(spec, PROMPTS[2])
    params = SamplingParams(temperature=0, max_tokens=12)
    assert generate(spec, prompt, params)[0].token_ids == \
        generate(plain, prompt, params)[0].token_ids
    assert spec.llm_engine.scheduler.spec_stats.num_draft_tokens > 0
    assert_no_block_in_use(spec)


def test_bad_draft_models_are_refused_by_name(tmp_path, hf_tokenizer_dir):
    other_vocab = write_tiny_llama(tmp_path / "vocab", hf_tokenizer_dir, vocab_size=49_280)
    with pytest.raises(ConfigError, match="vocabulary of 49280 tokens, the target 49152"):
        LLM(max_model_len=128, speculative_config=draft_config(model=str(other_vocab)))
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ConfigError, match="speculative_config model .*no-such-model"):
        LLM(max_model_len=128, speculative_config=draft_config(model=missing))
    with pytest.raises(ConfigError, match="speculative_config model .*unsupported quantization"):
        LLM(max_model_len=128, speculative_config=draft_config(quantization="int3"))


@pytest.mark.parametrize(("values", "message"), [
    ({"method": "draft_model"}, "needs model"),
    ({"method": "ngram", "model": "x"}, "are for method 'draft_model'"),
    ({"method": "ngram", "quantization": "int4"}, "are for method 'draft_model'"),
    ({"method": "draft_model", "model": "x", "num_speculative_tokens": 0}, "integer >= 1"),
])
def test_speculative_config_refuses_bad_combinations(values, message):
    with pytest.raises(ConfigError, match=message):
        SpeculativeConfig.from_dict(values)


def test_draft_model_config_defaults_and_tensor_parallelism():
    spec = SpeculativeConfig.from_dict({"method": "draft_model", "model": "x"})
    assert spec.num_speculative_tokens == 4 and (spec.quantization, spec.dtype) == ("auto", "auto")
    with pytest.raises(ConfigError, match="tensor_parallel_size > 1"):
        EngineConfig(tensor_parallel_size=2, speculative_config={"method": "draft_model",
                                                                 "model": "x"})
