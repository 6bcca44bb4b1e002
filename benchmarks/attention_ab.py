"""Attention before/after: the code at a git ref against the working tree, alternating.

    .venv/bin/python benchmarks/attention_ab.py --before <ref> [--reps 2]

Each repetition runs, for the code before and then after (each from its own `src/`, in a
process of its own):
- `ember bench latency --input-len 512 --output-len 64 --num-iters 3` on the default model
  (TTFT of a 512-token prompt, decode ms/token);
- the attention alone (`--micro`, one thread and two): a layer's attention over a first chunk
  of 512 tokens (the model's op: K/V written, then attention), and decodes at a context of
  512 for 1 and 16 sequences, SmolLM2-135M's heads (9 query, 3 KV, 64 wide); the best of
  many calls.
Writes benchmarks/results/attention_ab.json (every repetition, the CPU named).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "attention_ab.json"


def micro(threads: int) -> dict:
    """The attention alone, in this process's ember (before: SDPA for a prompt chunk and
    `decode_attention`; after: `cpu_paged_attention` for both)."""
    import torch

    from ember import kernels
    from ember.kernels import ops
    from ember.layers import attention as A

    assert kernels.load()
    torch.set_num_threads(threads)
    new = hasattr(A.AttentionMetadata, "build")
    heads, kv_heads, dim, bs, n = 9, 3, 64, 16, 512
    g = torch.Generator().manual_seed(0)
    k_cache = torch.randn(1280 * bs, kv_heads, dim, generator=g)
    v_cache = torch.randn(1280 * bs, kv_heads, dim, generator=g)

    def best(f, reps: int) -> float:
        f()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return min(times) * 1e3

    q = torch.randn(n, heads, dim, generator=g)
    k = torch.randn(n, kv_heads, dim, generator=g)
    v = torch.randn(n, kv_heads, dim, generator=g)
    slots = torch.arange(n) + 7 * bs
    if new:
        meta = A.AttentionMetadata.build(slots, [n], [n], [list(range(7, 7 + n // bs))], bs)
    else:
        meta = A.AttentionMetadata(slots, None, [A.PrefillChunk(0, n, None, None)])
    out = {"threads": threads}
    with A.attention_metadata(meta):
        out["prefill_512_layer_ms"] = best(
            lambda: A.paged_attention_impl(q, k, v, k_cache, v_cache, 0.125), 30)
    for b in (1, 16):
        tables = torch.arange(b * 40).view(b, 40)
        lens = torch.full((b,), n)
        qd = torch.randn(b, heads, dim, generator=g)
        if new:
            starts = torch.arange(b + 1)
            f = lambda: ops.cpu_paged_attention(qd, k_cache, v_cache, tables, starts, lens, bs,
                                                0.125, 0)
        else:
            f = lambda: ops.decode_attention(qd, k_cache, v_cache, tables, lens, bs, 0.125, 0)
        out[f"decode_{b}_seqs_ctx_512_us"] = best(f, 300) * 1e3
    return out


def run(src: Path, args: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([sys.executable, *args], env=env, check=True, capture_output=True,
                          text=True).stdout


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--before", required=True, help="git ref of the code before")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--micro", type=int, help=argparse.SUPPRESS)  # the child: threads
    a = p.parse_args()
    if a.micro:
        print(json.dumps(micro(a.micro)))
        return
    from ember.cpuinfo import cpu_model

    tmp = Path(tempfile.mkdtemp())
    archive = subprocess.run(["git", "archive", a.before, "src"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    tarfile.open(fileobj=BytesIO(archive)).extractall(tmp / "before")
    trees = {"before": tmp / "before" / "src", "after": ROOT / "src"}
    results: dict[str, list] = {"before": [], "after": []}
    for rep in range(a.reps):
        for name, src in trees.items():
            out = tmp / f"{name}{rep}.json"
            run(src, ["-m", "ember", "bench", "latency", "--input-len", "512", "--output-len",
                      "64", "--num-iters", "3", "--output-json", str(out)])
            latency = json.loads(out.read_text())
            row = {"ttft_ms": latency["ttft_ms_median"],
                   "ms_per_token": latency["ms_per_token_median"],
                   "micro": [json.loads(run(src, [__file__, "--before", a.before, "--micro",
                                                  str(t)])) for t in (1, 2)]}
            results[name].append(row)
            print(name, rep, json.dumps(row), flush=True)
    summary = {name: {"ttft_ms_median": statistics.median(r["ttft_ms"] for r in rows),
                      "ms_per_token_median": statistics.median(r["ms_per_token"] for r in rows)}
               for name, rows in results.items()}
    RESULT.write_text(json.dumps({
        "command": f"benchmarks/attention_ab.py --before {a.before} --reps {a.reps}",
        "cpu": cpu_model(), "before": a.before, "summary": summary, "runs": results,
    }, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
