"""Tool calling's formats: every format's grammar accepts its own calls (fed token by token
to llguidance with the default model's tokenizer) and refuses bad ones, and the parser gets
the same calls back, from the whole text and from every prefix of it (streaming)."""

from __future__ import annotations

import json

import pytest
import torch

from ember.sampling_params import StructuredOutputsParams
from ember.server import tools
from ember.structured_output import GrammarCompiler

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string"}}, "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
ARGS = '{"city":"Paris","unit":"C"}'

CALL_TEXT = {
    "generic": '{"tool_calls":[{"name":"get_weather","arguments":' + ARGS + '}]}',
    "hermes": '<tool_call>\n{"name":"get_weather","arguments":' + ARGS + '}\n</tool_call>',
    "mistral": '[TOOL_CALLS][{"name":"get_weather","arguments":' + ARGS + '}]',
    "llama3_json": '{"name":"get_weather","parameters":' + ARGS + '}',
}


@pytest.fixture(scope="module")
def compiler():
    from ember.loading.loader import open_model

    ckpt, _ = open_model(None, torch.float32, None)
    return GrammarCompiler(ckpt.tokenizer, ckpt.config.vocab_size), ckpt.tokenizer


def accepts(compiler, grammar: str, text: str) -> bool:
    comp, tok = compiler
    m = comp.compile(StructuredOutputsParams(grammar=grammar)).new_matcher()
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_ids[0]]
    try:
        m.advance(ids)
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("fmt", list(CALL_TEXT))
@pytest.mark.parametrize("required", [True, False])
def test_grammar_accepts_a_call_and_refuses_bad_arguments(compiler, fmt, required):
    grammar = tools.tool_grammar(fmt, TOOLS, required=required, parallel=True)
    assert accepts(compiler, grammar, CALL_TEXT[fmt])
    bad = CALL_TEXT[fmt].replace('"unit":"C"', '"unit":"K"')
    assert not accepts(compiler, grammar, bad)
    unknown = CALL_TEXT[fmt].replace("get_weather", "get_wether")
    assert not accepts(compiler, grammar, unknown)
    # Text: only where the choice is "auto".
    assert accepts(compiler, grammar, "It is sunny in Paris.") is (not required)


def test_named_choice_allows_only_that_function(compiler):
    plan = tools.plan_tools("generic", TOOLS, {"type": "function",
                                                "function": {"name": "get_time"}}, True)
    assert not accepts(compiler, plan.grammar, CALL_TEXT["generic"])
    assert accepts(compiler, plan.grammar,
                   '{"tool_calls":[{"name":"get_time","arguments":{"zone":"UTC"}}]}')


def test_parallel_calls_only_when_allowed(compiler):
    two = ('{"tool_calls":[{"name":"get_weather","arguments":' + ARGS + '},'
           '{"name":"get_time","arguments":{"zone":"UTC"}}]}')
    assert accepts(compiler, tools.tool_grammar("generic", TOOLS, True, parallel=True), two)
    assert not accepts(compiler, tools.tool_grammar("generic", TOOLS, True, parallel=False), two)


@pytest.mark.parametrize("fmt", list(CALL_TEXT))
def test_parallel_calls_are_bounded(compiler, fmt):
    """MAX_PARALLEL_CALLS calls end the answer: one more is refused."""
    one = CALL_TEXT[fmt]
    if fmt == "generic":
        call = one[len('{"tool_calls":['):-len(']}')]
        many = lambda k: '{"tool_calls":[' + ",".join([call] * k) + "]}"  # noqa: E731
    elif fmt == "mistral":
        call = one[len("[TOOL_CALLS]["):-1]
        many = lambda k: "[TOOL_CALLS][" + ",".join([call] * k) + "]"  # noqa: E731
    elif fmt == "hermes":
        many = lambda k: "\n".join([one] * k)  # noqa: E731
    else:
        many = lambda k: "; ".join([one] * k)  # noqa: E731
    grammar = tools.tool_grammar(fmt, TOOLS, True, parallel=True)
    assert accepts(compiler, grammar, many(2))
    assert accepts(compiler, grammar, many(tools.MAX_PARALLEL_CALLS))
    assert not accepts(compiler, grammar, many(tools.MAX_PARALLEL_CALLS + 1))


@pytest.mark.parametrize("fmt", list(CALL_TEXT))
def test_parse_whole_and_every_prefix(fmt):
    text = CALL_TEXT[fmt]
    parsed = tools.parse_output(fmt, text)
    assert parsed.in_call and parsed.content == ""
    assert [(c.name, c.arguments, c.complete) for c in parsed.calls] == [
        ("get_weather", ARGS, True)]
    # Streaming: every prefix's arguments are a prefix of the final ones, names are whole.
    for end in range(len(text)):
        for call in tools.parse_output(fmt, text[:end]).calls:
            assert call.name in (None, "get_weather")
            assert ARGS.startswith(call.arguments)


def test_parse_text_and_held_back_trigger():
    assert tools.parse_output("generic", "Hello there").content == "Hello there"
    assert tools.parse_output("hermes", "Sure <tool").content == "Sure "  # maybe a trigger
    parsed = tools.parse_output("hermes", "Let me check.<tool_call>\n{\"name\":\"get_t")
    assert parsed.content == "Let me check." and parsed.calls[0].name is None


def test_detect_format():
    assert tools.detect_format(None) == "generic"
    assert tools.detect_format("{{ messages }}") == "generic"
    assert tools.detect_format("{% if tools %}<tool_call>{% endif %}") == "hermes"
    assert tools.detect_format("{% if tools %}[TOOL_CALLS]{% endif %}") == "mistral"
    assert tools.detect_format("{% if tools %}<|python_tag|>{% endif %}") == "llama3_json"


def test_generic_rendering_round_trip():
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": ARGS}}]},
        {"role": "tool", "content": "18 degrees", "tool_call_id": "call_1"},
    ]
    out = tools.render_messages(messages, "generic", TOOLS, parallel=True)
    assert out[0]["role"] == "system" and "get_weather" in out[0]["content"]
    assert json.loads(out[2]["content"]) == {"tool_calls": [
        {"name": "get_weather", "arguments": json.loads(ARGS)}]}
    assert out[3]["role"] == "user"
    assert json.loads(out[3]["content"])["tool_response"]["content"] == "18 degrees"


def test_plan_refuses_an_unknown_named_function():
    from ember.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="not in tools"):
        tools.plan_tools("generic", TOOLS, {"type": "function",
                                            "function": {"name": "nope"}}, True)
    assert tools.plan_tools("generic", TOOLS, "none", True).grammar is None
