"""Schema fuzzing: schemathesis generates requests from the live server's /openapi.json, valid
and invalid, and checks every response: no 5xx, a status and a body (JSON, or each event of a
stream) that the schema declares, invalid input refused, valid input accepted, no operation
reachable without the API key, a 405 with `Allow` for undeclared methods.

`make test` runs a bounded, reproducible pass (fixed seed, deterministic generation, a few
examples per operation); `make fuzz` sets EMBER_FUZZ_EXAMPLES for a longer one.
"""

from __future__ import annotations

import os
import time

import pytest
import schemathesis
from conftest import REL_KEY, REL_MAX_MODEL_LEN

from ember.server.protocol import MAX_N

EXAMPLES = int(os.environ.get("EMBER_FUZZ_EXAMPLES", "8"))  # per operation and fuzzing pass
SEED = int(os.environ.get("EMBER_FUZZ_SEED", "20261122"))
# Unset: one coverage pass and one fuzzing pass. Set: fuzzing passes repeat for that long.
MAX_TIME = os.environ.get("EMBER_FUZZ_MAX_TIME")
# Valid values above these are sent as these: 128 choices of 60 tokens cost minutes on a CPU.
FUZZ_N = 2
FUZZ_TOKENS = 8


@pytest.fixture(scope="module")
def api_schema(rel_server):
    config = schemathesis.Config.from_dict({
        "seed": SEED,
        "generation": {"deterministic": True, "max-examples": EXAMPLES},
        **({"max-time": int(MAX_TIME)} if MAX_TIME else {}),
        "headers": {"Authorization": f"Bearer {REL_KEY}"},
        "request-timeout": 120,
        "operations": [{
            # A valid request may still not fit: prompt + max_tokens over the context, or
            # min_tokens over max_tokens; a tool message needs its tool_call_id. JSON Schema
            # cannot say so; the server answers 400.
            "include-path-regex": "^/(v1/(chat/)?completions|tokenize)$",
            "checks": {"positive_data_acceptance": {
                "expected-statuses": ["2xx", "400", "401", "404", "429"]}},
        }],
    })
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
