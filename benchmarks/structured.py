"""Decode speed with a ~10-field JSON schema vs unconstrained, at 1 and 16 streams, on the
default model (in-process engine), and the schema's compile time.

Each constrained request runs greedy until its JSON document is complete; the unconstrained
run then generates exactly as many tokens per request (ignore_eos), from the same prompts, so
both runs do the same model work and differ only by the grammar: its masks (computed on the
worker thread while the model runs), their application in the sampler, and the matchers'
advance. The result JSON names the CPU.

    PYTHONPATH=src python benchmarks/structured.py [--out benchmarks/results/structured.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from structured_schema import SCHEMA

from ember import LLM, SamplingParams, StructuredOutputsParams
from ember.cpuinfo import cpu_model

PROMPTS = ["a chef", "a pilot", "a teacher", "a nurse", "a programmer", "a farmer", "a poet",
           "a judge", "a baker", "a diver", "a painter", "a doctor", "a sailor", "a miner",
           "a dancer", "a writer"]


def run(llm: LLM, prompts: list, params: list[SamplingParams]) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    return elapsed, [len(o.outputs[0].token_ids) for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/structured.json")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--exact", action="store_true",
                    help="the exactness mode (dense float32) instead of the GGUF default")
    args = ap.parse_args()
    mode = {"quantization": "none", "dtype": "float32"} if args.exact else {}
    llm = LLM(max_model_len=2048, max_num_seqs=16, **mode)
    tok = llm.get_tokenizer()
    prompts = [tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": f"Describe {who} as a JSON user profile."}]),
        add_special_tokens=False) for who in PROMPTS]

    grammars = llm.llm_engine.grammars
    grammars.lltokenizer  # built at start-up, not part of a compile
    so = StructuredOutputsParams(json=SCHEMA)
    t0 = time.perf_counter()
    grammars._compile(so)  # uncached
    compile_ms = (time.perf_counter() - t0) * 1e3

    # Warm-up (compilation of the model's graphs, the grammar cache).
    run(llm, prompts[:2], [SamplingParams(temperature=0, max_tokens=8)] * 2)
    result = {"cpu": cpu_model(), "omp_threads": os.environ.get("OMP_NUM_THREADS"),
              "mode": "exact (dense float32)" if args.exact else "default (GGUF Q4_1)",
              "command": "PYTHONPATH=src python benchmarks/structured.py"
                         + (" --exact" if args.exact else ""),
              "load_average_at_start": os.getloadavg()[0],
              "schema_compile_ms": round(compile_ms, 2), "runs": []}
    for streams in (1, 16):
        batch = prompts[:streams]
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            constrained = [SamplingParams(temperature=0, max_tokens=400,
                                          structured_outputs=so)] * streams
            t_c, lengths = run(llm, batch, constrained)
            free = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
                    for n in lengths]
            t_f, lengths_f = run(llm, batch, free)
            assert lengths_f == lengths
            tokens = sum(lengths)
            best["json_schema"] = max(best.get("json_schema", 0), tokens / t_c)
            best["unconstrained"] = max(best.get("unconstrained", 0), tokens / t_f)
        entry = {"streams": streams, "tokens_per_request": lengths,
                 "tok_s_json_schema": round(best["json_schema"], 1),
                 "tok_s_unconstrained": round(best["unconstrained"], 1),
                 "slowdown_pct": round(100 * (1 - best["json_schema"] / best["unconstrained"]),
                                       1)}
        print(entry, flush=True)
        result["runs"].append(entry)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
