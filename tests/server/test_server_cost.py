"""What requests cost, as a real `ember serve` reports it: response headers, a stream's
closing comment, /metrics, `ember bench serve`, and the per-request figures adding up to the
server process's CPU time."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
from conftest import ONE_THREAD

from ember.bench.serve import BenchConfig, run as bench_run
from ember.server.cost import parse_cost_comment
from server_utils import ServerProcess

SOURCES = ("estimate", "rapl")  # a CPU server: RAPL where readable, else the estimate
BODY = {"messages": [{"role": "user", "content": "Count to twenty."}], "max_tokens": 16,
        "temperature": 0}
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@pytest.fixture(scope="module")
def server():
    proc = ServerProcess("--max-model-len", "512", "--kv-cache-memory", "30000000",
                         "--max-num-seqs", "10", "--enforce-eager", env=ONE_THREAD)
    yield proc.wait_ready()
    proc.stop()


def stream(client: httpx.Client, body: dict, path: str = CHAT
           ) -> tuple[httpx.Headers, list[str]]:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        return r.headers, [line for line in r.iter_lines() if line]


def test_headers_and_the_closing_comment(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        r = client.post("/v1/chat/completions", json=BODY)
        assert r.status_code == 200
        h = r.headers
        assert h["x-ember-cost-scope"] == "request"
        assert h["x-ember-energy-source"] in SOURCES
        for name in ("cpu-seconds", "wall-seconds", "energy-joules", "cost-usd",
                     "carbon-grams"):
            assert float(h[f"x-ember-{name}"]) > 0, name
        assert set(r.json()) == {"id", "object", "created", "model", "choices", "usage"}

        headers, lines = stream(client, BODY)
        assert headers["x-ember-cost-scope"] == "first-token"
        first = float(headers["x-ember-cpu-seconds"])
        assert lines[-1] == "data: [DONE]"
        cost = parse_cost_comment(lines[-2])
        assert cost is not None and cost["energy_source"] in SOURCES
        assert cost["cpu_seconds"] > first > 0  # the whole request, beyond its first token
        # Every other line is an ordinary chunk.
        for line in lines[:-2]:
            assert "choices" in json.loads(line.removeprefix("data: "))


def test_fifty_requests_add_up_to_the_process_cpu_time(server):
    """Nothing lost or double-counted: over 50 requests (10 at a time, half of them streamed)
    the per-request CPU seconds add up to within 10% of the server process's CPU time, and
    the Prometheus counters grow by the same amounts."""
    proc = psutil.Process(server.proc.pid)
    cpu_total = server.metric("ember:cpu_seconds_total")
    energy = {s: server.metric("ember:energy_joules_total", source=s) for s in SOURCES}
    per_token = server.metric("ember:cpu_seconds_per_output_token_count")

    def one(i: int) -> float:
        body = {"prompt": f"{i}, {i + 1}, {i + 2},", "max_tokens": 6, "temperature": 0,
                "ignore_eos": True}
        with httpx.Client(base_url=server.url, timeout=300) as client:
            if i % 2:
                _, lines = stream(client, body, COMPLETIONS)
                return float(parse_cost_comment(lines[-2])["cpu_seconds"])
            r = client.post(COMPLETIONS, json=body)
            assert r.status_code == 200
            return float(r.headers["x-ember-cpu-seconds"])

    times = proc.cpu_times()
    before = times.user + times.system
    with ThreadPoolExecutor(10) as pool:
        charged = list(pool.map(one, range(50)))
    times = proc.cpu_times()
    used = times.user + times.system - before
    print(f"charged {sum(charged):.3f} CPU-s to 50 requests; the process used {used:.3f}")
    assert sum(charged) == pytest.approx(used, rel=0.10), (sum(charged), used)

    assert server.metric("ember:cpu_seconds_total") - cpu_total == pytest.approx(
        sum(charged), rel=1e-3)
    grown = {s: server.metric("ember:energy_joules_total", source=s) - energy[s]
             for s in SOURCES}
    assert sum(grown.values()) > 0
    assert server.metric("ember:cpu_seconds_per_output_token_count") - per_token == 50


def test_bench_serve_reports_what_a_token_costs(server):
    summary = bench_run(BenchConfig(base_url=server.url, model=None, num_prompts=4,
                                    input_len=16, output_len=8, max_concurrency=2,
                                    request_rate=float("inf")), progress=False)
    assert summary["completed"] == 4
    cost = summary["cost"]
    assert cost["output_tokens"] == 32 and cost["energy_source"] in SOURCES
    for key in ("joules_per_token", "cpu_seconds_per_token", "usd_per_million_tokens",
                "grams_co2e_per_million_tokens"):
        assert cost[key] > 0, key
