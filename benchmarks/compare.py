"""ember beside llama.cpp and transformers on this machine, in one run, on the default GGUF.

    make compare            # builds the llama.cpp peer once (benchmarks/peers/), then this
    .venv/bin/python benchmarks/compare.py [--threads 2] [--repeats 5] [--concurrency 1 4 16 64]

0. Start-up: `ember serve` until healthy, first with an empty compile cache, then again
   (measured first, while this process holds no model).
1. Single stream, in this process, alternating engines within each repetition (so a noisy
   machine hurts all alike): a random --prompt-len-token prompt (the same ids for all), TTFT
   (prefill + first token), then --decode-len greedy tokens, ms/token median. ember runs its
   default mode (the GGUF's own int4 weights, bf16 activations where the CPU has them,
   compiled layers); llama.cpp through llama-cpp-python (the same file, --threads threads);
   transformers in float32 (its GGUF loader dequantizes).
2. Roofline: the bytes of weights one ember decode step reads, the machine's read bandwidth
   (a torch reduction over 1 GiB), and the fraction of the bound ember's decode reaches.
3. Concurrency sweep over the OpenAI protocol (`ember bench serve`'s client): `ember serve`
   against llama.cpp's llama-server with as many parallel slots as concurrent streams, at each
   of --concurrency; TTFT, decode ms/token (TPOT) and aggregate output tokens/s.

Medians and ratios are printed; everything goes to benchmarks/results/compare.json and the
plot to benchmarks/results/compare.png.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from tqdm.auto import tqdm

from ember.cpuinfo import cpu_model

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / ".peers"
LLAMA_BIN = PEERS / "llama.cpp-build" / "bin"
RESULTS = ROOT / "benchmarks" / "results"


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ---- single stream engines ------------------------------------------------------------------
class Ember:
    name = "ember"

    def __init__(self, threads: int, gguf: Path) -> None:
        from ember.config import EngineConfig
        from ember.engine.llm_engine import LLMEngine

        self.engine = LLMEngine(EngineConfig(model=str(gguf), kv_cache_memory=200_000_000))
        self.mode = f"{self.engine.quantization}, {str(self.engine.dtype).removeprefix('torch.')}"

    def run(self, prompt: list[int], n: int) -> tuple[float, list[float]]:
        from ember.bench.latency import run_prompt

        return run_prompt(self.engine, prompt, n)


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self, threads: int, gguf: Path, n_ctx: int) -> None:
        os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(LLAMA_BIN))
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads,
                         n_ctx=n_ctx, n_batch=512, verbose=False)
        self.mode = f"{gguf.name.rsplit('.', 2)[-2]} GGUF as is"

    def run(self, prompt: list[int], n: int) -> tuple[float, list[float]]:
        times = []
        start = time.perf_counter()
        for i, _ in enumerate(self.llm.generate(prompt, temp=0.0, top_k=1, reset=True)):
            times.append(time.perf_counter())
            if i + 1 == n:
                break
        return times[0] - start, [b - a for a, b in zip(times, times[1:])]


class Transformers:
    name = "transformers"

    def __init__(self, threads: int, gguf: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
        self.mode = "float32 (dequantized)"

    @torch.inference_mode()
    def run(self, prompt: list[int], n: int) -> tuple[float, list[float]]:
        from transformers import DynamicCache

        cache = DynamicCache()
        ids = torch.tensor([prompt])
        times = []
        start = time.perf_counter()
        for _ in range(n):
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True)
            ids = out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter())
        return times[0] - start, [b - a for a, b in zip(times, times[1:])]


def single_stream(args, gguf: Path, vocab: int) -> dict:
    engines = [Ember(args.threads, gguf)]
    if not args.skip_llama_cpp:
        engines.append(LlamaCpp(args.threads, gguf, args.prompt_len + args.decode_len + 16))
    if not args.skip_transformers:
        engines.append(Transformers(args.threads, gguf))
    rng = random.Random(args.seed)
    ttft = {e.name: [] for e in engines}
    itl = {e.name: [] for e in engines}
    reps = args.repeats + 1  # the first is a warm-up for every engine
    for rep in tqdm(range(reps), desc="single stream (reps)"):
        prompt = [rng.randrange(100, vocab) for _ in range(args.prompt_len)]
        order = engines if rep % 2 == 0 else engines[::-1]  # alternate who goes first
        for e in order:
            n = args.decode_len if e.name != "transformers" else min(args.decode_len, 64)
            t, steps = e.run(prompt, n)
            if rep > 0:
                ttft[e.name].append(t)
                itl[e.name].append(median(steps))
            gc.collect()
    out = {}
    for e in engines:
        ms = median(itl[e.name]) * 1e3
        out[e.name] = {"mode": e.mode, "ttft_ms": median(ttft[e.name]) * 1e3,
                       "decode_ms_per_token": ms, "decode_tokens_per_s": 1e3 / ms,
                       "ttft_ms_runs": [x * 1e3 for x in ttft[e.name]],
                       "decode_ms_per_token_runs": [x * 1e3 for x in itl[e.name]]}
    out["_ember"] = engines[0]
    return out


# ---- roofline -------------------------------------------------------------------------------
def read_bandwidth_gbs(repeats: int = 7) -> float:
    """GB/s of a multi-threaded read: sum over a 1 GiB float32 tensor (far beyond the caches)."""
    x = torch.ones(1 << 28)
    x.sum()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / min(times) / 1e9


def roofline(engine, decode_tokens_per_s: float) -> dict:
    from ember.quantization import weight_bytes
    from ember.quantization.q8_0 import Q8_0Linear

    model = engine.model
    # Not read by a single-stream decode step: the rotary tables (one row each), the int4
    # layers' second copy of their scales (only for 16+ rows) and, when the head reads its
    # Q8_0 codes, the dense embedding (one row: noise).
    unread = sum(b.numel() * b.element_size() for name, b in model.named_buffers()
                 if name.startswith("rotary.") or name.rsplit(".", 1)[-1].startswith("dense_"))
    if isinstance(model.lm_head, Q8_0Linear):
        unread += model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    per_token = weight_bytes(model) - unread
    bw = read_bandwidth_gbs()
    achieved = per_token * decode_tokens_per_s / 1e9
    return {"weight_bytes_per_token": per_token, "read_bandwidth_gb_s": bw,
            "bound_tokens_per_s": bw * 1e9 / per_token, "achieved_gb_s": achieved,
            "fraction_of_bound": achieved / bw}


# ---- servers --------------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, cmd: list[str], port: int, env: dict | None = None) -> None:
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log", delete=False)
        self.start = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 600) -> float:
        """Seconds from launch to a healthy answer."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"{self.name} exited with {self.proc.returncode}: see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.perf_counter() - self.start
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        sys.exit(f"{self.name} not ready in {timeout} s: see {self.log.name}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def ember_server(threads: int, max_seqs: int, cache_dir: str, gguf: Path) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "ember", "serve", "--model", str(gguf), "--port", str(port),
           "--max-num-seqs", str(max_seqs), "--uvicorn-log-level", "warning"]
    return Server("ember", cmd, port, {"OMP_NUM_THREADS": str(threads),
                                       "TORCHINDUCTOR_CACHE_DIR": cache_dir})


def llama_server(threads: int, slots: int, gguf: Path, per_slot_ctx: int) -> Server:
    port = free_port()
    cmd = [str(LLAMA_BIN / "llama-server"), "-m", str(gguf), "--port", str(port),
           "-t", str(threads), "-tb", str(threads), "-np", str(slots),
           "-c", str(slots * per_slot_ctx), "--no-webui"]
    return Server("llama.cpp", cmd, port, {"LD_LIBRARY_PATH": str(LLAMA_BIN)})


def startup(args, gguf: Path) -> dict:
    """`ember serve` to healthy: a first start (empty compile cache), then a second."""
    cache = tempfile.mkdtemp(prefix="ember-inductor-")
    times = []
    try:
        for _ in range(2):
            s = ember_server(args.threads, 8, cache, gguf)
            times.append(s.wait_ready())
            s.stop()
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return {"first_start_s": times[0], "second_start_s": times[1]}


def sweep(args, gguf: Path, vocab: int) -> dict:
    from ember.bench.serve import BenchConfig, run

    per_slot = args.sweep_input_len + args.sweep_output_len + 32
    cache = str(Path.home() / ".cache" / "ember" / "torchinductor")
    ember = ember_server(args.threads, max(args.concurrency), cache, gguf)
    ember.wait_ready()
    results: dict = {"ember": {}, "llama.cpp": {}}
    try:
        for c in tqdm(args.concurrency, desc="concurrency sweep"):
            servers = [ember]
            if not args.skip_llama_cpp:
                llama = llama_server(args.threads, c, gguf, per_slot)
                llama.wait_ready()
                servers.append(llama)
            for s in servers:
                cfg = BenchConfig(base_url=s.url, model=None, num_prompts=max(4, 2 * c),
                                  input_len=args.sweep_input_len,
                                  output_len=args.sweep_output_len, max_concurrency=c,
                                  request_rate=float("inf"), seed=args.seed + c,
                                  vocab_high=vocab)
                r = run(cfg, progress=False)
                if r["failed"]:
                    sys.exit(f"{s.name} failed requests at concurrency {c}: {r['errors']}")
                results[s.name][str(c)] = {
                    "ttft_ms": r["ttft_ms"]["median"], "tpot_ms": r["tpot_ms"]["median"],
                    "itl_ms_p90": r["itl_ms"]["p90"], "output_tokens_per_s":
                    r["output_throughput"], "requests": r["completed"]}
            if not args.skip_llama_cpp:
                llama.stop()
    finally:
        ember.stop()
    return results


# ---- report ---------------------------------------------------------------------------------
def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sw = result["sweep"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, style in (("ember", "o-"), ("llama.cpp", "s--")):
        if not sw.get(name):
            continue
        cs = sorted(int(c) for c in sw[name])
        for ax, key in zip(axes, ("tpot_ms", "ttft_ms", "output_tokens_per_s")):
            ax.plot(cs, [sw[name][str(c)][key] for c in cs], style, label=name)
    titles = ("decode ms/token (TPOT, median)", "TTFT ms (median)", "aggregate output tokens/s")
    for i, (ax, title) in enumerate(zip(axes, titles)):
        ax.set_xscale("log", base=2)
        if i < 2:  # latencies span orders of magnitude
            ax.set_yscale("log")
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{result['model']}, {result['threads']} CPU threads, "
                 f"prompt {result['sweep_input_len']} / output {result['sweep_output_len']} "
                 "tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="CPU threads of every engine (default: all cores, %(default)s)")
    p.add_argument("--repeats", type=int, default=5,
                   help="single-stream repetitions after one warm-up (default: %(default)s)")
    p.add_argument("--prompt-len", type=int, default=512,
                   help="single-stream prompt tokens (default: %(default)s)")
    p.add_argument("--decode-len", type=int, default=128,
                   help="single-stream generated tokens (transformers: at most 64) "
                   "(default: %(default)s)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64],
                   help="concurrent streams of the sweep (default: %(default)s)")
    p.add_argument("--sweep-input-len", type=int, default=128,
                   help="prompt tokens per sweep request (default: %(default)s)")
    p.add_argument("--sweep-output-len", type=int, default=64,
                   help="output tokens per sweep request (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="of the random prompts")
    p.add_argument("--skip-llama-cpp", action="store_true", help="no llama.cpp peer")
    p.add_argument("--skip-transformers", action="store_true", help="no transformers peer")
    p.add_argument("--skip-sweep", action="store_true", help="no concurrency sweep")
    p.add_argument("--skip-startup", action="store_true", help="no start-up timing")
    p.add_argument("--model", help="a GGUF file with the default model's vocabulary (e.g. from "
                   "benchmarks/gguf_1b.py; default: the default model)")
    p.add_argument("--output", default=str(RESULTS / "compare.json"),
                   help="the JSON result; the plot goes beside it as .png "
                   "(default: %(default)s)")
    args = p.parse_args()
    if not args.skip_llama_cpp and not (LLAMA_BIN / "llama-server").exists():
        sys.exit("the llama.cpp peer is not built: run benchmarks/peers/build_llama_cpp.sh "
                 "(or make compare), or pass --skip-llama-cpp")
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from ember.loading.gguf import default_gguf_path

    gguf = Path(args.model) if args.model else default_gguf_path()
    vocab = 49152 - 1  # SmolLM2's vocabulary; ids from 100 up skip the special tokens
    result: dict = {"command": " ".join(["benchmarks/compare.py", *sys.argv[1:]]),
                    "model": gguf.name,
                    "date": time.strftime("%Y-%m-%d %H:%M"), "threads": args.threads,
                    "cpu": cpu_model(), "torch": torch.__version__,
                    "prompt_len": args.prompt_len, "decode_len": args.decode_len,
                    "sweep_input_len": args.sweep_input_len,
                    "sweep_output_len": args.sweep_output_len, "repeats": args.repeats}
    if not args.skip_startup:  # first, while this process holds no model or thread pool
        result["startup"] = startup(args, gguf)
    single = single_stream(args, gguf, vocab)
    ember_engine = single.pop("_ember").engine
    result["single_stream"] = single
    result["roofline"] = roofline(ember_engine, single["ember"]["decode_tokens_per_s"])
    del ember_engine
    gc.collect()
    ratios = {}
    for peer in ("llama.cpp", "transformers"):
        if peer in single:
            ratios[f"decode_tokens_per_s_vs_{peer}"] = (single["ember"]["decode_tokens_per_s"]
                                                        / single[peer]["decode_tokens_per_s"])
            ratios[f"ttft_vs_{peer}"] = single["ember"]["ttft_ms"] / single[peer]["ttft_ms"]
    if not args.skip_sweep:
        result["sweep"] = sweep(args, gguf, vocab)
        sw = result["sweep"]
        for c in args.concurrency:
            if str(c) in sw.get("llama.cpp", {}):
                ratios[f"aggregate_tokens_per_s_vs_llama.cpp_at_{c}"] = (
                    sw["ember"][str(c)]["output_tokens_per_s"]
                    / sw["llama.cpp"][str(c)]["output_tokens_per_s"])
    result["ratios"] = ratios
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if "sweep" in result:
        plot(result, out.with_suffix(".png"))
    print(report(result))
    return 0


def report(r: dict) -> str:
    lines = [f"single stream, {r['prompt_len']}-token prompt, {r['threads']} threads, "
             f"medians of {r['repeats']}:"]
    for name, s in r["single_stream"].items():
        lines.append(f"  {name:<13} {s['mode']:<24} TTFT {s['ttft_ms']:8.1f} ms   decode "
                     f"{s['decode_ms_per_token']:6.2f} ms/token ({s['decode_tokens_per_s']:.1f} "
                     "tok/s)")
    rf = r["roofline"]
    lines.append(f"roofline: {rf['weight_bytes_per_token'] / 1e6:.1f} MB of weights per token, "
                 f"read bandwidth {rf['read_bandwidth_gb_s']:.1f} GB/s -> bound "
                 f"{rf['bound_tokens_per_s']:.0f} tok/s; ember reaches "
                 f"{rf['fraction_of_bound']:.0%}")
    if "startup" in r:
        lines.append(f"start-up to healthy: first {r['startup']['first_start_s']:.1f} s, "
                     f"second {r['startup']['second_start_s']:.1f} s")
    for name, by_c in r.get("sweep", {}).items():
        for c, s in by_c.items():
            lines.append(f"  {name:<10} c={c:>3}  TTFT {s['ttft_ms']:8.1f} ms  TPOT "
                         f"{s['tpot_ms']:7.2f} ms  {s['output_tokens_per_s']:7.1f} tok/s")
    lines.extend(f"{k}: {v:.2f}x" for k, v in r["ratios"].items())
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
