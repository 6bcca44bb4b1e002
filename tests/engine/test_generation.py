"""Generation semantics through the whole engine on the real model: n, logprobs, stop strings
and ids, min_tokens, ignore_eos, validation errors."""

from __future__ import annotations

import pytest

from ember import SamplingParams
from ember.errors import InvalidRequestError
from ember.outputs import merge_outputs
from conftest import engine_prefill_logits
from engine_utils import assert_no_block_in_use

PROMPT = "The history of the printing press"


def test_n3_greedy_equals_single_and_seeded_is_reproducible(default_llm):
    single = default_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=10),
                                  use_tqdm=False)[0].outputs[0]
    three = default_llm.generate(PROMPT, SamplingParams(n=3, temperature=0, max_tokens=10),
                                 use_tqdm=False)[0].outputs
    assert [c.token_ids for c in three] == [single.token_ids] * 3
    seeded = SamplingParams(n=3, temperature=1.0, seed=42, max_tokens=10, ignore_eos=True)
    a = default_llm.generate(PROMPT, seeded, use_tqdm=False)[0].outputs
    b = default_llm.generate(PROMPT, seeded, use_tqdm=False)[0].outputs
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert len({tuple(c.token_ids) for c in a}) == 3



def test_greedy_n_computes_one_sequence_and_outputs_it_n_times(default_llm):
    engine = default_llm.llm_engine
    params = SamplingParams(n=4, temperature=0, max_tokens=12, logprobs=2, stop=[" the"])
    engine.add_request("greedy-n", PROMPT, params)
    deltas = [engine.step()]
    assert engine.get_stats().num_running == 1  # one sequence for the four completions
    while engine.has_unfinished_requests():
        deltas.append(engine.step())
    merged = merge_outputs([o for step in deltas for o in step if o.request_id == "greedy-n"])
    alone = default_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12,
                                                        logprobs=2, stop=[" the"]),
                                 use_tqdm=False)[0].outputs[0]
    assert [c.index for c in merged.outputs] == [0, 1, 2, 3]
    for c in merged.outputs:
        assert (c.text, c.token_ids, c.finish_reason) == (alone.text, alone.token_ids,
                                                         alone.finish_reason)
        assert c.logprobs == alone.logprobs
    assert_no_block_in_use(default_llm)

def test_logprobs_match_reference_log_softmax(default_llm):
    out = default_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=6, logprobs=3,
                                                      ignore_eos=True), use_tqdm=False)[0]
    comp = out.outputs[0]
    assert len(comp.logprobs) == 6
    # Reference: log_softmax of the model's logits over prompt + generated tokens.
    ids = out.prompt_token_ids + comp.token_ids
    ref = engine_prefill_logits(default_llm.llm_engine, ids).log_softmax(-1)
    n = len(out.prompt_token_ids)
    total = 0.0
    for i, (tok, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
        row = ref[n - 1 + i]
        top_vals, top_ids = row.topk(3)
        assert list(entry)[:3] == top_ids.tolist()
        assert [entry[t].rank for t in top_ids.tolist()] == [1, 2, 3]
        for t in top_ids.tolist():
            assert entry[t].logprob == pytest.approx(row[t].item(), abs=1e-4)
        assert tok == top_ids[0].item()  # greedy picks the top-1
        total += row[tok].item()
    assert comp.cumulative_logprob == pytest.approx(total, abs=1e-3)


def test_stop_string_spanning_two_tokens(default_llm):
    tok = default_llm.get_tokenizer()
    base = default_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24,
                                                       ignore_eos=True), use_tqdm=False)[0]
    ids = base.outputs[0].token_ids
    # A stop string made of the end of token 3 and the start of token 4.
    t3, t4 = tok.decode(ids[3:4]), tok.decode(ids[4:5])
    assert len(t3) >= 2 and len(t4) >= 2
    stop = t3[-2:] + t4[:2]
    out = default_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24, stop=[stop],
                                                      ignore_eos=True), use_tqdm=False)[0]
    comp = out.outputs[0]
    assert comp.finish_reason == "stop" and comp.stop_reason == stop
    full = base.outputs[0].text
    assert comp.text == full[: full.index(stop)]
    kept = default_llm.generate(PROMPT, SamplingParams(
        temperature=0, max_tokens=24, stop=[stop], include_stop_str_in_output=True,
        ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == full[: full.index(stop) + len(stop)]


def test_stop_token_ids_min_tokens_and_ignore_eos(default_llm):
    base = default_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12,
                                                       ignore_eos=True), use_tqdm=False)[0]
    ids = base.outputs[0].token_ids
    stop_id = ids[5]
    first = ids.index(stop_id)
    out = default_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12,
                                                      stop_token_ids=[stop_id]),
                               use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    # As vLLM: the stop token's text is not in the output, unless asked for.
    tok = default_llm.get_tokenizer()
    assert tok.decode(ids[first:first + 1]).strip()  # the test needs a visible stop token
    assert out.text == tok.decode(ids[:first])
    kept = default_llm.generate(PROMPT, SamplingParams(
        temperature=0, max_tokens=12, stop_token_ids=[stop_id], include_stop_str_in_output=True),
        use_tqdm=False)[0].outputs[0]
    assert kept.text == tok.decode(ids[:first + 1])

    chat = [{"role": "user", "content": "What is the capital of France?"}]
    eos = default_llm.get_tokenizer().eos_token_ids
    short = default_llm.chat(chat, SamplingParams(temperature=0, max_tokens=64),
                             use_tqdm=False)[0].outputs[0]
    assert short.finish_reason == "stop" and short.token_ids[-1] in eos
    longer = default_llm.chat(chat, SamplingParams(temperature=0, max_tokens=64,
                                                   min_tokens=len(short.token_ids) + 5),
                              use_tqdm=False)[0].outputs[0]
    assert len(longer.token_ids) >= len(short.token_ids) + 5
    assert not set(longer.token_ids[: len(short.token_ids) + 4]) & set(eos)
    ignored = default_llm.chat(chat, SamplingParams(temperature=0, max_tokens=len(short.token_ids)
                                                    + 3, ignore_eos=True),
                               use_tqdm=False)[0].outputs[0]
    assert ignored.finish_reason == "length"
    assert len(ignored.token_ids) == len(short.token_ids) + 3


def test_prompt_too_long_and_bad_values(default_llm):
    engine = default_llm.llm_engine
    limit = engine.max_model_len
    with pytest.raises(InvalidRequestError, match=f"maximum context length is {limit} tokens. "
                                                  f"However, you requested {limit + 16} tokens"):
        default_llm.generate([[100] * limit], use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="the prompt is empty"):
        default_llm.generate([[]], use_tqdm=False)
    with pytest.raises(InvalidRequestError, match=r"token id 99999 is outside the vocabulary"):
        default_llm.generate([[1, 99999]], use_tqdm=False)
    with pytest.raises(InvalidRequestError, match=r"temperature must be in \[0, 100\], got -1"):
        SamplingParams(temperature=-1)
    with pytest.raises(InvalidRequestError, match=r"top_p must be in \(0, 1\], got 1.5"):
        SamplingParams(top_p=1.5)
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_cli_user_error_is_one_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "ember", "generate", "hi", "--model", str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"ember: error: model path not found: {tmp_path / 'nope'}")
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "ember", "generate", "hi", "--temperature",
                           "-2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "temperature must be in [0, 100], got -2" in proc.stderr and "Traceback" not in proc.stderr
