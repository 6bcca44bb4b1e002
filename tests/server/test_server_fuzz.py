"""Schema fuzzing: schemathesis generates requests from the live server's /openapi.json, valid
and invalid, and checks every response: no 5xx, a status and a body (JSON, or each event of a
stream) that the schema declares, invalid input refused, valid input accepted, no operation
reachable without the API key, a 405 with `Allow` for undeclared methods.

`make test` runs a bounded, reproducible pass (fixed seed, deterministic generation, a few
examples per operation); `make fuzz` sets EMBER_FUZZ_EXAMPLES for a longer one.
"""

from __future__ import annotations

import os
import re
import time

import httpx
import pytest
import schemathesis
from conftest import REL_KEY, REL_MAX_MODEL_LEN

from ember.server.protocol import MAX_N

EXAMPLES = int(os.environ.get("EMBER_FUZZ_EXAMPLES", "5"))  # per operation and fuzzing pass
SEED = int(os.environ.get("EMBER_FUZZ_SEED", "20261122"))
# Unset: one coverage pass and one fuzzing pass. Set: fuzzing passes repeat for that long.
MAX_TIME = os.environ.get("EMBER_FUZZ_MAX_TIME")
# Valid values above these are sent as these: what the fuzzer probes is validation, and every
# generated token costs a decode step.
FUZZ_N = 2
FUZZ_TOKENS = 2
VOCAB = 49152  # SmolLM2's
SERVER: dict[str, str] = {}  # "url": the fuzzed server's, for the hooks


@pytest.fixture(scope="module")
def api_schema(rel_server):
    config = schemathesis.Config.from_dict({
        "seed": SEED,
        "generation": {"deterministic": True, "max-examples": EXAMPLES},
        **({"max-time": int(MAX_TIME)} if MAX_TIME else {}),
        "headers": {"Authorization": f"Bearer {REL_KEY}"},
        "request-timeout": 120,
        # Valid requests get 2xx (429: the queue is full): `fit` repairs what the schema
        # cannot say, so a 400 for a valid request fails the test.
        "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "429"]}},
    })
    SERVER["url"] = rel_server.url
    return schemathesis.openapi.from_url(f"{rel_server.url}/openapi.json", config=config,
                                         headers={"Authorization": f"Bearer {REL_KEY}"})


@schemathesis.hook("before_call")  # every phase: `map_body` misses the coverage phase
def cheaper(context, case, kwargs):
    """Fewer choices and tokens, each still valid: the case keeps its kind."""
    body = case.body
    if isinstance(body, dict) and case.path.startswith("/v1/"):
        if "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_tokens"] = FUZZ_TOKENS  # not to the end of the context
        for key, most, valid in (("n", FUZZ_N, MAX_N), ("max_tokens", FUZZ_TOKENS, None),
                                 ("max_completion_tokens", FUZZ_TOKENS, None)):
            value = body.get(key)
            if type(value) is int and most < value <= (valid or REL_MAX_MODEL_LEN):
                body[key] = most


@schemathesis.hook("before_call")
def fit(context, case, kwargs):
    """A valid request made to pass the rules JSON Schema cannot state, so that the server
    must accept it: rules across fields (the validators of protocol.py), rules that need the
    model (the context length, the vocabulary, a regex, grammar or JSON schema that
    compiles), and the context itself: a tool list does not fit in 64 tokens."""
    body = case.body
    meta = case.meta
    if not isinstance(body, dict) or meta is None or not meta.generation.mode.is_positive:
        return
    body.pop("model", None)  # any other name is a 404
    if not case.path.startswith("/v1/"):
        return
    if body.get("stream") is not True:
        body.pop("stream_options", None)
    if case.path == "/v1/completions":
        if body.get("echo") is True:
            body.pop("logprobs", None)
    else:
        for key in ("tools", "tool_choice"):
            body.pop(key, None)
        if body.get("top_logprobs") and body.get("logprobs") is not True:
            body["logprobs"] = True
        fmt = body.get("response_format")
        if body.get("structured_outputs") is not None and fmt and fmt["type"] != "text":
            body.pop("structured_outputs")  # one constraint on the answer at a time
        elif fmt and fmt["type"] == "json_schema" and fmt["json_schema"].get("schema") is not None:
            fmt["json_schema"]["schema"] = {"type": "object"}
    if isinstance(body.get("structured_outputs"), dict):
        body["structured_outputs"] = compiling(body["structured_outputs"])
    if body.get("structured_outputs") or (body.get("response_format") or {}).get(
            "type", "text") != "text":
        body.pop("min_tokens", None)  # the grammar decides where the answer ends
    if isinstance(body.get("logit_bias"), dict):
        # Token ids in the vocabulary; keys that are no ids at all are a generator's slip
        # (the schema's propertyNames), dropped too.
        body["logit_bias"] = {str(int(k) % VOCAB): v for k, v in body["logit_bias"].items()
                              if re.fullmatch(r"[0-9]{1,9}", k)}
    fit_context(SERVER["url"], case.path, body)


def compiling(constraint: dict) -> dict:
    """Exactly one constraint, of the first kind set, with a value that compiles."""
    for kind, value in constraint.items():
        if kind == "choice" and value:
            return {"choice": value}
        if kind == "json_object" and value is True:
            return {"json_object": True}
        if value is not None and kind in VALID_CONSTRAINTS:
            return {kind: VALID_CONSTRAINTS[kind]}
    return {"json_object": True}


VALID_CONSTRAINTS = {"json": {"type": "object"}, "regex": "[a-z]{1,8}",
                     "grammar": 'start: "yes" | "no"'}


def fit_context(url: str, path: str, body: dict) -> None:
    """Shrink the prompt until it leaves room in the context, then max_tokens to that room;
    min_tokens within max_tokens. The prompt is counted by the server's own /tokenize."""
    key = "max_tokens"
    if body.get("max_completion_tokens") is not None:  # chat: it takes precedence
        key = "max_completion_tokens"
    while (count := prompt_tokens(url, path, body)) >= REL_MAX_MODEL_LEN:
        assert shrink_prompt(path, body), body
    room = REL_MAX_MODEL_LEN - count
    if body.get(key) is not None and body[key] > room:
        body[key] = room
    if body.get(key) is not None and body.get("min_tokens", 0) > body[key]:
        body["min_tokens"] = body[key]


def prompt_tokens(url: str, path: str, body: dict) -> int:
    prompt = body.get("prompt")
    if path == "/v1/completions" and isinstance(prompt, list) and isinstance(prompt[0], int):
        return len(prompt)
    if path == "/v1/completions":
        request = {"prompt": prompt[0] if isinstance(prompt, list) else prompt}
    else:
        request = {"messages": body["messages"],
                   "add_generation_prompt": body.get("add_generation_prompt", True)}
    r = httpx.post(f"{url}/tokenize", json=request, timeout=60,
                   headers={"Authorization": f"Bearer {REL_KEY}"})
    if r.status_code == 400 and "maximum context length" in r.text:
        return REL_MAX_MODEL_LEN  # too long to be tokenized at all
    assert r.status_code == 200, (request, r.text)
    return r.json()["count"]


def shrink_prompt(path: str, body: dict) -> bool:
    """Halve the prompt: its text or ids, else the list of messages, else the one message's
    parts, calls, or longest text (content, tool_call_id, name); False when nothing is left
    to cut."""
    if path == "/v1/completions":
        prompt = body["prompt"]
        wrapped = isinstance(prompt, list) and isinstance(prompt[0], str)  # a list of one text
        cut = prompt[0] if wrapped else prompt
        if len(cut) <= 1:
            return False
        cut = cut[: len(cut) // 2]
        body["prompt"] = [cut] if wrapped else cut
        return True
    messages = body["messages"]
    if len(messages) > 1:
        del messages[(len(messages) + 1) // 2:]
        return True
    message = messages[0]
    content = message.get("content")
    if isinstance(content, list) and len(content) > 1:
        del content[(len(content) + 1) // 2:]
        return True
    if isinstance(content, list):
        message["content"] = content[0]["text"] if content else ""
    if message.get("tool_calls"):
        del message["tool_calls"]
        return True
    texts = [k for k in ("content", "tool_call_id", "name")
             if isinstance(message.get(k), str) and len(message[k]) > 1]
    if not texts:
        return False
    longest = max(texts, key=lambda k: len(message[k]))
    message[longest] = message[longest][: len(message[longest]) // 2]
    return True


def test_openapi_fuzz(api_schema):
    from schemathesis.engine import Status, StopReason, events, from_schema

    t0 = time.monotonic()
    problems: set[str] = set()
    cases = 0
    finished = None
    for event in from_schema(api_schema).execute():
        if isinstance(event, events.ScenarioFinished):
            cases += len(event.recorder.cases)
            for checks in event.recorder.checks.values():
                for check in checks:
                    if check.status is Status.FAILURE and check.failure_info is not None:
                        f = check.failure_info.failure
                        problems.add(f"{event.label}: {f.code} {f.title}: {f.message}\n"
                                     f"    {check.failure_info.code_sample}")
        elif isinstance(event, events.NonFatalError):
            problems.add(f"{event.label}: error: {event.value!r}")
        elif isinstance(event, events.FatalError):
            raise event.exception
        elif isinstance(event, events.PhaseFinished):
            print(f"schemathesis: {event.phase.name}: {event.status} at {time.monotonic() - t0:.1f} s")
        elif isinstance(event, events.EngineFinished):
            finished = event
    assert finished is not None
    print(f"schemathesis: {cases} cases in {finished.running_time:.1f} s (seed {SEED}), "
          f"stopped: {finished.stop_reason}")
    assert not problems, "\n".join(sorted(problems))
    assert finished.stop_reason in (StopReason.COMPLETED, StopReason.MAX_TIME)
    assert cases > 50
