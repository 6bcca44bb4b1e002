"""Aggregate decode throughput against the number of concurrent sequences.

    .venv/bin/python benchmarks/decode_scaling.py [--model PATH] [--concurrency 1 4 16 64]

For each concurrency N: N requests (32-token prompts) are prefilled, then the decode steps that
follow are timed; tokens/s = N * steps / seconds. Several repetitions, median reported.
Writes benchmarks/results/decode_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ember.config import EngineConfig
from ember.cpuinfo import cpu_model
from ember.engine.llm_engine import LLMEngine
from ember.sampling_params import SamplingParams


def decode_rate(engine: LLMEngine, n: int, prompt_len: int, decode_steps: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=decode_steps + 1, ignore_eos=True)
    for i in range(n):
        engine.add_request(f"r{i}", [(1000 + 37 * i + j) % 40000 for j in range(prompt_len)],
                           params)
    while any(not r.output_token_ids for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # prefill (not timed)
    start = time.perf_counter()
    tokens = 0
    while engine.has_unfinished_requests():
        tokens += sum(1 for _ in engine.step())
    return tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/decode_scaling.json")
    args = ap.parse_args()

    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, max_num_seqs=max(args.concurrency),
                                    max_num_batched_tokens=max(512, args.prompt_len * 16)))
    decode_rate(engine, 2, args.prompt_len, 4)  # warm-up
    results = {}
    with tqdm(total=len(args.concurrency) * args.repeats, desc="benchmark") as bar:
        for n in args.concurrency:
            rates = []
            for _ in range(args.repeats):
                rates.append(decode_rate(engine, n, args.prompt_len, args.decode_steps))
                bar.update(1)
            results[n] = {"tokens_per_s_median": statistics.median(rates), "runs": rates}
    base = results[args.concurrency[0]]["tokens_per_s_median"]
    print(f"{'seqs':>5} {'tok/s':>9} {'x single':>9}")
    for n, r in results.items():
        print(f"{n:>5} {r['tokens_per_s_median']:>9.1f} {r['tokens_per_s_median'] / base:>9.2f}")
    out = {
        "command": "python benchmarks/decode_scaling.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if v is not None),
        "model": args.model or "default (SmolLM2-135M-Instruct Q4_1 GGUF)",
        "dtype": str(engine.dtype), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "prompt_len": args.prompt_len, "decode_steps": args.decode_steps,
        "results": results,
        "ratio_16_vs_1": (results[16]["tokens_per_s_median"] / results[1]["tokens_per_s_median"]
                          if 16 in results and 1 in results else None),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
