"""`ember bench latency`: one stream's time to first token and time per output token.

Each iteration sends a fresh random prompt of `--input-len` tokens (so the prefix cache
cannot help), times the step that returns its first token (TTFT: the prefill) and each later
step (one decode token each; with speculative decoding, its time shared by the tokens it
accepted), after `--num-iters-warmup` untimed iterations. With `--speculative-config`, the
draft acceptance rate and mean acceptance length are reported too. The engine's
cost accounting over the timed iterations gives what an output token costs (the prompt's
share included): joules, CPU seconds, dollars and grams of CO2e (engine/cost.py).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import random
import resource
import statistics
import time
import uuid
from typing import Any

import torch
from tqdm.auto import tqdm

from ember.config import EngineConfig
from ember.cpuinfo import cpu_model
from ember.engine.cost import Usage, format_per_token, per_output_token
from ember.engine.spec_decode.metrics import SpecDecodingStats
from ember.sampling_params import SamplingParams


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-len", type=int, default=32, help="prompt tokens (default: %(default)s)")
    p.add_argument("--output-len", type=int, default=128,
                   help="generated tokens per iteration (default: %(default)s)")
    p.add_argument("--num-iters", type=int, default=5, help="timed iterations (default: %(default)s)")
    p.add_argument("--num-iters-warmup", type=int, default=1,
                   help="untimed iterations first (default: %(default)s)")
    p.add_argument("--output-json", default=None, help="write the results here as JSON")


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def one_iteration(engine, rng: random.Random, input_len: int, output_len: int
                  ) -> tuple[float, list[float]]:
    vocab = engine.model_config.vocab_size
    return run_prompt(engine, [rng.randrange(100, vocab) for _ in range(input_len)], output_len)


def run_prompt(engine, prompt: list[int], output_len: int) -> tuple[float, list[float]]:
    """Greedy `output_len` tokens after `prompt`: (TTFT, the time of each later token: a
    step's time shared by the tokens it gave)."""
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    engine.add_request(f"bench-{uuid.uuid4().hex}", prompt, params)
    ttft, itl = None, []
    last = start = time.perf_counter()
    while engine.has_unfinished_requests():
        outs = engine.step()
        if outs:
            now = time.perf_counter()
            if ttft is None:
                ttft = now - start
            else:
                n = len(outs[0].outputs[0].token_ids)
                itl.extend([(now - last) / n] * n)
            last = now
    return ttft, itl


def run(args: argparse.Namespace, config: EngineConfig) -> dict[str, Any]:
    from ember.engine.llm_engine import LLMEngine

    engine = LLMEngine(config)
    rng = random.Random(0)
    ttfts: list[float] = []
    itls: list[float] = []
    total = args.num_iters_warmup + args.num_iters
    used = Usage()
    spec = SpecDecodingStats(engine.scheduler.num_spec_tokens)
    for i in tqdm(range(total), desc="bench latency"):
        before = Usage()
        before.add(engine.cost.total)
        if i == args.num_iters_warmup:
            spec = copy.deepcopy(engine.scheduler.spec_stats)
        ttft, itl = one_iteration(engine, rng, args.input_len, args.output_len)
        if i >= args.num_iters_warmup:
            ttfts.append(ttft)
            itls.extend(itl)
            used.add(engine.cost.total)
            used.add(before, -1.0)
    rates = engine.cost.rates
    ms_per_token = statistics.median(itls) * 1e3
    result = {
        "model": config.model or "default (SmolLM2-135M-Instruct Q4_1 GGUF)",
        "dtype": str(engine.dtype).removeprefix("torch."),
        "quantization": engine.quantization,
        "input_len": args.input_len, "output_len": args.output_len, "num_iters": args.num_iters,
        "ttft_ms_median": statistics.median(ttfts) * 1e3,
        "ms_per_token_median": ms_per_token,
        "ms_per_token_p90": percentile(itls, 90) * 1e3,
        "decode_tokens_per_s": 1e3 / ms_per_token,
        "cost": per_output_token(
            used.cpu_seconds, used.energy_joules, rates.usd(used.wall_seconds),
            rates.grams_co2e(used.energy_joules), args.num_iters * args.output_len,
            "+".join(sorted(used.joules))),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu": cpu_model(),
        "spec_decode": None,
    }
    if config.speculative_config is not None:
        now = engine.scheduler.spec_stats
        drafts = now.num_drafts - spec.num_drafts
        drafted = now.num_draft_tokens - spec.num_draft_tokens
        accepted = now.num_accepted_tokens - spec.num_accepted_tokens
        result["spec_decode"] = {
            "speculative_config": dataclasses.asdict(config.speculative_config),
            "num_drafts": drafts, "num_draft_tokens": drafted, "num_accepted_tokens": accepted,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "mean_acceptance_length": 1 + accepted / drafts if drafts else 0.0}
    return result


def main(args: argparse.Namespace, config: EngineConfig) -> int:
    result = run(args, config)
    print(f"TTFT {result['ttft_ms_median']:.1f} ms ({args.input_len}-token prompt), "
          f"{result['ms_per_token_median']:.2f} ms/token median "
          f"(p90 {result['ms_per_token_p90']:.2f}), {result['decode_tokens_per_s']:.1f} tok/s, "
          f"peak RSS {result['peak_rss_mb']:.0f} MB")
    print(f"cost per output token: {format_per_token(result['cost'])}")
    if result["spec_decode"] is not None:
        sd = result["spec_decode"]
        print(f"draft acceptance rate {100 * sd['acceptance_rate']:.1f}%, mean acceptance "
              f"length {sd['mean_acceptance_length']:.2f}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
