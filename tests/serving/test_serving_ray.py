"""Engine replicas on Ray Serve: a real local Ray cluster (started and stopped here), two
replicas of the default model behind `ember serve --data-parallel-size 2`, real clients."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from conftest import ONE_THREAD
from server_utils import ServerProcess, free_port

RAY = str(Path(sys.executable).with_name("ray"))
# Ray on loopback alone (a single-node cluster), its token authentication on, no usage reports.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token"}
WORDS = ("river stone lantern meadow copper whistle orchard harbor velvet thunder maple "
         "garden silver candle forest bridge ember falcon winter quartz").split()


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


def _chat(server: ServerProcess, content: str, system: str | None = None, **extra) -> httpx.Response:
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


def test_metrics_carry_each_replica(replicas):
    deadline = time.monotonic() + 60
    while len(by_replica := _replica_metrics(replicas)) < 2 and time.monotonic() < deadline:
        time.sleep(1)
    assert len(by_replica) == 2
    for samples in by_replica.values():
        assert any(name.startswith("ember:num_requests_running") for name in samples)
