"""Hostile and broken input against a live server: each case gets a clear 4xx in OpenAI's
error shape, and the server keeps serving. API keys: every path but /health needs one
(here /metrics too), and no key, right or wrong, reaches the log or the command line.

(test_server.py covers the ordinary bad requests: wrong types and ranges, unknown model,
out-of-vocabulary prompt ids, `logprobs` 21, an empty prompt list, `{not json`.)
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from conftest import REL_KEY, REL_MAX_MODEL_LEN

from ember.config import DEFAULT_MAX_BODY_BYTES
from ember.sampling_params import SamplingParams
from ember.server.page import PAGE_PATHS
from ember.server.protocol import MAX_N

COMP = "/v1/completions"
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hi"}]
VOCAB = 49152  # SmolLM2's


def send(server, path: str, body: bytes | str | dict, headers: dict | None = None,
         method: str = "POST") -> httpx.Response:
    content = json.dumps(body) if isinstance(body, dict) else body
    hdrs = {"Content-Type": "application/json", **server.headers, **(headers or {})}
    return httpx.request(method, f"{server.url}{path}", content=content, headers=hdrs,
                         timeout=60)


def assert_error(r: httpx.Response, status: int, *fragments: str) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    message = error["message"]
    assert "Traceback" not in message and len(message) < 2000
    for fragment in fragments:
        assert fragment in message, message
    return error


@pytest.fixture(scope="module")
def server(rel_server):
    yield rel_server
    # After every hostile request: still serving, nothing left in the engine.
    r = send(rel_server, COMP, {"prompt": "Hello", "max_tokens": 2, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert httpx.get(f"{rel_server.url}/health").status_code == 200
    for gauge in ("running", "waiting", "in_flight"):
        assert rel_server.metric(f"ember:num_requests_{gauge}") == 0
    assert rel_server.metric("ember:kv_cache_usage_perc") == 0


# ---- bodies -------------------------------------------------------------------------------
def raw_exchange(server, head: bytes, body: bytes = b"") -> bytes:
    """Send raw bytes on one connection; return what comes back until the server closes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(head + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_oversized_body_is_refused_unread(server):
    # Declared too large: refused from the headers alone, before any body byte is sent.
    head = (f"POST {COMP} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {REL_KEY}\r\n"
            f"Content-Type: application/json\r\n"
            f"Content-Length: {DEFAULT_MAX_BODY_BYTES + 1}\r\n\r\n").encode()
    reply = raw_exchange(server, head)
    status, _, rest = reply.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 413"), reply[:300]
    error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == "request_too_large" and "bytes" in error["message"]


def test_oversized_chunked_body_is_refused(server):
    # No Content-Length: the limit is counted while reading. Only the last chunk crosses it
    # and nothing follows it (no final empty chunk), so the server has read every byte sent
    # when it answers: its reply arrives whole, never cut by a reset.
    big = json.dumps({"prompt": "x" * (DEFAULT_MAX_BODY_BYTES + 10)}).encode()
    head = (f"POST {COMP} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {REL_KEY}\r\n"
            f"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        s.sendall(head)
        for i in range(0, len(big), 1 << 20):
            part = big[i:i + (1 << 20)]
            s.sendall(b"%x\r\n" % len(part) + part + b"\r\n")
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    status, _, rest = reply.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 413"), reply[:300]
    error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert f"larger than {DEFAULT_MAX_BODY_BYTES} bytes" in error["message"]


def read_response(s: socket.socket) -> tuple[bytes, bytes]:
    """One response's status line and body from a connection that stays open."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536) or b"<closed>"
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += s.recv(65536)
    return head.partition(b"\r\n")[0], body


@pytest.mark.parametrize("path, framing", [
    ("/health", "Transfer-Encoding: chunked"),
    ("/metrics", "Content-Length: 1000000"),
])
def test_a_body_on_a_get_is_not_waited_for(server, path, framing):
    # The client sends part of a body and waits: the server answers at once, from the
    # request line and headers, without reading (or holding) the body.
    head = (f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {REL_KEY}\r\n"
            f"{framing}\r\n\r\n").encode()
    part = b"x" * 65536
    if "chunked" in framing:
        part = b"%x\r\n" % len(part) + part + b"\r\n"  # and no last chunk
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(head + part)
        status, body = read_response(s)
    assert status == b"HTTP/1.1 200 OK", status
    assert path != "/metrics" or b"ember:num_requests_running" in body


def test_a_text_too_long_for_the_context_is_refused_untokenized(server):
    text = "hello world " * 200_000  # 2.4 MB: tokenizing it would take seconds
    t0 = time.monotonic()
    error = assert_error(send(server, COMP, {"prompt": text, "max_tokens": 1}), 400,
                         f"maximum context length is {REL_MAX_MODEL_LEN} tokens")
    assert "characters" in error["message"]
    assert time.monotonic() - t0 < 2.0
    assert_error(send(server, CHAT, {"messages": [{"role": "user", "content": text}]}), 400,
                 "messages")
    assert_error(send(server, "/tokenize", {"prompt": text}), 400, "prompt")


def test_deeply_nested_json(server):
    deep = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"
    assert_error(send(server, COMP, deep), 400, "nested too deeply")
    shallow = '{"prompt": ' + "[" * 50 + "1" + "]" * 50 + "}"  # valid JSON, wrong shape
    assert_error(send(server, COMP, shallow), 400, "prompt")


@pytest.mark.parametrize("body", [
    '{"prompt": "x", "max_tokens": 3',  # truncated
    '{"prompt": "x"} trailing',
    '{"prompt": "x", "temperature": NaN}',
    '{"prompt": "x", "temperature": Infinity}',
    '{"prompt": "x",, }',
    "",
])
def test_malformed_json(server, body):
    assert_error(send(server, COMP, body), 400)


def test_invalid_utf8_and_lone_surrogates(server):
    assert_error(send(server, COMP, b'{"prompt": "caf\xc3\x28 \xff"}'), 400, "UTF-8")
    assert_error(send(server, COMP, '{"prompt": "a \\ud800 b"}'), 400, "surrogate")
    assert_error(send(server, CHAT, '{"messages": [{"role": "user", "content": "\\udfff"}]}'),
                 400, "surrogate")
    r = send(server, COMP, '{"prompt": "emoji \\ud83d\\ude00", "max_tokens": 1}')  # a pair: fine
    assert r.status_code == 200, r.text


def test_strict_types(server):
    # The schema says integer and boolean: "3" and "true" are not, 3.0 is (JSON Schema).
    assert_error(send(server, COMP, {"prompt": "x", "max_tokens": "3"}), 400, "max_tokens")
    assert_error(send(server, COMP, {"prompt": "x", "stream": "true"}), 400, "stream")
    assert_error(send(server, COMP, {"prompt": [1.5]}), 400)
    r = send(server, COMP, {"prompt": [100.0, 200], "max_tokens": 2.0})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 2


def test_many_validation_errors_make_one_short_message(server):
    error = assert_error(send(server, "/detokenize", {"tokens": ["x"] * 100_000}), 400,
                         "more errors")
    assert error["param"] == "tokens.0"


# ---- sampling values ----------------------------------------------------------------------
@pytest.mark.parametrize("n", [MAX_N + 1, 10**6, 2**70])
def test_huge_n(server, n):
    assert_error(send(server, COMP, {"prompt": "x", "n": n}), 400, "n:")


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [10**9, 2**70])
def test_huge_max_tokens(server, field, value):
    path, body = (COMP, {"prompt": "x"}) if field == "max_tokens" else (CHAT, {"messages": MESSAGES})
    assert_error(send(server, path, {**body, field: value}), 400,
                 f"maximum context length is {REL_MAX_MODEL_LEN} tokens")


def test_logprobs_over_the_limit(server):
    top = SamplingParams.MAX_LOGPROBS
    assert_error(send(server, CHAT, {"messages": MESSAGES, "logprobs": True,
                                     "top_logprobs": top + 1}), 400, "top_logprobs")
    assert_error(send(server, COMP, {"prompt": "x", "logprobs": 10**30}), 400, "logprobs")
    r = send(server, COMP, {"prompt": "x", "logprobs": top, "max_tokens": 2})
    assert r.status_code == 200
    assert all(len(t) >= top for t in r.json()["choices"][0]["logprobs"]["top_logprobs"])


def test_thousands_of_stop_strings(server):
    most = SamplingParams.MAX_STOP
    assert_error(send(server, COMP, {"prompt": "x", "stop": ["s"] * 5000}), 400, "stop")
    assert_error(send(server, COMP, {"prompt": "x", "stop_token_ids": [1] * 5000}), 400,
                 "stop_token_ids")
    stops = [f"stop{i}" for i in range(most)]
    r = send(server, COMP, {"prompt": "x", "stop": stops, "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_token_ids_outside_the_vocabulary(server):
    assert_error(send(server, COMP, {"prompt": [VOCAB]}), 400, "outside the vocabulary")
    assert_error(send(server, COMP, {"prompt": [2**70]}), 400, "outside the vocabulary")
    # A stop id the sampler would have to ban (min_tokens) must not reach it.
    assert_error(send(server, COMP, {"prompt": "x", "min_tokens": 2, "max_tokens": 3,
                                     "stop_token_ids": [VOCAB + 5]}), 400, "stop_token_ids")
    assert_error(send(server, "/detokenize", {"tokens": [VOCAB]}), 400, "outside")
    # A huge top_k only disables top-k (it used to overflow the sampler's tensor).
    r = send(server, COMP, {"prompt": "x", "top_k": 2**70, "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_empty_prompts(server):
    assert_error(send(server, COMP, {"prompt": ""}), 400, "prompt")
    assert_error(send(server, COMP, {"prompt": [""]}), 400, "prompt")
    # An empty message still renders the chat template: a valid prompt.
    r = send(server, CHAT, {"messages": [{"role": "user", "content": ""}], "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_prompt_of_exactly_the_context_length(server):
    n = REL_MAX_MODEL_LEN
    # No room left to generate: refused, as vLLM does.
    assert_error(send(server, COMP, {"prompt": [100] * n, "max_tokens": 1}), 400,
                 f"maximum context length is {n} tokens", f"{n} in the prompt")
    assert_error(send(server, COMP, {"prompt": [100] * (n - 1), "max_tokens": 2}), 400,
                 f"requested {n + 1} tokens")
    r = send(server, COMP, {"prompt": [100] * (n - 1), "max_tokens": 1, "ignore_eos": True})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage.pop("prompt_tokens_details")["cached_tokens"] in range(n - 1)
    assert usage == {"prompt_tokens": n - 1, "completion_tokens": 1, "total_tokens": n}
    assert r.json()["choices"][0]["finish_reason"] == "length"


# ---- API keys -----------------------------------------------------------------------------
def test_every_path_but_health_needs_the_key(server):
    """...and the chat page's static files (its API calls need the key)."""
    paths = list(send(server, "/openapi.json", "", method="GET").json()["paths"])
    assert "/metrics" in paths and "/health" in paths
    paths += ["/openapi.json", "/docs", "/redoc", "/no/such/path", "/static/none.js",
              *PAGE_PATHS]
    http = httpx.Client(base_url=server.url, timeout=10)
    for path in paths:
        for method in ("GET", "POST"):
            for auth in ({}, {"Authorization": "Bearer wrong-key"},
                         {"Authorization": f"Basic {REL_KEY}"}, {"Authorization": REL_KEY},
                         {"Authorization": f"Bearer {REL_KEY}x"}):
                r = http.request(method, path, headers=auth)
                if path == "/health" or path in PAGE_PATHS:
                    assert r.status_code in (200, 405), (method, path)
                    continue
                assert r.status_code == 401, (method, path, auth)
                assert r.json()["error"]["code"] == "invalid_api_key"
                assert r.headers["www-authenticate"] == "Bearer"
    ok = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"bearer {REL_KEY}"})
    assert ok.status_code == 200 and "ember:num_requests_running" in ok.text
    assert httpx.get(f"{server.url}/docs", headers=server.headers).status_code == 200


def test_keys_never_logged(server):
    wrong = "sk-wrong-key-that-must-not-be-logged"
    httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {wrong}"})
    httpx.post(f"{server.url}{COMP}", headers={"Authorization": f"Bearer {wrong}"},
               json={"prompt": "x"})
    send(server, COMP, {"prompt": "x", "max_tokens": 1})
    log = server.log()
    assert "401" in log and "Finished request" in log  # the requests were logged...
    assert REL_KEY not in log and wrong not in log  # ...but not the keys
    assert REL_KEY not in " ".join(server.cmd)  # and the key is not on the command line
