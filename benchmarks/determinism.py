"""Batch invariance and its cost: the code of this checkout against an earlier one, in one run.

    .venv/bin/python benchmarks/determinism.py --before /path/to/earlier/checkout [--repeats 2]

For each checkout, alternating, in fresh processes (each with its own kernel build, 2 threads):
- `ember bench latency --input-len 512 --output-len 64`: TTFT of a 512-token prompt and
  single-stream decode ms/token;
- 16 streams: 16 prompts of 64 tokens submitted together to `LLM.generate`, 128 output tokens
  each (EOS ignored): aggregate output tokens/s;
- invariance: 16 prompts of 5 to 600 tokens, greedy and seeded (temperature 1.0), submitted
  together and each alone: how many give the same tokens.
Medians over the repeats. Result: benchmarks/results/determinism.json (with the CPU model).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ember.cpuinfo import cpu_model

RESULTS = Path(__file__).resolve().parent / "results"

# Runs inside the checkout's own ember (PYTHONPATH): prints one JSON line.
STREAMS = r"""
import json, sys, time
from ember import LLM, SamplingParams
llm = LLM()
words = "the a of to in and river lamp stone north quiet harbor".split()
prompts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(48)) for i in range(16)]
sp = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
llm.generate(prompts[:2], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
t = time.perf_counter()
out = llm.generate(prompts, sp, use_tqdm=False)
dt = time.perf_counter() - t
print(json.dumps({"tokens_per_s": sum(len(o.outputs[0].token_ids) for o in out) / dt}))
"""

INVARIANCE = r"""
import json
from ember import LLM, SamplingParams
llm = LLM()
text = ("The keeper climbed the stairs at dusk, trimmed the wick and watched the ships pass "
        "the reef while the tide turned and the gulls settled on the rocks below. ") * 40
words = text.split()
lens = [5, 12, 30, 47, 64, 90, 120, 160, 200, 250, 300, 350, 400, 470, 540, 600]
prompts = [f"Part {i}: " + " ".join(words[i:i + n]) for i, n in enumerate(lens)]
result = {}
for name, sp in [("greedy", SamplingParams(temperature=0, max_tokens=32)),
                 ("seeded", SamplingParams(temperature=1.0, seed=11, max_tokens=32))]:
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    alone = [llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    result[name] = sum(a == b for a, b in zip(together, alone))
result["requests"] = len(prompts)
print(json.dumps(result))
"""


def run(tree: Path, args: list[str], threads: int) -> str:
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, *args], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode != 0:
        sys.exit(f"{tree}: {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def measure(tree: Path, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "latency.json"
        run(tree, ["-m", "ember", "bench", "latency", "--input-len", "512", "--output-len", "64",
                   "--num-iters", "3", "--output-json", str(out)], threads)
        latency = json.loads(out.read_text())
    streams = json.loads(run(tree, ["-c", STREAMS], threads).strip().splitlines()[-1])
    return {"ttft_ms": latency["ttft_ms_median"],
            "decode_ms_per_token": latency["ms_per_token_median"],
            "tokens_per_s_16_streams": streams["tokens_per_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--before", type=Path, required=True, help="the earlier checkout's root")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    trees = {"before": a.before.resolve(), "after": Path(__file__).resolve().parents[1]}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for r in range(a.repeats):
        for name, tree in trees.items():
            runs[name].append(measure(tree, a.threads))
            print(f"repeat {r + 1} {name}: {runs[name][-1]}", flush=True)
    invariance = {name: json.loads(run(tree, ["-c", INVARIANCE], a.threads).strip()
                                   .splitlines()[-1]) for name, tree in trees.items()}
    summary = {name: {key: statistics.median(m[key] for m in ms) for key in ms[0]}
               for name, ms in runs.items()}
    result = {
        "cpu": cpu_model(), "threads": a.threads, "repeats": a.repeats,
        "command": "benchmarks/determinism.py --before <checkout> "
                   f"--repeats {a.repeats} --threads {a.threads}",
        "median": summary, "runs": runs,
        "after_over_before": {key: summary["after"][key] / summary["before"][key]
                              for key in summary["after"]},
        "identical_together_and_alone": invariance,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "determinism.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median", "after_over_before",
                                             "identical_together_and_alone")}, indent=2))


if __name__ == "__main__":
    main()
