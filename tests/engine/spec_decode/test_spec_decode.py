"""Speculative decoding through the whole engine on the real default model: outputs identical
to plain decoding (greedy and seeded), the target's distribution when sampling, no leaked
KV block, stop strings cut where plain decoding cuts.

Each precision mode has one speculating engine with a small KV pool (so that 8 concurrent
requests preempt each other) and speculation on for batches of any size; the plain reference
is an engine without speculation.
"""

from __future__ import annotations

import collections
import math

import pytest
import torch

from conftest import EXACT, engine_prefill_logits
from engine_utils import abort_mid_verification, assert_no_block_in_use
from engine_utils import first_outputs as generate
from ember import LLM, SamplingParams, StructuredOutputsParams
from ember.engine.model_runner import kv_bytes_per_block

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
        "prompt_lookup_min": 2, "disable_by_batch_size": 64}
SMALL_POOL = 20  # KV blocks of 16 tokens; the 8 requests below need more

PASSAGE = ("The lighthouse keeper climbed the spiral stairs every evening at dusk. He wound "
           "the clockwork, trimmed the wick and polished the great lens until it shone.")
CODE = ("def mean(values):\n    total = 0\n    for v in values:\n        total += v\n"
        "    return total / len(values)\n")
CHATS = [
    f"Repeat the following passage word for word:\n\n{PASSAGE}",
    f"Rename the function to `average` and return the whole code:\n\n{CODE}",
    f"Quote the sentence about the lens from this text:\n\n{PASSAGE}",
    "Write a short poem about the sea.",  # free-form: few drafts accepted
    f"Copy this code exactly:\n\n{CODE}",
    "What is the capital of France? Answer in one sentence.",
]


def chat_ids(llm: LLM, text: str) -> list[int]:
    tok = llm.get_tokenizer()
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]),
                      add_special_tokens=False)


@pytest.fixture(scope="module", params=["default", "exact"])
def mode(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def llms(mode, default_llm):
    """(plain, speculating) engines of one precision mode."""
    precision = EXACT if mode == "exact" else {}
    plain = default_llm if mode == "exact" else LLM(max_model_len=1024)
    # The pool in bytes: the KV dtype follows the activations, which follow the CPU.
    kv_dtype = plain.llm_engine.runner.kv_caches[0][0].dtype
    per_block = kv_bytes_per_block(plain.llm_engine.model_config, 16, kv_dtype)
    spec = LLM(max_model_len=1024, kv_cache_memory=SMALL_POOL * per_block,
               speculative_config=SPEC, **precision)
    assert spec.llm_engine.runner.num_blocks == SMALL_POOL
    yield plain, spec
    del spec


def test_greedy_alone_concurrent_prefix_hits_and_preemption_match_plain(llms):
    plain, spec = llms
    prompts = [chat_ids(spec, c) for c in CHATS] + [chat_ids(spec, CHATS[0])] * 2
    params = [SamplingParams(temperature=0, max_tokens=32)] * len(prompts)
    params[1] = SamplingParams(temperature=0, max_tokens=32, logprobs=2)
    params[5] = SamplingParams(temperature=0, max_tokens=32, min_tokens=24)
    expected = [generate(plain, p, q)[0] for p, q in zip(prompts[:6], params)]
    stats = spec.llm_engine.scheduler.spec_stats

    # Alone, one after the other: the prompts that repeat their input accept most drafts.
    for p, q, want in zip(prompts[:6], params, expected):
        got = generate(spec, p, q)[0]
        assert got.token_ids == want.token_ids and got.text == want.text
    assert stats.num_accepted_tokens > stats.num_draft_tokens / 2
    lp_spec, lp_plain = generate(spec, prompts[1], params[1])[0], expected[1]
    for a, b in zip(lp_spec.logprobs, lp_plain.logprobs):
        assert list(a) == list(b)
        assert [x.logprob for x in a.values()] == pytest.approx(
            [x.logprob for x in b.values()], abs=1e-3)
    assert lp_spec.cumulative_logprob == pytest.approx(lp_plain.cumulative_logprob, abs=1e-2)

    # Again: the prompt comes from the prefix cache.
    again = spec.generate(prompts[0], params[0], use_tqdm=False)[0]
    assert again.num_cached_tokens > 0 and again.outputs[0].token_ids == expected[0].token_ids

    # Eight at once in a pool too small for them: preemptions, the same outputs.
    preempted = spec.llm_engine.scheduler.num_preemptions
    drafted = stats.num_drafts
    outs = generate(spec, prompts, params)
    assert spec.llm_engine.scheduler.num_preemptions > preempted
    assert stats.num_drafts > drafted
    assert [o.token_ids for o in outs] == [e.token_ids for e in expected + expected[:1] * 2]
    assert_no_block_in_use(spec)


def test_structured_output_drafts_follow_the_grammar(llms):
    plain, spec = llms
    prompt = chat_ids(spec, 'Repeat this JSON exactly: {"name": "Ada Lovelace", "born": 1815, '
                      '"field": "mathematics"}')
    schema = {"type": "object", "properties": {"name": {"type": "string"},
                                               "born": {"type": "integer"},
                                               "field": {"type": "string"}},
              "required": ["name", "born", "field"]}
    params = SamplingParams(temperature=0, max_tokens=40,
                            structured_outputs=StructuredOutputsParams(json=schema))
    drafted = spec.llm_engine.scheduler.spec_stats.num_accepted_tokens
    want, got = generate(plain, prompt, params)[0], generate(spec, prompt, params)[0]
    assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason
    assert spec.llm_engine.scheduler.spec_stats.num_accepted_tokens > drafted


def test_stop_string_inside_an_accepted_run_cuts_where_plain_does(llms):
    plain, spec = llms
    prompt = chat_ids(spec, CHATS[0])
    params = SamplingParams(temperature=0, max_tokens=40)
    engine = spec.llm_engine
    engine.add_request("runs", prompt, params)
    runs = []
    while engine.has_unfinished_requests():
        runs += [o.outputs[0].token_ids for o in engine.step()]
    tokens = [t for run in runs for t in run]
    tok = spec.get_tokenizer()
    # A stop string ending inside a run of >= 3 tokens accepted in one step, found nowhere before.
    start = 0
    for run in runs:
        if len(run) >= 3:
            cut = start + 1  # the run's second token completes the stop string
            text_before = tok.decode(tokens[:cut])
            stop = tok.decode(tokens[: cut + 1])[-6:]
            if len(stop.strip()) >= 3 and stop not in text_before:
                break
        start += len(run)
    else:
        pytest.fail(f"no accepted run of 3 tokens: {runs}")
    stopped = SamplingParams(temperature=0, max_tokens=40, stop=[stop])
    want, got = generate(plain, prompt, stopped)[0], generate(spec, prompt, stopped)[0]
    assert got.token_ids == want.token_ids == tokens[: cut + 1]
    assert got.text == want.text and got.stop_reason == want.stop_reason == stop
    assert_no_block_in_use(spec)


def test_abort_mid_verification_leaks_no_block(llms):
    _, spec = llms
    abort_mid_verification(spec.llm_engine, chat_ids(spec, CHATS[4]),
                           SamplingParams(temperature=0, max_tokens=60),
                           lambda sched: sched.scheduled_spec_decode_tokens)
    assert_no_block_in_use(spec)


def _target_probabilities(llm: LLM, prompt: list[int], n: int) -> dict[tuple[int, ...], float]:
    """Every 3-token continuation of `prompt` that n samples at temperature 1 should show at
    least 5 times, with the target's probability of it (softmax of its logits, token by token;
    a prefix's probability bounds its continuations', so the search prunes below 5 / n)."""
    floor = math.log(5 / n)
    frontier = [((), 0.0)]
    for _ in range(3):
        grown = []
        for head, head_logp in frontier:
            logp = engine_prefill_logits(llm.llm_engine, prompt + list(head))[-1].log_softmax(-1)
            for tok in (logp + head_logp >= floor).nonzero().flatten().tolist():
                grown.append(((*head, tok), head_logp + float(logp[tok])))
        frontier = grown
    return {k: math.exp(lp) for k, lp in frontier}


def _chi_square_fit_p(counts: collections.Counter, probs: dict, n: int) -> float:
    """Chi-square goodness of fit of `counts` (n samples) to the probabilities `probs`: each
    outcome of `probs` a category, everything else pooled into one."""
    keys = list(probs)
    observed = [counts[k] for k in keys]
    expected = [n * probs[k] for k in keys]
    observed.append(n - sum(observed))
    expected.append(n - sum(expected))
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected) if e > 0)
    df = len(keys)  # categories - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2), torch.tensor(stat / 2)))


@pytest.mark.parametrize("mode", ["default"], scope="module")  # one mode is enough here
def test_sampling_follows_the_target_distribution(llms):
    plain = llms[0]
    # A pool for hundreds of requests at once (the module's speculating engine has a small one).
    spec = LLM(max_model_len=64, max_num_seqs=256,
               speculative_config={**SPEC, "disable_by_batch_size": 256})
    # 17 tokens: after the first requests, each one finds its first block (16 tokens) in the
    # prefix cache and computes 1 prompt token instead of 17.
    prompt = " ".join(["one", "two", "three"] * 5 + ["one", "two"])
    n = 2000
    params = [SamplingParams(temperature=1.0, max_tokens=3, seed=s, ignore_eos=True)
              for s in range(n)]
    stats = spec.llm_engine.scheduler.spec_stats
    drafted, accepted = stats.num_draft_tokens, stats.num_accepted_tokens
    outs = spec.generate([prompt] * n, params, use_tqdm=False)
    drafted, accepted = stats.num_draft_tokens - drafted, stats.num_accepted_tokens - accepted
    assert 0 < accepted < drafted  # drafts were both kept and rejected
    assert spec.llm_engine.block_manager.prefix_hits > 0
    assert len(outs[0].prompt_token_ids) == 17
    counts = collections.Counter(tuple(o.outputs[0].token_ids) for o in outs)
    assert len(counts) > 3  # a continuation with real randomness
    # Against the target's exact distribution (the non-speculating engine's logits).
    probs = _target_probabilities(plain, outs[0].prompt_token_ids, n)
    assert len(probs) > 3
    p = _chi_square_fit_p(counts, probs, n)
    top = sorted(probs, key=probs.get, reverse=True)[:8]
    assert p > 0.01, (p, [(k, counts[k], round(n * probs[k], 1)) for k in top])


def test_seeded_requests_reproduce_and_match_plain(llms):
    plain, spec = llms
    prompts = [chat_ids(spec, c) for c in CHATS[:3]]
    stats = spec.llm_engine.scheduler.spec_stats
    accepted = stats.num_accepted_tokens
    for seed, prompt in enumerate(prompts):
        params = SamplingParams(temperature=0.8, max_tokens=24, seed=seed)
        first, again = generate(spec, prompt, params)[0], generate(spec, prompt, params)[0]
        assert first.token_ids == again.token_ids
        assert first.token_ids == generate(plain, prompt, params)[0].token_ids
    assert stats.num_accepted_tokens > accepted
