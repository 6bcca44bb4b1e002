"""Constrained decoding: compiling and caching constraints, the per-sequence matcher
(advanced once per accepted token, also across preemption; draft tokens rolled back), the
sampler's masks (constrained and unconstrained rows in one batch), and the engine: every
kind of constraint, n > 1 with a seed, and unconstrained rows unchanged beside constrained
ones (exactness mode)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from ember import SamplingParams, StructuredOutputsParams
from ember.errors import InvalidRequestError
from ember.layers.sampler import Sampler, SamplingMetadata, SamplingRow
from ember.structured_output import GrammarCompiler
from ember.structured_output.schema import closed_schema

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "kind": {"type": "string", "enum": ["cat", "dog"]},
    "age": {"type": "integer", "minimum": 0, "maximum": 30}},
    "required": ["name", "kind", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def setup():
    from ember.loading.loader import open_model

    ckpt, _ = open_model(None, torch.float32, None)
    return GrammarCompiler(ckpt.tokenizer, ckpt.config.vocab_size), ckpt.tokenizer


def ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def allowed(mask: torch.Tensor, token: int) -> bool:
    return bool((int(mask[token // 32]) >> (token % 32)) & 1)


def test_compile_is_cached_by_constraint(setup):
    comp, _ = setup
    a = comp.compile(StructuredOutputsParams(json=SCHEMA))
    b = comp.compile(StructuredOutputsParams(json=json.dumps(SCHEMA)))  # same schema, as text
    assert a is b
    assert comp.compile(StructuredOutputsParams(regex="a+")) is not a


@pytest.mark.parametrize("params, message", [
    (dict(json={"type": "object", "properties": {"a": {"type": "nope"}}}), "invalid JSON schema"),
    (dict(json="{not json"), "invalid JSON schema"),
    (dict(regex="(unclosed"), "invalid regex"),
    (dict(grammar="start: missing"), "invalid grammar"),
    (dict(grammar="root ::= [unclosed"), "invalid grammar"),
])
def test_invalid_constraints_are_refused_by_name(setup, params, message):
    comp, _ = setup
    with pytest.raises(InvalidRequestError, match=message):
        comp.compile(StructuredOutputsParams(**params))


def test_params_need_exactly_one_constraint():
    with pytest.raises(InvalidRequestError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(InvalidRequestError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(InvalidRequestError, match="min_tokens"):
        SamplingParams(min_tokens=2, structured_outputs=StructuredOutputsParams(regex="a"))


def test_closed_schema_closes_listed_properties_only():
    inner = {"type": "object", "properties": {"x": {"type": "integer"}}}
    schema = {"type": "object", "properties": {
        "a": inner, "b": {"type": "array", "items": inner},
        "c": {"anyOf": [inner, {"type": "null"}]},
        "d": {"type": "object", "properties": {"y": {}}, "additionalProperties": True},
        "e": {"type": "object", "properties": {"z": {}}, "patternProperties": {"^k": {}}},
        "f": {"type": "object"},  # no properties listed: any object
        "g": {"prefixItems": [{"type": "string"}]},
        "h": {"allOf": [inner, {"properties": {"w": {}}}]},  # merged: both stay open
    }, "$defs": {"D": inner}}
    before = json.dumps(schema)
    out = closed_schema(schema)
    assert json.dumps(schema) == before  # a copy: the caller's schema is unchanged
    props = out["properties"]
    assert out["additionalProperties"] is False
    assert props["a"]["additionalProperties"] is False
    assert props["b"]["items"]["additionalProperties"] is False
    assert props["c"]["anyOf"][0]["additionalProperties"] is False
    assert out["$defs"]["D"]["additionalProperties"] is False
    assert props["d"]["additionalProperties"] is True
    assert "additionalProperties" not in props["e"] and "additionalProperties" not in props["f"]
    assert props["g"]["items"] is False
    assert all("additionalProperties" not in s for s in [props["h"], *props["h"]["allOf"]])


def test_unlisted_properties_are_not_generated(setup):
    """A schema silent about other properties: after the listed ones the object must close
    (a model that invents properties would otherwise run on until max_tokens)."""
    comp, tok = setup
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 5}},
              "required": ["a"]}
    m = comp.compile(StructuredOutputsParams(json=schema)).new_matcher()
    m.advance(ids(tok, '{"a":"x"'))
    mask = m.mask()
    assert allowed(mask, ids(tok, "}")[0]) and not allowed(mask, ids(tok, ",")[0])
    # Asked for, other properties are generated.
    open_ = comp.compile(StructuredOutputsParams(json={**schema, "additionalProperties": True}))
    m = open_.new_matcher()
    m.advance(ids(tok, '{"a":"x"'))
    assert allowed(m.mask(), ids(tok, ",")[0])


def test_matcher_follows_accepted_tokens_once(setup):
    comp, tok = setup
    m = comp.compile(StructuredOutputsParams(regex="abc[0-9]+")).new_matcher()
    out = ids(tok, "abc12")
    m.advance(out[:1])
    m.advance(out[:1])  # recomputed after a preemption: nothing new to consume
    m.advance(out)
    assert m.num_consumed == len(out)
    mask = m.mask()
    assert allowed(mask, ids(tok, "3")[0]) and not allowed(mask, ids(tok, "x")[0])
    with pytest.raises(RuntimeError, match="rejected"):
        m.advance(out + ids(tok, "x"))


def test_draft_tokens_validate_and_roll_back(setup):
    comp, tok = setup
    m = comp.compile(StructuredOutputsParams(choice=["hello world", "help"])).new_matcher()
    draft = ids(tok, "hello world")
    assert m.validate(draft + ids(tok, "!")) == len(draft)
    m.advance(draft)
    m.rollback(len(draft))
    assert m.num_consumed == 0
    m.advance(ids(tok, "help"))


def test_sampler_masks_only_constrained_rows(setup):
    comp, tok = setup
    vocab = comp.vocab_size
    torch.manual_seed(0)
    logits = torch.randn(3, vocab)
    digits = comp.compile(StructuredOutputsParams(regex="[0-9]{4}")).new_matcher()
    digits.prefetch_mask()  # as the engine does before the forward pass
    for temperature in (0.0, 1.0):
        params = SamplingParams(temperature=temperature, logprobs=2)

        def rows(grammar):
            return [SamplingRow(params, 7 + i, [1], [], [], grammar if i == 1 else None)
                    for i in range(3)]

        free = Sampler()(logits.clone(), SamplingMetadata.build(rows(None), vocab, "cpu"))
        mixed = Sampler()(logits.clone(), SamplingMetadata.build(rows(digits), vocab, "cpu"))
        for i in (0, 2):  # unconstrained rows sample as they would alone
            assert mixed.sampled_token_ids[i] == free.sampled_token_ids[i]
        token = int(mixed.sampled_token_ids[1])
        assert re.fullmatch("[0-9]+", tok.decode([token]))
    # The greedy kernel's path (no logprobs, all greedy) is masked too.
    plain = [SamplingRow(SamplingParams(temperature=0), 0, [1], [], [], g)
             for g in (None, digits)]
    meta = SamplingMetadata.build(plain, vocab, "cpu")
    out = Sampler()(logits[:2].clone(), meta)
    assert re.fullmatch("[0-9]+", tok.decode([int(out.sampled_token_ids[1])]))


def test_logit_bias_moves_the_argmax(setup):
    comp, _ = setup
    logits = torch.zeros(1, comp.vocab_size)
    params = SamplingParams(temperature=0, logit_bias={123: 5.0})
    out = Sampler()(logits, SamplingMetadata.build(
        [SamplingRow(params, 0, [1], [], [])], comp.vocab_size, "cpu"))
    assert int(out.sampled_token_ids[0]) == 123


# ---- the engine (exactness mode: the shared float32 default model) ------------------------
def test_engine_constraints_n_seed_and_unconstrained_neighbours(default_llm):
    llm = default_llm
    so = StructuredOutputsParams(json=SCHEMA)
    prompt = llm.get_tokenizer().encode(llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": "Describe a pet as JSON."}]), add_special_tokens=False)
    constrained = SamplingParams(n=4, seed=11, temperature=1.0, max_tokens=120,
                                 structured_outputs=so)
    first = llm.generate(prompt, constrained, use_tqdm=False)[0]
    again = llm.generate(prompt, constrained, use_tqdm=False)[0]
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in again.outputs]
    for c in first.outputs:
        assert c.finish_reason == "stop"
        doc = json.loads(c.text)
        assert doc["kind"] in ("cat", "dog") and 0 <= doc["age"] <= 30

    free = [SamplingParams(temperature=0, max_tokens=24),
            SamplingParams(temperature=0.8, seed=5, max_tokens=24, logprobs=1)]
    alone = llm.generate(["The sky is", "Once upon a time"], free, use_tqdm=False)
    mixed = llm.generate(["The sky is", prompt, "Once upon a time"],
                         [free[0], constrained, free[1]], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in alone] == [
        mixed[0].outputs[0].token_ids, mixed[2].outputs[0].token_ids]

    for so, pattern in ((StructuredOutputsParams(regex="[A-Z][a-z]{2,8}"), "[A-Z][a-z]{2,8}"),
                        (StructuredOutputsParams(choice=["red", "green"]), "red|green"),
                        (StructuredOutputsParams(grammar='root ::= "x" [0-9]+'), "x[0-9]+")):
        out = llm.generate("Pick:", SamplingParams(temperature=1.0, seed=2, max_tokens=20,
                                                   structured_outputs=so), use_tqdm=False)
        assert re.fullmatch(pattern, out[0].outputs[0].text)


def test_preemption_neither_skips_nor_repeats_grammar_tokens(tiny_llama_dir):
    """A random tiny model under a KV cache small enough to preempt: each constrained
    sequence's matcher must end where its tokens do (a token fed twice, or one missed, would
    be rejected by the grammar), and the outputs equal those of a cache that never preempts."""
    from ember import LLM
    from ember.engine.model_runner import kv_bytes_per_block

    so = StructuredOutputsParams(regex="(ab|cd|[0-9]{2}){1,40}")
    prompts = [[1] + list(range(100 + 7 * i, 130 + 7 * i)) for i in range(12)]
    params = SamplingParams(temperature=1.0, seed=4, max_tokens=40, structured_outputs=so)
    big = LLM(model=str(tiny_llama_dir), max_model_len=256, enforce_eager=True)
    reference = [o.outputs[0].token_ids for o in big.generate(prompts, params, use_tqdm=False)]
    engine = big.llm_engine
    per_block = kv_bytes_per_block(engine.model_config, 16, engine.dtype)
    small = LLM(model=str(tiny_llama_dir), max_model_len=256, enforce_eager=True,
                kv_cache_memory=16 * per_block)
    outs = small.generate(prompts, params, use_tqdm=False)
    assert small.llm_engine.get_stats().num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == reference
    for o in outs:
        # A valid prefix (max_tokens may cut a pair in two).
        assert re.fullmatch("(ab|cd|[0-9]{2})*(a|c|[0-9])?", o.outputs[0].text)
