"""Tensor parallelism on CPU (gloo, several processes on loopback): identical greedy output at
1, 2 and 4 ranks, `ember serve --tensor-parallel-size 2` under the openai SDK, a killed worker,
torchrun, and the refusals."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import write_tiny_llama
from ember import LLM, SamplingParams
from ember.errors import ConfigError
from server_utils import ServerProcess

KV = 20_000_000  # bytes of KV cache per rank: plenty for these tests, quick to allocate
# Mixed lengths, one over max_num_batched_tokens (chunked prefill) and one sharing a prefix.
PROMPT_LENS = [3, 17, 40, 9, 70]


def prompts() -> list[list[int]]:
    ids = [[(1000 + 37 * i + 11 * j) % 40000 for j in range(n)] for i, n in enumerate(PROMPT_LENS)]
    ids.append(ids[2][:30] + [5, 6, 7])
    return ids


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")


@pytest.fixture(scope="module")
def models(tmp_path_factory, hf_tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp")
    paths = {
        # 8 heads over 4 KV heads: split 2 and 4 ways.
        "kv4": write_tiny_llama(root / "kv4", hf_tokenizer_dir, num_attention_heads=8,
                                num_key_value_heads=4, num_hidden_layers=3),
        # 2 KV heads: replicated at 4 ranks; vocabulary 49151 pads to a multiple of 2 and 4.
        "kv2": write_tiny_llama(root / "kv2", hf_tokenizer_dir, seed=1, num_attention_heads=8,
                                num_key_value_heads=2, vocab_size=49151),
    }
    (paths["kv4"] / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return paths


def generate(model: Path, tp: int) -> tuple[list[list[int]], list[float]]:
    llm = LLM(str(model), tensor_parallel_size=tp, kv_cache_memory=KV,
              max_num_batched_tokens=64)
    try:
        outs = llm.generate(prompts(), SamplingParams(temperature=0, max_tokens=24,
                                                      ignore_eos=True), use_tqdm=False)
        workers = [p.pid for p in llm.llm_engine.parallel.procs] if tp > 1 else []
    finally:
        llm.llm_engine.shutdown()
    for pid in workers:  # shut down means gone: no orphan worker
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    return ([o.outputs[0].token_ids for o in outs],
            [o.outputs[0].cumulative_logprob for o in outs])


@pytest.mark.parametrize("name, sizes", [("kv4", (2, 4)), ("kv2", (4,))])
def test_greedy_identical_across_sizes(models, name, sizes):
    ids1, lps1 = generate(models[name], 1)
    for tp in sizes:
        ids, lps = generate(models[name], tp)
        assert ids == ids1, f"tensor_parallel_size={tp}"
        # The all-reduce sums in another order: the logprobs agree closely, not bit for bit.
        assert lps == pytest.approx(lps1, abs=1e-3)


# ---- the server -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(models):
    srv = ServerProcess("--model", str(models["kv4"]), "--tensor-parallel-size", "2",
                        "--kv-cache-memory", str(KV))
    yield srv.wait_ready()
    srv.stop()


def test_serve_tp2_openai_sdk(server, models):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                           timeout=60)
    model = client.models.list().data[0].id
    prompt = "The capital of France is"
    done = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    chunks = client.completions.create(model=model, prompt=prompt, max_tokens=12,
                                       temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == done.choices[0].text
    # The same text as one process on the whole model.
    llm = LLM(str(models["kv4"]), kv_cache_memory=KV)
    ref = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    assert done.choices[0].text == ref[0].outputs[0].text
    messages = [{"role": "user", "content": "Name three colours."}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=8,
                                          temperature=0)
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=8,
                                            temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == chat.choices[0].message.content and text


def test_killed_worker_fails_requests_and_exits_nonzero(server):
    """Runs last on the module's server: it kills it."""
    pid = int(re.search(r"spawned worker rank 1 \(pid (\d+)\)", server.log()).group(1))
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                           timeout=30)
    stream = client.completions.create(model=client.models.list().data[0].id, prompt="Hello",
                                       max_tokens=1000, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))  # generating
    health: list[tuple[float, int | str]] = []

    def probe() -> None:
        while server.proc.poll() is None:
            try:
                status: int | str = httpx.get(f"{server.url}/health", timeout=1).status_code
            except httpx.TransportError:
                status = "gone"
            health.append((time.monotonic(), status))
            time.sleep(0.02)

    start = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    prober = threading.Thread(target=probe)
    prober.start()
    with pytest.raises(openai.APIError, match="worker rank 1"):
        for _ in stream:
            pass
    failed = time.monotonic()
    assert server.proc.wait(10) != 0
    assert time.monotonic() - start < 10
    prober.join()
    # Unhealthy from the moment the request failed: 503, then no server at all.
    assert all(status in (503, "gone") for t, status in health if t > failed), health
    assert "the engine is dead" in server.log()


# ---- torchrun ---------------------------------------------------------------------------------
def test_torchrun_two_ranks(models):
    """The multi-host path (env:// rendezvous), on one host: rank 0 generates, rank 1 serves it."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None
    args = ["-m", "ember", "--log-level", "warning", "generate", "The capital of France is",
            "--model", str(models["kv4"]), "--max-tokens", "12", "--kv-cache-memory", str(KV)]
    out = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", *args,
                          "--tensor-parallel-size", "2"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    ref = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)
    assert out.stdout == ref.stdout and ref.stdout.strip()


# ---- refusals, before any weight is read -------------------------------------------------------
@pytest.fixture(scope="module")
def unreadable_weights(tmp_path_factory, hf_tokenizer_dir) -> Path:
    """12 heads over 4 KV heads, weights truncated: a refusal must come before reading them."""
    path = write_tiny_llama(tmp_path_factory.mktemp("tp") / "h12", hf_tokenizer_dir,
                            vocab_size=512, hidden_size=96, intermediate_size=192,
                            num_attention_heads=12, num_key_value_heads=4)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return path


@pytest.mark.parametrize("tp, message", [
    (8, r"tensor_parallel_size=8 cannot split this model: num_attention_heads=12 is not "
        r"divisible by it; sizes that can: 1, 2, 4, 12"),
    (6, r"tensor_parallel_size=6 cannot split this model: num_key_value_heads=4 can be neither "
        r"split across 6 ranks nor replicated on them"),
])
def test_refuses_unsplittable_heads(unreadable_weights, tp, message):
    with pytest.raises(ConfigError, match=message):
        LLM(str(unreadable_weights), tensor_parallel_size=tp)


def test_refuses_more_ranks_than_cuda_devices(unreadable_weights):
    with pytest.raises(ConfigError, match=r"tensor_parallel_size=2 needs 2 CUDA devices on this "
                       r"host, one per rank, but \d+ (is|are) visible"):
        LLM(str(unreadable_weights), tensor_parallel_size=2, device="cuda",
            distributed_backend="gloo")


@pytest.mark.skipif(__import__("torch").distributed.is_nccl_available(),
                    reason="this PyTorch build has nccl")
def test_refuses_unavailable_backend(unreadable_weights):
    with pytest.raises(ConfigError, match=r"distributed_backend='nccl' is not available in this "
                       r"PyTorch build \(available: gloo"):
        LLM(str(unreadable_weights), tensor_parallel_size=2, distributed_backend="nccl")


def test_refuses_launcher_world_size_mismatch(unreadable_weights, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"the launcher started WORLD_SIZE=2 processes but "
                       r"tensor_parallel_size=1"):
        LLM(str(unreadable_weights))


def test_cli_flags():
    from ember.cli import build_parser

    args = build_parser().parse_args(["serve", "--tensor-parallel-size", "2",
                                      "--distributed-backend", "gloo"])
    assert (args.tensor_parallel_size, args.distributed_backend) == (2, "gloo")
