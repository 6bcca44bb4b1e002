"""Engine replicas on Ray Serve: a real local Ray cluster (started and stopped here), two
replicas of the default model behind `ember serve --data-parallel-size 2`, real clients."""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from conftest import ONE_THREAD
from server_utils import ServerProcess, free_port

RAY = str(Path(sys.executable).with_name("ray"))
# Ray on loopback alone (a single-node cluster), its token authentication on with a token of
# this test's own (not ~/.ray/auth_token, which a fresh machine lacks), no usage reports.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
WORDS = ("river stone lantern meadow copper whistle orchard harbor velvet thunder maple "
         "garden silver candle forest bridge ember falcon winter quartz").split()


# A driver on the test's cluster, for what only Ray knows: `pids` prints each live engine
# replica's process id by its replica id (the x-ember-replica header); `running N` waits (up to
# argv[3] s) for Ray Serve to report N engine replicas running, and prints their states.
DRIVER = """
import json, sys, time
import ray
from ray import serve
from ray._private.state import state
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
if sys.argv[2] == "pids":
    print(json.dumps({a["Name"].rsplit("#", 1)[1]: a["Pid"]
                      for a in state.actor_table(None).values()
                      if a["Name"].startswith("SERVE_REPLICA::ember#EngineReplica#")
                      and a["State"] == "ALIVE"}))
else:
    deadline = time.monotonic() + float(sys.argv[4])
    while True:
        states = serve.status().applications["ember"].deployments["EngineReplica"].replica_states
        if states.get("RUNNING") == int(sys.argv[3]) or time.monotonic() > deadline:
            break
        time.sleep(1)
    print(json.dumps({str(k): v for k, v in states.items()}))
"""


def _driver(cluster: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", DRIVER, cluster, *args], check=True,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, **RAY_ENV}).stdout
    return json.loads(out.strip().splitlines()[-1])


def _text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A one-node Ray cluster on loopback, stopped (with all it started) at the end."""
    port = free_port()
    env = {**os.environ, **RAY_ENV}
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                    "--num-cpus=4", "--include-dashboard=false", "--disable-usage-stats"],
                   check=True, timeout=180, env=env, capture_output=True)
    yield f"127.0.0.1:{port}"
    subprocess.run([RAY, "stop", "--force"], timeout=120, env=env, capture_output=True)


@pytest.fixture(scope="module")
def replicas(ray_cluster):
    server = ServerProcess(
        "--data-parallel-size", "2", "--replica-threads", "1", "--enforce-eager",
        "--max-model-len", "2048",
        env={**ONE_THREAD, **RAY_ENV, "RAY_ADDRESS": ray_cluster})
    try:
        yield server.wait_ready(timeout=900)
    finally:
        server.stop(timeout=120)


def _chat(server: ServerProcess, content: str, system: str | None = None,
          **extra) -> httpx.Response:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": content}]
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=300,
                   json={"messages": messages, "max_tokens": 8, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r


def _replica_metrics(server: ServerProcess) -> dict[str, dict[str, float]]:
    """replica -> {sample name with labels (less replica): value}"""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        if line.startswith("#") or 'replica="' not in line:
            continue
        name, value = line.rsplit(" ", 1)
        replica = name.split('replica="', 1)[1].split('"', 1)[0]
        out.setdefault(replica, {})[name.replace(f'replica="{replica}"', "")] = float(value)
    return out


def test_openai_client_chats_and_streams(replicas):
    client = OpenAI(base_url=f"{replicas.url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Name three colours."}],
        max_tokens=16, temperature=0)
    assert reply.choices[0].message.content
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Name three colours."}],
            max_tokens=16, temperature=0, stream=True)
        if chunk.choices)
    assert streamed == reply.choices[0].message.content  # greedy: the same on either replica
    # errors are ember's own, in OpenAI's shape
    bad = httpx.post(f"{replicas.url}/v1/chat/completions", json={"messages": []}, timeout=60)
    assert bad.status_code == 400 and "error" in bad.json()


def test_distinct_prompts_use_both_replicas(replicas):
    # Before any conversation fills one replica's share of the prefix tree: prompts with no
    # shared prefix go to the replica that has served the fewest characters, so they alternate.
    served = {_chat(replicas, f"{WORDS[i]} {_text(40, seed=200 + i)}").headers["x-ember-replica"]
              for i in range(8)}
    assert len(served) == 2, served


def test_shared_prefix_stays_on_one_replica(replicas):
    system = _text(360, seed=1)  # a ~430-token system prompt shared by a conversation's turns
    served, usage = [], []
    for i in range(5):
        r = _chat(replicas, f"Question {i}: {_text(6, seed=100 + i)}?", system=system)
        served.append(r.headers["x-ember-replica"])
        usage.append(r.json()["usage"])
    assert len(set(served)) == 1, served
    assert usage[0]["prompt_tokens"] >= 400
    for u in usage[1:]:  # the replica's prefix cache holds the shared part
        assert u["prompt_tokens_details"]["cached_tokens"] >= 0.8 * u["prompt_tokens"], usage


def test_metrics_carry_each_replica_and_the_router(replicas):
    deadline = time.monotonic() + 60
    while len(by_replica := _replica_metrics(replicas)) < 2 and time.monotonic() < deadline:
        time.sleep(1)
    assert len(by_replica) == 2
    for samples in by_replica.values():
        assert any(name.startswith("ember:num_requests_running") for name in samples)
    # the ingress's router: a second turn goes by its shared prefix, a GET by load
    system = _text(100, seed=3)
    for question in ("Why?", "How?"):
        _chat(replicas, question, system=system)
    httpx.get(f"{replicas.url}/v1/models", timeout=30)
    text = httpx.get(f"{replicas.url}/metrics", timeout=30).text
    decisions = {d: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                 for d in ("cache_affine", "load_balanced")
                 if line.startswith(f'ember:router_decisions_total{{decision="{d}"}}')}
    assert decisions.get("cache_affine", 0) >= 1 and decisions.get("load_balanced", 0) >= 1, \
        decisions


def test_bench_conversations_stay_on_the_replica_caching_them(replicas, tmp_path, capsys):
    """`ember bench serve --workload multi-turn` against the replicas: each conversation's
    turns resend its history, so the router keeps it on one replica, whose cache holds it."""
    from ember.cli import main

    out = tmp_path / "multi_turn.json"
    rc = main(["bench", "serve", "--base-url", replicas.url, "--workload", "multi-turn",
               "--conversations", "2", "--turns", "3", "--system-words", "150",
               "--turn-words", "10", "--output-len", "4", "--output-json", str(out)])
    assert rc == 0, capsys.readouterr()
    s = json.loads(out.read_text())
    assert (s["completed"], s["failed"], s["num_prompts"]) == (6, 0, 6)
    assert s["total_output_tokens"] == 6 * 4
    assert s["replicas_per_conversation"] == [1, 1]
    # turns 2 and 3 of each find all but their newest question and answer cached
    assert s["cached_token_share"] >= 0.5, s
    assert s["ttft_later_turns_ms"]["median"] > 0
    assert "prompt tokens cached" in capsys.readouterr().out


def _prompt_on_each_replica(server: ServerProcess) -> dict[str, str]:
    """replica -> a prompt it has served (its prefix cache, and the router, know it). Prompts
    with no shared prefix go to the replica whose cache holds least, so new ones reach both."""
    prompts: dict[str, str] = {}
    for i in range(30):
        prompt = f"{WORDS[i % len(WORDS)]} {_text(200, seed=900 + i)}"
        prompts.setdefault(_chat(server, prompt, max_tokens=1).headers["x-ember-replica"], prompt)
        if len(prompts) == 2:
            return prompts
    raise AssertionError(f"distinct prompts reached only {prompts.keys()}")


def _sample(samples: dict[str, float], name: str) -> float:
    """The sum of a metric's samples (0 when it has none)."""
    return sum(v for k, v in samples.items() if k.partition("{")[0] == name)


def _running(server: ServerProcess, replica: str) -> float:
    return _sample(_replica_metrics(server).get(replica, {}), "ember:num_requests_running")


@dataclass
class _Call:
    """One chat request run on its own thread, its stream read as it comes."""

    server: ServerProcess
    prompt: str
    stream: bool
    max_tokens: int
    status: int = 0
    replica: str | None = None
    body: str = ""
    started: threading.Event = field(default_factory=threading.Event)  # the first token came
    thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        body = {"messages": [{"role": "user", "content": self.prompt}], "stream": self.stream,
                "max_tokens": self.max_tokens, "ignore_eos": True, "temperature": 0}
        try:
            with httpx.stream("POST", f"{self.server.url}/v1/chat/completions", json=body,
                              timeout=300) as r:
                self.status, self.replica = r.status_code, r.headers.get("x-ember-replica")
                for chunk in r.iter_text():
                    self.body += chunk
                    if '"content"' in self.body:
                        self.started.set()
        finally:
            self.started.set()

    def events(self) -> list[dict]:
        return [json.loads(line[6:]) for line in self.body.splitlines()
                if line.startswith("data: {")]


def test_a_client_that_leaves_aborts_its_request_on_the_replica(replicas):
    with httpx.stream("POST", f"{replicas.url}/v1/chat/completions", timeout=300, json={
            "messages": [{"role": "user", "content": _text(30, seed=7)}], "stream": True,
            "max_tokens": 1500, "ignore_eos": True}) as r:
        replica = r.headers["x-ember-replica"]
        for chunk in r.iter_text():
            if '"content"' in chunk:
                break  # it generates: leave
    # the replica aborts it: nothing runs, and no KV block stays held
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        samples = _replica_metrics(replicas)[replica]
        if (_sample(samples, "ember:request_aborted_total") >= 1
                and _sample(samples, "ember:kv_cache_usage_perc") == 0
                and _sample(samples, "ember:num_requests_running") == 0):
            break
        time.sleep(1)
    else:
        raise AssertionError(f"the request still runs on {replica}: {samples}")


def test_a_killed_replica_fails_its_requests_others_complete_and_ray_restores_it(
        replicas, ray_cluster):
    prompts = _prompt_on_each_replica(replicas)  # the router sends their followers alike
    pids = _driver(ray_cluster, "pids")
    assert set(pids) == set(prompts), (pids, prompts)
    victim, survivor = sorted(prompts)
    # In flight on the victim: 2 streams and 2 plain requests, too long to end by themselves;
    # on the survivor: one of each, which must finish.
    doomed = [_Call(replicas, f"{prompts[victim]} Part {i}.", stream=i < 2, max_tokens=1500)
              for i in range(4)]
    spared = [_Call(replicas, f"{prompts[survivor]} Part {i}.", stream=i == 0, max_tokens=96)
              for i in range(2)]
    for call in doomed[:2]:
        assert call.started.wait(120) and call.replica == victim, (call.replica, call.body)
    deadline = time.monotonic() + 60  # all four run (the metrics are a few seconds old)
    while _running(replicas, victim) < 4:
        assert time.monotonic() < deadline, _replica_metrics(replicas)
        time.sleep(0.5)
    os.kill(pids[victim], signal.SIGKILL)
    killed_at = time.monotonic()
    for call in doomed + spared:
        call.thread.join(300)
        assert not call.thread.is_alive()
    for call in doomed[:2]:  # streams begun: a terminal error event, then [DONE]
        assert call.status == 200 and call.body.rstrip().endswith("data: [DONE]"), call.body
        error = call.events()[-1]["error"]
        assert error["code"] == 503 and error["type"] == "service_unavailable_error", error
        assert not any(c["choices"][0]["finish_reason"] for c in call.events()[:-1]
                       if c.get("choices"))
    for call in doomed[2:]:  # answers not begun: 503
        assert call.status == 503, (call.status, call.body)
        assert json.loads(call.body)["error"]["code"] == "replica_unavailable"
    for call in spared:
        assert call.status == 200 and call.replica == survivor, (call.status, call.body)
    assert spared[0].events()[-1]["choices"][0]["finish_reason"] == "length"
    assert json.loads(spared[1].body)["usage"]["completion_tokens"] == 96
    # the endpoint answers again within 60 s, and Ray Serve replaces the replica
    while (r := httpx.post(f"{replicas.url}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2})
           ).status_code != 200:
        assert time.monotonic() - killed_at < 60, r.text
        time.sleep(0.5)
    assert r.headers["x-ember-replica"] != victim
    states = _driver(ray_cluster, "running", "2", "240")
    assert states.get("RUNNING") == 2, states
    assert victim not in _driver(ray_cluster, "pids")
