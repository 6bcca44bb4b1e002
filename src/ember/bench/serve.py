"""`ember bench serve`: a load generator for a running OpenAI-compatible server.

It sends `--num-prompts` streaming completions of random token-id prompts (`--input-len`
tokens each, fresh per request, so no prefix cache helps) asking for exactly `--output-len`
tokens (`ignore_eos`), either at a fixed concurrency (`--max-concurrency`) or arriving as a
Poisson process (`--request-rate` requests/s; `inf` sends all at once), and reports, like
`vllm bench serve`:

  TTFT  time to first token (request sent -> first streamed token)
  TPOT  time per output token after the first: (E2E - TTFT) / (output tokens - 1)
  ITL   inter-token latency: the gap between two streamed chunks
  E2E   request latency, sent -> last byte
with median, p90 and p99 of each, request and token throughput over the run, and failures.
Against ember it also reports what an output token cost (the prompts' share included):
joules, CPU seconds, dollars and grams of CO2e, from each stream's closing cost figures
(server/cost.py); `cost` is null for a server that sends none.

It works against any server that speaks /v1/completions with token-id prompts and streaming
(ember, llama.cpp's llama-server, vLLM): `benchmarks/compare.py` drives both with it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from tqdm.auto import tqdm

from ember.engine.cost import format_per_token, per_output_token
from ember.server.cost import parse_cost_comment


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""
    cost: dict[str, float | str] | None = None  # ember's figures for the whole request


@dataclass
class BenchConfig:
    base_url: str
    model: str | None
    num_prompts: int
    input_len: int
    output_len: int
    max_concurrency: int | None
    request_rate: float
    seed: int = 0
    api_key: str | None = None
    vocab_low: int = 100  # random ids from here up: skips special and control tokens
    vocab_high: int = 32000
    timeout: float = 600.0


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="the server's root URL (default: %(default)s)")
    p.add_argument("--model", default=None,
                   help="the model name to send (default: the first of GET /v1/models)")
    p.add_argument("--api-key", default=None, help="sent as a Bearer token")
    p.add_argument("--num-prompts", type=int, default=64,
                   help="requests to send (default: %(default)s)")
    p.add_argument("--input-len", type=int, default=128,
                   help="prompt tokens per request (default: %(default)s)")
    p.add_argument("--output-len", type=int, default=64,
                   help="output tokens per request (default: %(default)s)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="at most this many requests in flight (default: no limit)")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="mean arrivals per second of a Poisson process; inf sends every "
                   "request at once (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="for prompts and arrivals")
    p.add_argument("--vocab-size", type=int, default=32000,
                   help="random prompt ids are drawn below this (default: %(default)s)")
    p.add_argument("--output-json", default=None, help="write the results here as JSON")


def percentiles(xs: list[float], scale: float = 1e3) -> dict[str, float]:
    """median, p90, p99 and mean of `xs` (in ms by default); zeros when empty."""
    if not xs:
        return {"median": 0.0, "p90": 0.0, "p99": 0.0, "mean": 0.0}
    s = sorted(xs)

    def q(p: float) -> float:  # nearest rank
        return s[min(len(s) - 1, max(0, int(round(p / 100 * len(s) + 0.5)) - 1))] * scale

    return {"median": statistics.median(s) * scale, "p90": q(90), "p99": q(99),
            "mean": statistics.fmean(s) * scale}


async def _one(client: httpx.AsyncClient, cfg: BenchConfig, model: str,
               prompt: list[int]) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": cfg.output_len, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    res = RequestResult(ok=False, prompt_len=len(prompt))
    chunks = 0
    usage_tokens = None
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                res.error = f"HTTP {r.status_code}: {r.text[:200]}"
                return res
            async for line in r.aiter_lines():
                cost = parse_cost_comment(line)
                if cost is not None:
                    res.cost = cost
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens")
                choices = event.get("choices") or []
                if not choices or not choices[0].get("text"):
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)
                last = now
                chunks += 1
        res.e2e = time.perf_counter() - start
        res.output_tokens = usage_tokens if usage_tokens is not None else chunks
        res.ok = chunks > 0
        if not res.ok:
            res.error = "no tokens streamed"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def _resolve_model(client: httpx.AsyncClient) -> str:
    r = await client.get("/v1/models")
    r.raise_for_status()
    return r.json()["data"][0]["id"]


async def run_async(cfg: BenchConfig, progress: bool = True) -> dict[str, Any]:
    rng = random.Random(cfg.seed)
    prompts = [[rng.randrange(cfg.vocab_low, cfg.vocab_high) for _ in range(cfg.input_len)]
               for _ in range(cfg.num_prompts)]
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=cfg.base_url, headers=headers, limits=limits,
                                 timeout=cfg.timeout) as client:
        model = cfg.model or await _resolve_model(client)
        gate = asyncio.Semaphore(cfg.max_concurrency or cfg.num_prompts)
        bar = tqdm(total=cfg.num_prompts, desc="bench serve", disable=not progress)

        async def limited(prompt: list[int]) -> RequestResult:
            async with gate:
                r = await _one(client, cfg, model, prompt)
            bar.update(1)
            return r

        tasks = []
        start = time.perf_counter()
        for prompt in prompts:
            tasks.append(asyncio.create_task(limited(prompt)))
            if cfg.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(cfg.request_rate))  # Poisson arrivals
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
    return summarize(cfg, model, results, duration)


def summarize(cfg: BenchConfig, model: str, results: list[RequestResult],
              duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    summary = {
        "base_url": cfg.base_url, "model": model, "num_prompts": cfg.num_prompts,
        "input_len": cfg.input_len, "output_len": cfg.output_len,
        "max_concurrency": cfg.max_concurrency,
        "request_rate": "inf" if cfg.request_rate == float("inf") else cfg.request_rate,
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "ttft_ms": percentiles([r.ttft for r in ok]),
        "tpot_ms": percentiles(tpot),
        "itl_ms": percentiles([x for r in ok for x in r.itl]),
        "e2e_ms": percentiles([r.e2e for r in ok]),
        "cost": None,
    }
    if ok and all(r.cost is not None for r in ok):
        costs = [r.cost for r in ok]

        def total(key: str) -> float:
            return sum(float(c[key]) for c in costs)  # type: ignore[index]

        summary["cost"] = per_output_token(
            total("cpu_seconds"), total("energy_joules"), total("cost_usd"),
            total("carbon_grams"), out_tokens,
            "+".join(sorted({str(c["energy_source"]) for c in costs})))  # type: ignore[index]
    return summary


def run(cfg: BenchConfig, progress: bool = True) -> dict[str, Any]:
    return asyncio.run(run_async(cfg, progress))


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    if args.num_prompts < 1 or args.input_len < 1 or args.output_len < 1:
        raise SystemExit("ember bench serve: --num-prompts, --input-len and --output-len "
                         "must be >= 1")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise SystemExit("ember bench serve: --max-concurrency must be >= 1")
    if not args.request_rate > 0:
        raise SystemExit("ember bench serve: --request-rate must be > 0")
    return BenchConfig(base_url=args.base_url.rstrip("/"), model=args.model,
                       num_prompts=args.num_prompts, input_len=args.input_len,
                       output_len=args.output_len, max_concurrency=args.max_concurrency,
                       request_rate=args.request_rate, seed=args.seed, api_key=args.api_key,
                       vocab_high=args.vocab_size)


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"{'completed / failed':<28}{s['completed']} / {s['failed']}",
             f"{'duration (s)':<28}{s['duration_s']:.2f}",
             f"{'request throughput (req/s)':<28}{s['request_throughput']:.2f}",
             f"{'output throughput (tok/s)':<28}{s['output_throughput']:.1f}",
             f"{'total throughput (tok/s)':<28}{s['total_token_throughput']:.1f}"]
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"),
                      ("e2e_ms", "E2E")):
        p = s[key]
        lines.append(f"{name + ' (ms) p50/p90/p99':<28}"
                     f"{p['median']:.1f} / {p['p90']:.1f} / {p['p99']:.1f}")
    if s["cost"] is not None:
        lines.append(f"{'cost per output token':<28}{format_per_token(s['cost'])}")
    lines.extend(f"error: {e}" for e in s["errors"])
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    try:
        summary = run(config_from_args(args))
    except httpx.HTTPError as e:
        print(f"ember bench serve: {args.base_url}: {e}")
        return 2
    print(format_summary(summary))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if summary["failed"] == 0 else 1

