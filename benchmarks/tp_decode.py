"""Decode latency under tensor parallelism: ms/token at N = 1 and 2 ranks, and what the
communication costs per step.

    PYTHONPATH=src .venv/bin/python benchmarks/tp_decode.py [--model /tmp/ember-bench-1b]

If --model does not exist, a ~1.2B-parameter Llama (TinyLlama-1.1B's shape with SmolLM2's
49152-token vocabulary) with random weights is written there in HF format (float32
safetensors, ~4.7 GB). For each configuration one engine is built; --batch sequences with
32-token prompts are prefilled (not timed), then --decode-steps steps are timed; median of
--repeats. Configurations: N=1 with every core, N=1 with one thread (what one rank's compute
would take alone), N=2 (one thread per rank on this host).

Communication, two ways:
- in the engine (N=2, rank 0): time spent inside the step broadcast, the all-reduces and the
  logits gather per step; it includes waiting for the slower rank;
- bare: two processes that only run the same collectives (one step broadcast, 2 x layers + 1
  all-reduces of [batch, hidden], one logits gather) in a loop.
Writes benchmarks/results/tp_decode.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ember.config import EngineConfig
from ember.cpuinfo import cpu_model
from ember.distributed.parallel_state import TensorParallelGroup
from ember.engine.llm_engine import LLMEngine
from ember.sampling_params import SamplingParams

SHAPE = dict(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)


# ---- the model ---------------------------------------------------------------------------------
def write_random_llama(out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from ember.loading.gguf import default_gguf_path

    out.mkdir(parents=True)
    h, i, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    kv = h // SHAPE["num_attention_heads"] * SHAPE["num_key_value_heads"]
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.02

    weight_map: dict[str, str] = {}

    def save(tensors: dict[str, torch.Tensor], name: str) -> None:
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    save({"model.embed_tokens.weight": rand(v, h), "lm_head.weight": rand(v, h),
          "model.norm.weight": torch.ones(h)}, "model-embed.safetensors")
    for layer in range(SHAPE["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        save({p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
              p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
              p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
              p + "mlp.down_proj.weight": rand(h, i), p + "input_layernorm.weight": torch.ones(h),
              p + "post_attention_layernorm.weight": torch.ones(h)},
             f"model-layer{layer:02d}.safetensors")
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5,
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, **SHAPE}))
    gguf = default_gguf_path()
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)


# ---- decode timing -----------------------------------------------------------------------------
class CommTimer:
    """Rank 0's time inside the collectives of the engine loop (patched in, timed steps only)."""

    def __init__(self) -> None:
        self.seconds = {"broadcast": 0.0, "all_reduce": 0.0, "gather": 0.0}
        self.calls = dict.fromkeys(self.seconds, 0)
        self.last_step = None
        self.active = False
        self._orig = (TensorParallelGroup.broadcast_step, dist.all_reduce, dist.gather)

    def _wrap(self, key: str, fn):
        def timed(*args, **kwargs):
            if not self.active:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - start
                self.calls[key] += 1
        return timed

    def install(self) -> None:
        broadcast, all_reduce, gather = self._orig

        def broadcast_step(group, step):
            if step is not None:
                self.last_step = step
            return broadcast(group, step)

        TensorParallelGroup.broadcast_step = self._wrap("broadcast", broadcast_step)
        dist.all_reduce = self._wrap("all_reduce", all_reduce)
        dist.gather = self._wrap("gather", gather)

    def uninstall(self) -> None:
        TensorParallelGroup.broadcast_step, dist.all_reduce, dist.gather = self._orig


def decode_ms_per_token(engine: LLMEngine, batch: int, prompt_len: int, steps: int,
                        timer: CommTimer | None, rep: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
    for b in range(batch):
        engine.add_request(f"r{rep}-{b}", [(1000 + 97 * rep + 37 * b + j) % 40000
                                           for j in range(prompt_len)], params)
    while engine.scheduler.waiting or any(not r.output_token_ids for r in engine.scheduler.running):
        engine.step()  # prefill, not timed
    if timer:
        timer.active = True
    start = time.perf_counter()
    n = 0
    while engine.has_unfinished_requests():
        engine.step()
        n += 1
    elapsed = time.perf_counter() - start
    if timer:
        timer.active = False
    return 1000 * elapsed / n


def run_config(args, tp: int, threads: int | None, timer: CommTimer | None) -> dict:
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    engine = LLMEngine(EngineConfig(model=str(args.model), tensor_parallel_size=tp,
                                    max_num_seqs=args.batch, max_model_len=256,
                                    kv_cache_memory=64 << 20))
    try:
        decode_ms_per_token(engine, args.batch, args.prompt_len, 4, None, -1)  # warm-up
        if timer:
            timer.install()
        runs = [decode_ms_per_token(engine, args.batch, args.prompt_len, args.decode_steps,
                                    timer, rep) for rep in range(args.repeats)]
        threads = torch.get_num_threads()  # rank 0's, as the engine set it
    finally:
        if timer:
            timer.uninstall()
        engine.shutdown()
        torch.set_num_threads(saved)
    result = {"tensor_parallel_size": tp, "threads_per_rank": threads,
              "ms_per_token_median": statistics.median(runs), "runs_ms": runs}
    if timer:
        steps = timer.calls["broadcast"]
        result["rank0_in_collectives_ms_per_step"] = {
            k: 1000 * s / steps for k, s in timer.seconds.items()}
        result["rank0_in_collectives_ms_per_step"]["total"] = 1000 * sum(
            timer.seconds.values()) / steps
        result["collective_calls_per_step"] = {k: c / steps for k, c in timer.calls.items()}
    return result


# ---- bare collectives --------------------------------------------------------------------------
def comm_loop(rank: int, store: dist.Store, batch: int, step, iters: int) -> dict | None:
    """Rank 0 and 1 run one decode step's collectives `iters` times; rank 0 reports."""
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    torch.set_num_threads(1)
    h, layers, v = SHAPE["hidden_size"], SHAPE["num_hidden_layers"], SHAPE["vocab_size"]
    x = torch.randn(batch, h)
    logits = torch.randn(batch, v // 2)
    parts = [torch.empty_like(logits) for _ in range(2)] if rank == 0 else None
    seconds = {"broadcast": 0.0, "all_reduce": 0.0, "gather": 0.0}
    for it in range(iters + 5):
        t0 = time.perf_counter()
        dist.broadcast_object_list([step if rank == 0 else None], src=0)
        t1 = time.perf_counter()
        for _ in range(2 * layers + 1):
            dist.all_reduce(x)
        t2 = time.perf_counter()
        dist.gather(logits, parts, dst=0)
        t3 = time.perf_counter()
        if it >= 5:
            for k, dt in zip(seconds, (t1 - t0, t2 - t1, t3 - t2)):
                seconds[k] += dt
    dist.destroy_process_group()
    if rank:
        return None
    per_step = {k: 1000 * s / iters for k, s in seconds.items()}
    per_step["total"] = sum(per_step.values())
    return {"ms_per_step": per_step,
            "all_reduce_us_each": 1000 * per_step["all_reduce"] / (2 * layers + 1),
            "all_reduces_per_step": 2 * layers + 1, "iters": iters}


def bare_comm(args, step) -> dict:
    store = dist.TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=60))
    peer = subprocess.Popen([sys.executable, __file__, "--comm-peer", str(store.port),
                             "--batch", str(args.batch), "--comm-iters", str(args.comm_iters)])
    try:
        return comm_loop(0, store, args.batch, step, args.comm_iters)
    finally:
        peer.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("/tmp/ember-bench-1b"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--comm-iters", type=int, default=100)
    ap.add_argument("--comm-peer", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="benchmarks/results/tp_decode.json")
    args = ap.parse_args()
    if args.comm_peer is not None:  # rank 1 of the bare-collectives loop
        store = dist.TCPStore("127.0.0.1", args.comm_peer, None, is_master=False,
                              timeout=timedelta(seconds=60))
        comm_loop(1, store, args.batch, None, args.comm_iters)
        return
    if not args.model.exists():
        print(f"writing a random {SHAPE} model to {args.model}", flush=True)
        write_random_llama(args.model)
    cores = len(os.sched_getaffinity(0))
    load_before = os.getloadavg()
    results = [run_config(args, 1, None, None), run_config(args, 1, 1, None)]
    timer = CommTimer()
    results.append(run_config(args, 2, None, timer))
    bare = bare_comm(args, timer.last_step)
    h, i = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    kv = h // SHAPE["num_attention_heads"] * SHAPE["num_key_value_heads"]
    params = 2 * SHAPE["vocab_size"] * h + SHAPE["num_hidden_layers"] * (
        2 * h * h + 2 * kv * h + 3 * h * i)
    out = {
        "command": "python benchmarks/tp_decode.py " + " ".join(sys.argv[1:]),
        "model": f"random Llama, {params / 1e9:.2f}B parameters, {SHAPE}",
        "dtype": "float32", "torch": torch.__version__, "cores": cores,
        "cpu": cpu_model(), "backend": "gloo",
        "batch": args.batch, "prompt_len": args.prompt_len, "decode_steps": args.decode_steps,
        "repeats": args.repeats, "results": results, "bare_collectives_tp2": bare,
        # Other work on the host competes for the same cores: 1-minute load averages.
        "load_average_before_after": [load_before[0], os.getloadavg()[0]],
    }
    for r in results:
        print(f"N={r['tensor_parallel_size']} threads/rank={r['threads_per_rank']}: "
              f"{r['ms_per_token_median']:.1f} ms/token")
    print("rank 0 in collectives (N=2), ms/step:", results[-1]["rank0_in_collectives_ms_per_step"])
    print("bare collectives, ms/step:", bare["ms_per_step"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
