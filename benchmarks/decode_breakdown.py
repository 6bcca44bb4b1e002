"""Where a single-stream decode step's time goes, part by part.

    .venv/bin/python benchmarks/decode_breakdown.py [--prompt-len 512] [--decode-len 128]

Runs greedy requests through an `LLMEngine` (default model and mode) and times, around each
call, the parts of every decode step: the fused decode call (`decode_layers`: token ids to
the final norm), the LM head, the rest of the model's forward (what Python does around them),
the batch description (`ModelRunner._prepare`), the sampler, the runner's remaining work
(sampling metadata) and the engine's (scheduler, detokenizer, outputs). Medians per
repetition (each a fresh random prompt), printed and written to
benchmarks/results/decode_breakdown.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import statistics
import time
from pathlib import Path

import torch

from ember.bench.latency import run_prompt
from ember.config import EngineConfig
from ember.cpuinfo import cpu_model
from ember.engine.llm_engine import LLMEngine

RESULTS = Path(__file__).resolve().parent / "results"


def instrument(engine: LLMEngine) -> dict[str, list[float]]:
    """Wrap the step's parts with timers; returns the dict they append seconds to."""
    times: dict[str, list[float]] = collections.defaultdict(list)

    def timed(obj, name: str, key: str) -> None:
        inner = getattr(obj, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                times[key].append(time.perf_counter() - start)

        setattr(obj, name, wrapper)

    runner = engine.runner
    timed(engine, "step", "step")
    timed(runner, "execute", "execute")
    timed(runner, "_prepare", "prepare")
    timed(runner, "forward", "forward")
    timed(runner.model, "compute_logits", "head")
    timed(runner, "sampler", "sampler")
    if runner.model.fused_decode is not None:
        timed(runner.model, "fused_decode", "decode_layers")
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--decode-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(RESULTS / "decode_breakdown.json"))
    args = p.parse_args()

    engine = LLMEngine(EngineConfig(kv_cache_memory=200_000_000))
    times = instrument(engine)
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    reps = []
    for rep in range(args.repeats + 1):  # the first warms up
        times.clear()
        prompt = [rng.randrange(100, vocab) for _ in range(args.prompt_len)]
        run_prompt(engine, prompt, args.decode_len)
        if rep == 0:
            continue
        # Every list's first entry is the prefill step's; the rest are decode steps.
        ms = {k: statistics.median(v[1:]) * 1e3 for k, v in times.items() if len(v) > 1}
        if "decode_layers" in times:
            ms["decode_layers"] = statistics.median(times["decode_layers"]) * 1e3
        parts = {
            "decode_layers": ms.get("decode_layers", 0.0),
            "head": ms["head"],
            "forward_rest": ms["forward"] - ms.get("decode_layers", 0.0) - ms["head"],
            "prepare": ms["prepare"],
            "sampler": ms["sampler"],
            "runner_rest": ms["execute"] - ms["forward"] - ms["prepare"] - ms["sampler"],
            "engine_rest": ms["step"] - ms["execute"],
            "step": ms["step"],
        }
        reps.append(parts)
        print(f"rep {rep}: " + "  ".join(f"{k} {v:.3f}" for k, v in parts.items()), flush=True)
    median = {k: statistics.median(r[k] for r in reps) for k in reps[0]}
    print("median ms: " + "  ".join(f"{k} {v:.3f}" for k, v in median.items()))
    result = {
        "command": "benchmarks/decode_breakdown.py "
                   f"--prompt-len {args.prompt_len} --decode-len {args.decode_len} "
                   f"--repeats {args.repeats}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "mode": f"{engine.quantization}, {str(engine.dtype).removeprefix('torch.')}",
        "median_ms": median, "repetitions_ms": reps,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
