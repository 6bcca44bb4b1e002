"""`ember serve` end to end: a real server process, the official openai SDK and raw httpx.

One server (with an API key) serves the ordinary tests; the overload and SIGTERM tests share
a second one with other flags, started together with the first.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from ember import SamplingParams
from ember.config import EngineConfig
from ember.engine.async_engine import AsyncLLMEngine
from ember.engine.input_processor import ProcessedRequest
from ember.engine.llm_engine import EngineStats
from ember.server import build_app
from server_utils import ServerProcess

KEY = "sk-test-key"
# A smaller KV cache than the CPU default (2 GiB) starts faster and fits these tests.
KV = ("--kv-cache-memory", "500000000")
# The main server runs the exactness mode, like the offline `default_llm` it is compared
# with; the small one runs the default (quantized GGUF, bf16) mode.
EXACT = ("--quantization", "none", "--dtype", "float32")
SMALL = ("--max-model-len", "2048", *KV)
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name three colours."}]


GRACE = 5.0


@pytest.fixture(scope="module")
def servers():
    # The second server serves the overload test, then the SIGTERM test (its last use).
    procs = {
        "main": ServerProcess(*EXACT, *KV, api_key=KEY),
        "small": ServerProcess("--max-queued-requests", "4", "--max-num-seqs", "2",
                               "--shutdown-grace", str(GRACE), *SMALL),
    }
    yield procs
    for p in procs.values():
        p.stop()


@pytest.fixture(scope="module")
def server(servers) -> ServerProcess:
    return servers["main"].wait_ready()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def post(server: ServerProcess, path: str, body, headers=None) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    hdrs = {"Content-Type": "application/json", **server.headers, **(headers or {})}
    return httpx.post(f"{server.url}{path}", content=content, headers=hdrs, timeout=60)


# ---- (0) while loading (first: the servers are still loading the model) ---------------------
def test_503_while_the_model_loads(servers):
    """uvicorn answers before the engine has loaded: /health and the API say 503, not ready."""
    srv = servers["small"]
    deadline = time.monotonic() + 120
    while True:  # the first answer of all: the model takes seconds to load, the socket less
        assert time.monotonic() < deadline and srv.proc.poll() is None, srv.log()
        try:
            health = httpx.get(f"{srv.url}/health", timeout=5)
            break
        except httpx.TransportError:
            time.sleep(0.02)
    completion = httpx.post(f"{srv.url}{COMP}", json={"prompt": "Hi", "max_tokens": 2}, timeout=10)
    assert health.status_code == 503, health.text
    assert health.json()["error"]["type"] == "service_unavailable_error"
    assert "not ready" in health.json()["error"]["message"]
    assert completion.status_code == 503 and completion.json()["error"]["type"] == \
        "service_unavailable_error"
    assert srv.wait_ready().proc.poll() is None  # and then it serves
    assert httpx.get(f"{srv.url}/health", timeout=5).status_code == 200


# ---- (1) the OpenAI API ---------------------------------------------------------------------
def test_chat_and_completion_non_streaming(server, client, model):
    chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8,
                                          temperature=0)
    assert chat.id.startswith("chatcmpl-") and chat.object == "chat.completion"
    assert chat.model == model
    choice = chat.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    u = chat.usage
    assert u.prompt_tokens > 5 and 0 < u.completion_tokens <= 8
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens

    comp = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert comp.id.startswith("cmpl-") and comp.object == "text_completion"
    assert comp.choices[0].text and comp.choices[0].finish_reason == "length"
    assert comp.usage.completion_tokens == 6 and comp.usage.prompt_tokens == 5
    # A list of token ids is a prompt too, and a list of one string.
    ids = post(server, "/tokenize", {"prompt": PROMPT}).json()["tokens"]
    for prompt in (ids, [PROMPT]):
        again = client.completions.create(model=model, prompt=prompt, max_tokens=6,
                                          temperature=0, extra_body={"ignore_eos": True})
        assert again.choices[0].text == comp.choices[0].text


def test_usage_counts_cached_prompt_tokens(server):
    prompt = list(range(1000, 1040))  # 40 tokens: 2 full blocks of 16 can be cached
    bodies = [post(server, COMP, {"prompt": prompt, "max_tokens": 1}).json() for _ in range(2)]
    cached = [b["usage"]["prompt_tokens_details"]["cached_tokens"] for b in bodies]
    assert cached[1] == 32 and cached[0] in (0, 32)


def test_streaming_equals_non_streaming_greedy(client, model):
    full = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8,
                                          temperature=0)
    chunks = list(client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == full.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert all(c.usage is None for c in chunks[:-1])

    comp = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=8,
                                       temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == comp.choices[0].text


def test_n_seed_and_stop(client, model):
    kw = dict(model=model, prompt="Once upon a time", max_tokens=6, temperature=1.0, seed=1234,
              extra_body={"ignore_eos": True})
    a = client.completions.create(n=2, **kw)
    b = client.completions.create(n=2, **kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert a.usage.completion_tokens == 12  # counted over both choices

    streamed: dict[int, str] = {0: "", 1: ""}
    for chunk in client.completions.create(n=2, stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert [streamed[0], streamed[1]] == [c.text for c in a.choices]

    greedy = client.completions.create(model=model, prompt=PROMPT, max_tokens=8,
                                       temperature=0).choices[0].text
    stop = greedy.strip().split()[1]  # a word in the middle of the greedy answer
    cut = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0,
                                    stop=[stop, "never-there"])
    assert cut.choices[0].finish_reason == "stop"
    assert stop not in cut.choices[0].text and greedy.startswith(cut.choices[0].text)


def test_logprobs(client, model):
    chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        # Greedy: the chosen token is the most likely one.
        assert entry.token == entry.top_logprobs[0].token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert bytes(entry.bytes).decode() == entry.token

    comp = client.completions.create(model=model, prompt=PROMPT, max_tokens=5, temperature=0,
                                     logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == comp.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    assert all(len(top) >= 2 for top in lp.top_logprobs)


def test_max_completion_tokens_models_tokenize(client, model, server):
    chat = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0,
                                          max_completion_tokens=3, max_tokens=50,
                                          extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 3 and chat.choices[0].finish_reason == "length"
    assert client.models.retrieve(model).id == model
    tok = post(server, "/tokenize", {"prompt": PROMPT}).json()
    assert tok["count"] == len(tok["tokens"]) == 5 and tok["max_model_len"] > 1000
    assert post(server, "/detokenize", {"tokens": tok["tokens"]}).json()["prompt"] == PROMPT
    chat_tok = post(server, "/tokenize", {"messages": MESSAGES}).json()
    assert chat_tok["count"] == chat.usage.prompt_tokens


# ---- (2) concurrency ------------------------------------------------------------------------
def test_32_concurrent_streams_match_offline(client, model, default_llm):
    prompts = [f"Question {i}: what is {i} plus {i + 1}? Answer:" for i in range(32)]
    params = SamplingParams(temperature=0, max_tokens=16)
    expected = [o.outputs[0].text for o in default_llm.generate(prompts, params, use_tqdm=False)]

    def stream(prompt: str) -> str:
        chunks = client.completions.create(model=model, prompt=prompt, max_tokens=16,
                                           temperature=0, stream=True)
        return "".join(c.choices[0].text for c in chunks)

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(stream, prompts, timeout=120))
    assert got == expected


# ---- (3) errors -----------------------------------------------------------------------------
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
BAD = {
    "negative temperature": (CHAT, {"messages": MESSAGES, "temperature": -0.5}, 400),
    "top_p above 1": (CHAT, {"messages": MESSAGES, "top_p": 1.5}, 400),
    "top_p zero": (COMP, {"prompt": "x", "top_p": 0}, 400),
    "messages not a list": (CHAT, {"messages": "hello"}, 400),
    "max_tokens a string": (COMP, {"prompt": "x", "max_tokens": "many"}, 400),
    "max_tokens zero": (COMP, {"prompt": "x", "max_tokens": 0}, 400),
    "n zero": (CHAT, {"messages": MESSAGES, "n": 0}, 400),
    "empty messages": (CHAT, {"messages": []}, 400),
    "unknown role": (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    "image content": (CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400),
    "missing prompt": (COMP, {"max_tokens": 3}, 400),
    "empty prompt list": (COMP, {"prompt": []}, 400),
    "two prompts": (COMP, {"prompt": ["a", "b"]}, 400),
    "token id out of vocab": (COMP, {"prompt": [1, 10**9]}, 400),
    "negative token id": (COMP, {"prompt": [-1]}, 400),
    "empty stop string": (COMP, {"prompt": "x", "stop": [""]}, 400),
    "min_tokens over max_tokens": (COMP, {"prompt": "x", "max_tokens": 2, "min_tokens": 5}, 400),
    "logprobs over 20": (COMP, {"prompt": "x", "logprobs": 21}, 400),
    "top_logprobs without logprobs": (CHAT, {"messages": MESSAGES, "top_logprobs": 2}, 400),
    "stream_options without stream": (
        CHAT, {"messages": MESSAGES, "stream_options": {"include_usage": True}}, 400),
    "presence_penalty out of range": (COMP, {"prompt": "x", "presence_penalty": 3}, 400),
    "not JSON": (COMP, "{not json", 400),
    "JSON array body": (COMP, "[1, 2]", 400),
    "unknown model": (CHAT, {"messages": MESSAGES, "model": "gpt-17"}, 404),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests(server, case):
    path, body, status = BAD[case]
    r = post(server, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == {400: "invalid_request_error", 404: "not_found_error"}[status]
    assert "Traceback" not in r.text


def test_context_length_errors(server, client, model):
    max_len = post(server, "/tokenize", {"prompt": "x"}).json()["max_model_len"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt=PROMPT, max_tokens=max_len)
    assert e.value.body["message"].startswith(
        f"This model's maximum context length is {max_len} tokens. However, you requested "
        f"{max_len + 5} tokens (5 in the prompt, {max_len} in the completion).")
    r = post(server, COMP, {"prompt": [100] * max_len, "max_tokens": 1})
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]


def test_http_errors_keep_the_openai_shape(server):
    r = httpx.get(f"{server.url}/v1/nowhere", headers=server.headers)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(f"{server.url}{COMP}", headers=server.headers)
    assert r.status_code == 405 and "error" in r.json() and r.headers["allow"] == "POST"
    schema = httpx.get(f"{server.url}/openapi.json", headers=server.headers).json()
    responses = schema["paths"][CHAT]["post"]["responses"]
    assert "422" not in responses
    assert {"200", "400", "401", "404", "413", "429", "503"} <= set(responses)


def test_api_key(server, model):
    body = {"model": model, "prompt": "x", "max_tokens": 1}
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"},
                    {"Authorization": f"Basic {KEY}"}):
        r = post(server, COMP, body, headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"]["type"] == "authentication_error"
    assert post(server, COMP, body).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{server.url}/health").status_code == 200  # no key needed
    assert httpx.get(f"{server.url}/metrics").status_code == 200


# ---- (4) client disconnects -----------------------------------------------------------------
def test_disconnects_free_the_engine(server, client, model):
    aborted_before = server.metric("ember:request_aborted_total")
    body = {"model": model, "prompt": PROMPT, "max_tokens": 500, "ignore_eos": True,
            "stream": True}

    def drop_after_two_chunks(_: int) -> int:
        with httpx.Client(timeout=60, headers=server.headers) as http:
            with http.stream("POST", f"{server.url}{COMP}", json=body) as r:
                assert r.status_code == 200
                got = 0
                for line in r.iter_lines():
                    got += line.startswith("data: ")
                    if got == 2:
                        break
        return got

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(drop_after_two_chunks, range(8), timeout=120)) == [2] * 8
    deadline = time.monotonic() + 10.0  # a few engine steps on a slow, loaded CPU
    while True:
        m = server.metrics()
        idle = (m['ember:num_requests_running{model_name="%s"}' % model] == 0
                and m['ember:num_requests_waiting{model_name="%s"}' % model] == 0
                and m['ember:kv_cache_usage_perc{model_name="%s"}' % model] == 0.0)
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert idle, "the engine still holds the dropped requests 10 s after the disconnects"
    aborted = server.metric("ember:request_aborted_total")
    assert aborted - aborted_before == 8
    # A client that leaves is no success.
    assert server.metric("ember:request_success_total", finished_reason="abort") == 0
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 4


def test_metrics_exposed(server):
    names = {k.partition("{")[0] for k in server.metrics()}
    for name in ("ember:time_to_first_token_seconds_count", "ember:inter_token_latency_seconds_count",
                 "ember:e2e_request_latency_seconds_count", "ember:request_queue_time_seconds_count",
                 "ember:num_requests_running", "ember:num_requests_waiting",
                 "ember:kv_cache_usage_perc", "ember:prompt_tokens_total",
                 "ember:generation_tokens_total", "ember:prefix_cache_queries_total",
                 "ember:prefix_cache_hits_total", "ember:request_success_total",
                 "ember:request_aborted_total", "ember:request_errors_total"):
        assert name in names, name
    assert server.metric("ember:request_errors_total", status_code="401") >= 1
    assert server.metric("ember:time_to_first_token_seconds_count") > 0


@pytest.mark.parametrize("mode", [("--max-concurrency", "3"), ("--request-rate", "50")])
def test_bench_serve_measures_a_live_server(server, tmp_path, capsys, mode):
    """`ember bench serve` drives the real server and accounts for every request and token."""
    from ember.cli import main

    out = tmp_path / "serve.json"
    before = server.metric("ember:generation_tokens_total")
    rc = main(["bench", "serve", "--base-url", server.url, "--api-key", KEY, "--num-prompts",
               "6", "--input-len", "12", "--output-len", "5", *mode, "--output-json", str(out)])
    assert rc == 0, capsys.readouterr()
    s = json.loads(out.read_text())
    assert (s["completed"], s["failed"]) == (6, 0)
    assert s["total_input_tokens"] == 6 * 12
    assert s["total_output_tokens"] == 6 * 5  # ignore_eos: exactly --output-len each
    # The server generated what the client counted.
    assert server.metric("ember:generation_tokens_total") - before == 6 * 5
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        p = s[key]
        assert 0 < p["median"] <= p["p90"] <= p["p99"], key
    assert s["e2e_ms"]["median"] > s["ttft_ms"]["median"]
    assert s["output_throughput"] == pytest.approx(30 / s["duration_s"])
    assert "TTFT (ms) p50/p90/p99" in capsys.readouterr().out


def test_bench_serve_reports_failures(server, tmp_path, capsys):
    from ember.cli import main

    rc = main(["bench", "serve", "--base-url", server.url, "--api-key", "wrong", "--model", "m",
               "--num-prompts", "2", "--input-len", "4", "--output-len", "2"])
    assert rc == 1
    out = capsys.readouterr().out
    assert "completed / failed          0 / 2" in out and "HTTP 401" in out


# ---- (5) overload ---------------------------------------------------------------------------
def test_overload_answers_429_promptly(servers):
    srv = servers["small"].wait_ready()
    body = {"prompt": PROMPT, "max_tokens": 4, "ignore_eos": True}
    start = threading.Barrier(40, timeout=60)

    def one(_: int) -> tuple[int, float, dict, str | None]:
        with httpx.Client(timeout=120) as http:
            start.wait()
            t0 = time.monotonic()
            r = http.post(f"{srv.url}{COMP}", json=body)
            return r.status_code, time.monotonic() - t0, r.json(), r.headers.get("retry-after")

    with ThreadPoolExecutor(40) as pool:
        results = list(pool.map(one, range(40), timeout=180))
    ok = [b for s, _, b, _ in results if s == 200]
    refused = [(t, b, retry) for s, t, b, retry in results if s == 429]
    assert len(ok) + len(refused) == 40, [s for s, _, _, _ in results]
    assert len(ok) >= 4 and len(refused) >= 20
    assert all(b["usage"]["completion_tokens"] == 4 for b in ok)
    assert all(b["error"]["type"] == "rate_limit_error" for _, b, _ in refused)
    assert all(retry == "1" for _, _, retry in refused)  # when to come back
    assert max(t for t, _, _ in refused) < 2.0  # refused at once, not after queueing
    # The queue counts requests: n over --max-queued-requests (4) is still one request.
    r = httpx.post(f"{srv.url}{COMP}", json={**body, "n": 5}, timeout=120)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 5
    assert httpx.get(f"{srv.url}/health").status_code == 200


# ---- (6) graceful shutdown ------------------------------------------------------------------
def test_sigterm_finishes_or_fails_in_flight_requests(servers):
    srv = servers["small"].wait_ready()  # --max-num-seqs 2: the third request waits
    short = {"prompt": PROMPT, "max_tokens": 4, "ignore_eos": True}
    long = {"prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True}
    streaming_started = threading.Barrier(3, timeout=60)

    def stream(body: dict) -> str:
        text = ""
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", f"{srv.url}{COMP}", json={**body, "stream": True}) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if text == "":
                        text = "started"
                        streaming_started.wait()
                    if line == "data: [DONE]":
                        return text + "|done"
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        text += "|error:" + chunk["error"]["type"]
        return text

    def plain(body: dict) -> int:
        return httpx.post(f"{srv.url}{COMP}", json=body, timeout=60).status_code

    with ThreadPoolExecutor(4) as pool:
        # The streams first, so that both hold the two running slots before the plain request
        # arrives: submitted together, the plain one could take a slot and leave a stream
        # waiting behind 1000 tokens.
        jobs = [pool.submit(stream, short), pool.submit(stream, long)]
        streaming_started.wait()
        jobs.append(pool.submit(plain, long))
        deadline = time.monotonic() + 10
        # Until the server holds every request its client still waits on (the short one may
        # already be done, the plain one must have arrived).
        while (srv.metric("ember:num_requests_running") + srv.metric("ember:num_requests_waiting")
               < sum(not j.done() for j in jobs) and time.monotonic() < deadline):
            time.sleep(0.05)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        rc = srv.proc.wait(timeout=GRACE + 15)
        elapsed = time.monotonic() - t0
        results = [j.result(timeout=30) for j in jobs]
    assert rc == 0, srv.log()
    assert elapsed < GRACE + 5, elapsed  # the grace period, plus the process's own exit
    assert results[0] == "started|done"  # finished within the grace period
    assert results[1] == "started|error:service_unavailable_error|done"  # aborted, cleanly
    assert results[2] == 503
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{srv.url}/health", timeout=2)


# ---- engine failure (in process, no model) ------------------------------------------------
class _FailingEngine:
    """Just enough of LLMEngine for one request, whose first step raises."""

    config = EngineConfig()
    max_model_len = 64
    tokenizer = token_bytes = None

    class input_processor:  # noqa: N801 (stands for an instance)
        @staticmethod
        def process(prompt: list[int], params: SamplingParams,
                    where: str = "prompt") -> ProcessedRequest:
            return ProcessedRequest(None, prompt, params, params.max_tokens or 1)

    def __init__(self) -> None:
        self.busy = False

    def add_request(self, request_id: str, request: ProcessedRequest) -> None:
        self.busy = True

    def has_unfinished_requests(self) -> bool:
        return self.busy

    def step(self) -> list:
        raise RuntimeError("device lost")

    def get_stats(self) -> EngineStats:
        return EngineStats(0, 0, 1, 1, 0.0, 0, 0, 0)

    def on_failure(self, callback) -> None:
        pass

    def shutdown(self) -> None:
        pass


def test_engine_failure_fails_requests_and_health():
    engine = AsyncLLMEngine(_FailingEngine)  # type: ignore[arg-type]
    engine.start()
    assert engine.wait_ready(10)
    with TestClient(build_app(engine, "m")) as http:
        assert http.get("/health").status_code == 200
        for _ in range(2):  # the failing request, then one refused by the dead engine
            with ThreadPoolExecutor(1) as pool:  # bounded: a hang fails the test
                r = pool.submit(http.post, COMP, json={"prompt": [1, 2], "max_tokens": 1}
                                ).result(timeout=10)
            assert r.status_code == 503
            assert r.json()["error"]["type"] == "service_unavailable_error"
        assert not engine.is_healthy
        health = http.get("/health")
        assert health.status_code == 503
        # What failed stays in the server's log: /health shows no exception to anyone.
        message = health.json()["error"]["message"]
        assert "RuntimeError" not in message and "device lost" not in message
        assert "see the server log" in message


def test_a_serving_engine_freezes_what_start_up_made():
    """`ember serve`'s engine (freeze_gc): the objects alive once the model is loaded leave the
    cyclic collector's generations; an engine that others share (the default) leaves them."""
    import gc

    for freeze in (False, True):
        gc.unfreeze()
        engine = AsyncLLMEngine(_FailingEngine, freeze_gc=freeze)  # type: ignore[arg-type]
        try:
            engine.start()
            assert engine.wait_ready(10)
            assert (gc.get_freeze_count() > 10_000) == freeze
        finally:
            gc.unfreeze()
            engine.shutdown(0)


def test_a_public_address_without_an_api_key_is_warned_about(caplog):
    from ember.server.launch import warn_if_open

    with caplog.at_level("WARNING", logger="ember.server"):
        assert warn_if_open("0.0.0.0", [])
        assert warn_if_open("example.org", [])
    assert "without an API key" in caplog.text
    assert not warn_if_open("127.0.0.1", []) and not warn_if_open("::1", [])
    assert not warn_if_open("localhost", []) and not warn_if_open("0.0.0.0", ["key"])
