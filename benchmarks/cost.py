"""What a million output tokens cost: ember beside llama.cpp and transformers, in one run,
on the default model (SmolLM2-135M-Instruct Q4_1 GGUF), at 1 and 16 concurrent streams.

    .venv/bin/python benchmarks/cost.py [--threads 2] [--streams 1 16]

Every engine is measured the same way, from the outside: the CPU time of the process that
serves (`ember serve` and llama.cpp's `llama-server`, loaded over the OpenAI protocol by
`ember bench serve`'s client; transformers' batched `generate` in a child process) and the
wall time of the run, then
  energy  = CPU seconds x --watts-per-core (the estimate ember makes where RAPL is unreadable),
  dollars = wall seconds x --price-per-hour (the machine, held for the run),
  carbon  = energy x --carbon-intensity,
with ember's defaults for the three factors (ember.config). ember's own accounting (its
per-request figures, engine/cost.py) is reported beside its outside measurement.

Result: benchmarks/results/cost.json; the table goes to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import LLAMA_BIN, RESULTS, ember_server, llama_server  # noqa: E402

from ember.config import EngineConfig  # noqa: E402
from ember.cpuinfo import cpu_model  # noqa: E402
from ember.engine.cost import CostRates, per_output_token  # noqa: E402

VOCAB = 49152 - 1  # SmolLM2's; prompt ids from 100 up skip the special tokens


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def estimate(cpu: float, wall: float, tokens: int, rates: CostRates) -> dict:
    joules = cpu * rates.watts_per_core
    return {"cpu_seconds": cpu, "wall_seconds": wall,
            **per_output_token(cpu, joules, rates.usd(wall), rates.grams_co2e(joules), tokens,
                               "estimate")}


def served(server, streams: int, args, rates: CostRates) -> dict:
    from ember.bench.serve import BenchConfig, run

    cfg = BenchConfig(base_url=server.url, model=None, num_prompts=args.requests_per_stream
                      * streams, input_len=args.input_len, output_len=args.output_len,
                      max_concurrency=streams, request_rate=float("inf"),
                      seed=args.seed + streams, vocab_high=VOCAB)
    before, start = cpu_seconds(server.proc.pid), time.perf_counter()
    r = run(cfg, progress=False)
    wall, cpu = time.perf_counter() - start, cpu_seconds(server.proc.pid) - before
    if r["failed"]:
        sys.exit(f"{server.name} failed requests at {streams} streams: {r['errors']}")
    result = estimate(cpu, wall, r["total_output_tokens"], rates)
    result["output_tokens_per_s"] = r["output_throughput"]
    if r["cost"] is not None:
        result["own_accounting"] = r["cost"]  # ember's per-request figures, summed
    return result


def transformers_worker(streams: int, args) -> None:
    """In a child process: greedy batched generation, its CPU and wall time as JSON."""
    import torch
    from transformers import AutoModelForCausalLM

    from ember.loading.gguf import default_gguf_path

    torch.set_num_threads(args.threads)
    gguf = default_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32).eval()
    rng = random.Random(args.seed + streams)
    tokens = 0

    def batch() -> torch.Tensor:
        return torch.tensor([[rng.randrange(100, VOCAB) for _ in range(args.input_len)]
                             for _ in range(streams)])

    with torch.inference_mode():
        model.generate(batch(), max_new_tokens=4, do_sample=False)  # warm-up
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(args.requests_per_stream):
            ids = batch()
            out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=args.output_len, min_new_tokens=args.output_len,
                                 do_sample=False, pad_token_id=0)
            tokens += (out.shape[1] - ids.shape[1]) * streams
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    print(json.dumps({"cpu": cpu, "wall": wall, "tokens": tokens}))


def transformers_run(streams: int, args, rates: CostRates) -> dict:
    cmd = [sys.executable, __file__, "--transformers-worker", str(streams),
           "--threads", str(args.threads), "--input-len", str(args.input_len),
           "--output-len", str(args.output_len), "--seed", str(args.seed),
           "--requests-per-stream", str(args.requests_per_stream)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    m = json.loads(out.stdout.strip().splitlines()[-1])
    result = estimate(m["cpu"], m["wall"], m["tokens"], rates)
    result["output_tokens_per_s"] = m["tokens"] / m["wall"]
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="CPU threads of every engine (default: all cores, %(default)s)")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 16],
                   help="concurrent streams (default: %(default)s)")
    p.add_argument("--requests-per-stream", type=int, default=3,
                   help="requests per stream at each concurrency (default: %(default)s)")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=64, help="output tokens per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-llama-cpp", action="store_true")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--transformers-worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--output", default=str(RESULTS / "cost.json"))
    args = p.parse_args()
    if args.transformers_worker is not None:
        transformers_worker(args.transformers_worker, args)
        return 0
    from ember.loading.gguf import default_gguf_path

    rates = CostRates.from_config(EngineConfig())
    gguf = default_gguf_path()
    result: dict = {
        "command": " ".join(["benchmarks/cost.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": platform.processor()
        or platform.machine(), "cpu_model": cpu_model(), "threads": args.threads,
        "load_average_at_start": os.getloadavg()[0],
        "input_len": args.input_len, "output_len": args.output_len,
        "rates": {"watts_per_core": rates.watts_per_core,
                  "price_per_hour": rates.price_per_hour,
                  "carbon_intensity": rates.carbon_intensity},
        "engines": {},
    }
    engines = result["engines"]
    cache = str(Path.home() / ".cache" / "ember" / "torchinductor")
    ember = ember_server(args.threads, max(args.streams), cache, gguf)
    ember.wait_ready()
    try:
        engines["ember"] = {str(s): served(ember, s, args, rates) for s in args.streams}
    finally:
        ember.stop()
    if not args.skip_transformers:
        engines["transformers"] = {str(s): transformers_run(s, args, rates)
                                   for s in args.streams}
    # llama.cpp last: the peer may still be building when this starts.
    if not args.skip_llama_cpp and not (LLAMA_BIN / "llama-server").exists():
        result["missing"] = ("llama.cpp: the peer is not built "
                             "(benchmarks/peers/build_llama_cpp.sh, or make compare)")
    elif not args.skip_llama_cpp:
        per_slot = args.input_len + args.output_len + 32
        engines["llama.cpp"] = {}
        try:
            for s in args.streams:
                llama = llama_server(args.threads, s, gguf, per_slot)
                llama.wait_ready()
                try:
                    engines["llama.cpp"][str(s)] = served(llama, s, args, rates)
                finally:
                    llama.stop()
        except SystemExit as e:  # the peer failed: keep the other engines' figures
            result["missing"] = f"llama.cpp: {e}"
    save(result, Path(args.output))
    return 0


def save(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(table(result))


def table(r: dict) -> str:
    lines = ["| engine | streams | output tok/s | CPU-s / token | J / token | $ / Mtoken "
             "| gCO2e / Mtoken |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, by_streams in r["engines"].items():
        for s, x in by_streams.items():
            lines.append(f"| {name} | {s} | {x['output_tokens_per_s']:.1f} | "
                         f"{x['cpu_seconds_per_token']:.4f} | {x['joules_per_token']:.4f} | "
                         f"{x['usd_per_million_tokens']:.2f} | "
                         f"{x['grams_co2e_per_million_tokens']:.0f} |")
            own = x.get("own_accounting")
            if own:
                lines.append(f"| {name} (own accounting) | {s} | | "
                             f"{own['cpu_seconds_per_token']:.4f} | "
                             f"{own['joules_per_token']:.4f} | "
                             f"{own['usd_per_million_tokens']:.2f} | "
                             f"{own['grams_co2e_per_million_tokens']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
