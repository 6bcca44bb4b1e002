"""Structured outputs and tool calling against a live `ember serve` on the default model,
through the official openai SDK and raw HTTP. One server serves the whole module."""

from __future__ import annotations

import enum
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema_rs
import openai
import pytest
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from server_utils import ServerProcess

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def server():
    # The exactness mode (dense float32): on CPUs without AVX512-BF16 the int4 GGUF mode
    # runs through ATen's int4 kernel, many times slower at batch 10-16.
    proc = ServerProcess("--served-model-name", "default", "--quantization", "none",
                         "--dtype", "float32", "--max-model-len", "2048",
                         "--kv-cache-memory", "300000000",
                         "--max-num-seqs", "16", env=ONE_THREAD)
    yield proc.wait_ready(timeout=900)
    proc.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                         timeout=600)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=600)


# ---- chat.completions.parse with a nested model (acceptance 1) --------------------------
class Role(str, enum.Enum):
    admin = "admin"
    editor = "editor"
    viewer = "viewer"


# Bounded strings, lists and numbers: a 135M model can repeat itself (a string's words, a
# float's digits) until max_tokens; the bounds are part of the schema, so the grammar enforces
# them (`multipleOf` bounds a number's decimals). Unlisted properties need no `extra="forbid"`:
# the grammar generates only the listed ones (ember.structured_output.schema).
class Address(BaseModel):
    city: str = Field(max_length=40)
    country: str = Field(max_length=40)


class Person(BaseModel):
    name: str = Field(max_length=40)
    role: Role
    skills: list[Annotated[str, Field(max_length=30)]] = Field(max_length=4)
    address: Address
    rating: float = Field(ge=0, le=10, multiple_of=0.01)


PEOPLE = ["a chef in Lyon", "a pilot from Oslo", "a teacher in Lima", "a nurse in Cairo",
          "a coder in Pune", "a farmer in Iowa", "a poet in Kyoto", "a judge in Accra",
          "a baker in Turin", "a diver in Perth"]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_parse_nested_model(client, temperature):
    def ask(who: str):
        # max_tokens: room for the longest strings the schema allows.
        return client.chat.completions.parse(
            model="default", response_format=Person, temperature=temperature, seed=1,
            max_tokens=600,
            messages=[{"role": "user", "content": f"Describe {who} as a user profile."}])

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(ask, PEOPLE))
    for r in results:
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, Person)


# ---- the other constraints ---------------------------------------------------------------
def test_structured_outputs_kinds(server):
    cases = [
        ({"regex": "[0-9]{3}-[a-z]{2,4}"}, r"^[0-9]{3}-[a-z]{2,4}$"),
        ({"choice": ["yes", "no", "maybe"]}, r"^(yes|no|maybe)$"),
        ({"grammar": 'root ::= "A" [bc]{1,5} "D"'}, r"^A[bc]{1,5}D$"),
        ({"grammar": 'start: "x" NUM\nNUM: /[0-9]{1,4}/'}, r"^x[0-9]{1,4}$"),
    ]
    import re

    for so, pattern in cases:
        for path, body in (
            ("/v1/completions", {"prompt": "Answer:", "max_tokens": 30}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Answer."}],
                                      "max_tokens": 30}),
        ):
            r = post(server, path, {**body, "temperature": 1.0, "seed": 3,
                                    "structured_outputs": so})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            text = choice["text"] if "text" in choice else choice["message"]["content"]
            assert re.match(pattern, text), (so, text)
            assert choice["finish_reason"] == "stop"


def test_json_object_and_streamed_json_schema(client):
    r = client.chat.completions.create(
        model="default", response_format={"type": "json_object"}, max_tokens=200, temperature=0,
        messages=[{"role": "user", "content": 'Reply with this JSON object: {"answer": 42}'}])
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    schema = Person.model_json_schema()
    stream = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Describe a chef."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": schema, "strict": True}},
        max_tokens=400, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    Person.model_validate_json(text)


def test_bad_requests_name_the_problem(server):
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    cases = [
        ({**chat, "frobnicate": 1}, "unsupported parameter: frobnicate"),
        ({**chat, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}}},
         "invalid JSON schema"),
        ({**chat, "structured_outputs": {"regex": "([a-z"}}, "invalid regex"),
        ({**chat, "structured_outputs": {"grammar": "start: undefined_rule"}}, "invalid grammar"),
        ({**chat, "structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one"),
        ({**chat, "tools": [{"type": "function", "function": {"name": "f"}}],
          "tool_choice": {"type": "function", "function": {"name": "g"}}}, "not in tools"),
        ({**chat, "store": True}, "store"),
        ({"prompt": "x", "echo": True, "logprobs": 1}, "echo with logprobs"),
        ({"prompt": "x", "best_of": 2}, "unsupported parameter: best_of"),
    ]
    for body, needle in cases:
        path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
        r = post(server, path, body)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert needle in err["message"], (needle, err)
        assert err["type"] == "invalid_request_error"
    # Ignored fields change nothing and are accepted.
    r = post(server, "/v1/chat/completions", {**chat, "max_tokens": 2, "user": "u",
                                              "metadata": {"k": "v"}, "store": False})
    assert r.status_code == 200, r.text


def test_logit_bias_echo_and_usage(server, client):
    tok = post(server, "/tokenize", {"prompt": " Paris"}).json()["tokens"][-1]
    r = client.completions.create(model="default", prompt="The capital of France is",
                                  max_tokens=3, temperature=0, logit_bias={str(tok): -100})
    assert " Paris" not in r.choices[0].text
    r = client.completions.create(model="default", prompt="Hello", max_tokens=2,
                                  temperature=0, echo=True)
    assert r.choices[0].text.startswith("Hello") and len(r.choices[0].text) > 5
    stream = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=3,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 3


# ---- tools (acceptance 2) -----------------------------------------------------------------
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "the city", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]
VALIDATOR = jsonschema_rs.validator_for(WEATHER["function"]["parameters"])


def test_required_and_named_100_calls_at_temperature_1(client):
    # max_tokens: room for MAX_PARALLEL_CALLS (8) calls, which a "required" answer may hold.
    def ask(i: int):
        return client.chat.completions.create(
            model="default", messages=ASK, tools=[WEATHER], temperature=1.0, seed=i,
            tool_choice="required" if i % 2 else NAMED, max_tokens=400)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, range(100)))
    for i, r in enumerate(results):
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        calls = choice.message.tool_calls
        assert calls and all(c.function.name == "get_weather" for c in calls)
        assert i % 2 or len(calls) == 1  # a named function: one call
        for c in calls:
            assert c.id.startswith("call_") and c.type == "function"
            VALIDATOR.validate(json.loads(c.function.arguments))


def test_streamed_call_assembles_into_the_non_streamed_one(client):
    kwargs = dict(model="default", messages=ASK, tools=[WEATHER], tool_choice="required",
                  temperature=0, max_tokens=200)
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for d in choice.delta.tool_calls or ():
                if d.index not in calls:  # the first delta of a call: id and name
                    assert d.id and d.function.name
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
                calls[d.index]["arguments"] += d.function.arguments or ""
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls]


def test_tool_result_round_trip_answers_in_text(client):
    first = client.chat.completions.create(model="default", messages=ASK, tools=[WEATHER],
                                           tool_choice="required", temperature=0,
                                           max_tokens=200).choices[0].message
    call = first.tool_calls[0]
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 degrees."},
    ]
    r = client.chat.completions.create(model="default", messages=messages, tools=[WEATHER],
                                       tool_choice="none", temperature=0, max_tokens=40)
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert choice.message.content and not choice.message.tool_calls


def test_auto_is_text_or_a_valid_call(client):
    def ask(i: int):
        return client.chat.completions.create(model="default", messages=ASK, tools=[WEATHER],
                                              tool_choice="auto", temperature=1.0, seed=i,
                                              max_tokens=60)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(ask, range(4)))
    for r in results:
        choice = r.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            for c in choice.message.tool_calls:
                VALIDATOR.validate(json.loads(c.function.arguments))
        else:
            assert not (choice.message.content or "").lstrip().startswith("{")


# ---- agent frameworks (acceptance 3) ------------------------------------------------------
# Temperature 0 and bounded schemas throughout; each framework's own client talks to the server.
class CityWeather(BaseModel):
    city: str = Field(max_length=40)
    unit: Literal["celsius", "fahrenheit"]


def test_pydantic_ai_agent_loop(server):
    """A tool call, its result, then the final answer in text: the first step must call the
    tool (forced by the grammar), the later ones may not call any."""
    from pydantic_ai import Agent, RunContext
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    provider = OpenAIProvider(base_url=f"{server.url}/v1", api_key="unused")
    calls: list[str] = []

    def settings(ctx: RunContext) -> dict:
        first = ctx.run_step <= 1  # the first model request of the run
        return {"temperature": 0.0, "max_tokens": 120, "parallel_tool_calls": False,
                "tool_choice": ["get_weather"] if first else "none"}

    agent = Agent(OpenAIChatModel("default", provider=provider), model_settings=settings)

    @agent.tool_plain
    def get_weather(city: Annotated[str, Field(max_length=40)]) -> str:
        """Get the current weather in a city."""
        calls.append(city)
        return f"It is sunny and 21 degrees in {city}."

    result = agent.run_sync("What is the weather like in Paris?")
    assert len(calls) == 1 and calls[0]
    assert isinstance(result.output, str) and result.output
    kinds = [type(p).__name__ for m in result.all_messages() for p in m.parts]
    assert kinds == ["UserPromptPart", "ToolCallPart", "ToolReturnPart", "TextPart"], kinds


def test_instructor_extraction(server):
    import instructor

    client = instructor.from_openai(openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused",
                                                  max_retries=0, timeout=600))
    weather = client.chat.completions.create(
        model="default", response_model=CityWeather, temperature=0, max_tokens=120,
        max_retries=0,
        messages=[{"role": "user", "content": "Paris is sunny today, 21 degrees Celsius."}])
    assert isinstance(weather, CityWeather) and weather.city


def test_langchain_bind_tools_and_structured_output(server):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="default", base_url=f"{server.url}/v1", api_key="unused",
                     temperature=0, max_tokens=300, max_retries=0)

    @tool(args_schema=CityWeather)
    def get_weather(city: str, unit: str) -> str:
        """Get the current weather in a city, in celsius or fahrenheit."""
        return "sunny"

    msg = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(
        "What is the weather like in Paris?")
    assert [c["name"] for c in msg.tool_calls] == ["get_weather"]
    CityWeather.model_validate(msg.tool_calls[0]["args"])

    person = llm.with_structured_output(Person).invoke("Describe a chef from Lyon.")
    assert isinstance(person, Person)
