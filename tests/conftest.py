"""Shared fixtures: the real default model, and tiny random HF checkpoints written on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# The exactness mode: dense float32 weights (the default runs a GGUF file quantized).
EXACT = {"quantization": "none", "dtype": "float32"}

# `make test` runs test files on several workers: each gets its share of the cores (also the
# processes it starts, through OMP_NUM_THREADS). Torch threads beyond a worker's share wait for
# each other at every op while the other workers hold the cores, which makes tests many times
# slower.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _SHARE = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(_SHARE)
    torch.set_num_threads(_SHARE)


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    from ember.loading.gguf import default_gguf_path

    return default_gguf_path()


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory, gguf_path) -> Path:
    """SmolLM2's tokenizer saved in HF format (tokenizer.json + tokenizer_config.json)."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(out)
    return out


def write_tiny_llama(
    out: Path,
    tokenizer_dir: Path,
    *,
    seed: int = 0,
    num_shards: int = 1,
    **overrides,
) -> Path:
    """A random Llama checkpoint in HF format, with SmolLM2's tokenizer (vocab 49152)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).eval()
    out.mkdir(parents=True, exist_ok=True)
    # Sharding: max_shard_size small enough to split the model into `num_shards` files.
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    shard_size = f"{total // num_shards // 1000 + 1}KB" if num_shards > 1 else "10GB"
    model.save_pretrained(out, max_shard_size=shard_size, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / f).exists():
            (out / f).write_bytes((tokenizer_dir / f).read_bytes())
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, hf_tokenizer_dir) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", hf_tokenizer_dir)


@pytest.fixture(scope="session")
def default_llm():
    """The real default model in the exactness mode, loaded once for the whole session."""
    from ember import LLM

    return LLM(**EXACT)


# ---- the reliability tests' shared server -----------------------------------------------------
REL_KEY = "sk-reliability-test-key"
REL_MAX_MODEL_LEN = 64  # short generations keep the fuzzing fast
# One torch thread: on a shared 2-core machine, two threads that wait for each other at every
# op make a step ten times slower as soon as another process wants a core.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def rel_server():
    """One `ember serve` for the fuzzing, hardening and short soak tests: an API key (from
    EMBER_API_KEY, also needed on /metrics), a short context, a small KV cache, four sequences
    at a time."""
    from server_utils import ServerProcess

    server = ServerProcess("--max-model-len", str(REL_MAX_MODEL_LEN), "--max-num-seqs", "4",
                           "--kv-cache-memory", "30000000", "--metrics-require-key",
                           api_key=REL_KEY, key_in_env=True, env=ONE_THREAD)
    yield server.wait_ready()
    server.stop()


def engine_prefill_logits(engine, ids: list[int]) -> torch.Tensor:
    """Logits at every prompt position, through ember's own model and paged attention."""
    from ember import SamplingParams
    from ember.engine.request import Request
    from ember.engine.scheduler import NewRequestData, SchedulerOutput

    req = Request("logits", ids, SamplingParams(), seed=0, max_tokens=1)
    assert engine.block_manager.allocate(req, len(ids))
    runner = engine.runner
    sched = SchedulerOutput(
        scheduled_new_reqs=[NewRequestData.from_request(req)],
        num_scheduled_tokens={req.request_id: len(ids)},
        num_touched_blocks=engine.block_manager.num_touched_blocks)
    try:
        runner._update_states(sched)
        runner.prepare_blocks(sched.num_touched_blocks)
        step, _ = runner._prepare(sched)
        with torch.inference_mode():
            hidden = runner.model(step.input_ids, step.positions, runner.kv_caches, step.attn)
            return runner.model.compute_logits(hidden)
    finally:
        runner.requests.pop(req.request_id, None)
        engine.block_manager.free_request(req)


# The longest test files first: `make test` hands whole files to two workers in this order
# (`--no-loadscope-reorder`: xdist would otherwise start the files with the most tests first),
# and a long file started last would leave one worker idle while it runs.
SLOW_FILES = ("test_spec_decode.py", "test_serving_ray.py", "test_engine.py",
              "test_correctness.py", "test_server_fuzz.py", "test_determinism.py",
              "test_tensor_parallel.py", "test_structured_server.py", "test_generation.py",
              "test_gemma3.py", "test_fused_decode.py", "test_gguf_tokenizers.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))
