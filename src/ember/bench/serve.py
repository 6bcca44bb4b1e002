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

`--workload multi-turn` is a shared-prefix chat workload instead, for prefix caches and the
routers that keep a conversation where its prefix is cached (`ember serve --data-parallel-size
N --router prefix|pow2`): `--conversations` conversations, each of `--turns` streaming chat
requests sent one after another, every turn resending the whole history (a system prompt of
`--system-words` words, then each earlier question and answer) plus a new question of
`--turn-words` words, `--think-time` seconds (on average) after the previous answer;
`--output-len` tokens per answer. Conversations run side by side (arriving at `--request-rate`,
at most `--max-concurrency` requests in flight). It reports the same figures over all turns,
plus the share of prompt tokens the server found cached
(`usage.prompt_tokens_details.cached_tokens`), TTFT of the turns after the first (those a
prefix cache can serve), and, from ember's `x-ember-replica` header, how many replicas each
conversation visited.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
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
    cached_tokens: int = 0  # of the prompt, found in the server's prefix cache
    turn: int = 0  # multi-turn: which turn of its conversation (0 = the first)
    replica: str | None = None  # ember's x-ember-replica header (engine replicas)
    text: str = ""  # multi-turn: the answer, for the next turn's history


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
    workload: str = "random"  # or "multi-turn"
    conversations: int = 4
    turns: int = 4
    system_words: int = 300
    turn_words: int = 30
    think_time: float = 0.0  # multi-turn: mean seconds between an answer and the next turn


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
    m = p.add_argument_group("multi-turn workload")
    m.add_argument("--workload", choices=("random", "multi-turn"), default="random",
                   help="random: --num-prompts completions of random ids; multi-turn: chat "
                   "conversations resending their growing history (default: %(default)s)")
    m.add_argument("--conversations", type=int, default=4,
                   help="multi-turn: conversations (default: %(default)s)")
    m.add_argument("--turns", type=int, default=4,
                   help="multi-turn: requests per conversation (default: %(default)s)")
    m.add_argument("--system-words", type=int, default=300,
                   help="multi-turn: words of each conversation's system prompt, its shared "
                   "prefix (default: %(default)s)")
    m.add_argument("--turn-words", type=int, default=30,
                   help="multi-turn: words of each new question (default: %(default)s)")
    m.add_argument("--think-time", type=float, default=0.0,
                   help="multi-turn: mean seconds a user takes to send the next turn after an "
                   "answer, exponentially distributed (default: %(default)s: at once)")


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


# Multi-turn prompts are words drawn from these: plain English tokenizes alike everywhere.
WORDS = ("river stone lantern meadow copper whistle orchard harbor velvet thunder maple garden "
         "silver candle forest bridge falcon winter quartz amber valley cloud window basket "
         "engine pepper marble island shadow ladder mirror rocket violet canyon").split()


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


async def _chat_turn(client: httpx.AsyncClient, cfg: BenchConfig, model: str,
                     messages: list[dict[str, str]], turn: int) -> RequestResult:
    """One streaming chat request of a conversation; its answer's text kept for the next."""
    body = {"model": model, "messages": messages, "max_tokens": cfg.output_len,
            "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    res = RequestResult(ok=False, prompt_len=0, turn=turn)
    chunks = 0
    usage: dict[str, Any] | None = None
    parts: list[str] = []
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            res.replica = r.headers.get("x-ember-replica")
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
                if "error" in event:
                    res.error = f"stream error: {str(event['error'])[:200]}"
                    return res
                usage = event.get("usage") or usage
                choices = event.get("choices") or []
                text = choices[0].get("delta", {}).get("content") if choices else None
                if not text:
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)
                last = now
                chunks += 1
                parts.append(text)
        res.e2e = time.perf_counter() - start
        res.text = "".join(parts)
        res.output_tokens = usage["completion_tokens"] if usage else chunks
        res.prompt_len = usage["prompt_tokens"] if usage else 0
        res.cached_tokens = ((usage or {}).get("prompt_tokens_details") or {}).get(
            "cached_tokens") or 0
        res.ok = chunks > 0
        if not res.ok:
            res.error = "no tokens streamed"
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, TypeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def _multi_turn(client: httpx.AsyncClient, cfg: BenchConfig, model: str,
                      rng: random.Random, progress: bool) -> tuple[list[RequestResult], float]:
    """The conversations side by side, each turn after the previous one's answer."""
    gate = asyncio.Semaphore(cfg.max_concurrency or cfg.conversations)
    bar = tqdm(total=cfg.conversations * cfg.turns, desc="bench serve", disable=not progress)
    # every conversation's words drawn up front: the same workload whatever the timing
    scripts = [(_words(rng, cfg.system_words),
                [(_words(rng, cfg.turn_words),
                  rng.expovariate(1 / cfg.think_time) if cfg.think_time > 0 and t else 0.0)
                 for t in range(cfg.turns)])
               for _ in range(cfg.conversations)]

    async def conversation(c: int) -> list[RequestResult]:
        system, questions = scripts[c]
        messages = [{"role": "system", "content": f"Conversation {c}. {system}"}]
        results = []
        for turn, (question, think) in enumerate(questions):
            await asyncio.sleep(think)
            messages.append({"role": "user", "content": question})
            async with gate:
                r = await _chat_turn(client, cfg, model, messages, turn)
            bar.update(1)
            results.append(r)
            if not r.ok:
                break  # the rest of the conversation has no history to send
            messages.append({"role": "assistant", "content": r.text})
        return results

    tasks = []
    start = time.perf_counter()
    for c in range(cfg.conversations):
        tasks.append(asyncio.create_task(conversation(c)))
        if cfg.request_rate != float("inf"):
            await asyncio.sleep(rng.expovariate(cfg.request_rate))
    per_conversation = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    bar.close()
    # by conversation, `turns` each: a conversation cut short counts its unsent turns failed
    results = [r for rs in per_conversation
               for r in rs + [RequestResult(ok=False, prompt_len=0, turn=t,
                                            error="an earlier turn failed")
                              for t in range(len(rs), cfg.turns)]]
    return results, duration


async def _resolve_model(client: httpx.AsyncClient) -> str:
    r = await client.get("/v1/models")
    r.raise_for_status()
    return r.json()["data"][0]["id"]


SPEC_DECODE_COUNTERS = ("spec_decode_num_drafts", "spec_decode_num_draft_tokens",
                        "spec_decode_num_accepted_tokens")


async def _spec_decode_counts(client: httpx.AsyncClient) -> dict[str, float] | None:
    """The server's speculative-decoding counters (its /metrics), or None where it has none
    (no speculation, or /metrics not readable)."""
    try:
        r = await client.get("/metrics")
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(r.text):
        name = family.name.removeprefix("ember:")
        if name in SPEC_DECODE_COUNTERS:
            counts[name] = sum(s.value for s in family.samples if s.name.endswith("_total"))
    return counts if len(counts) == len(SPEC_DECODE_COUNTERS) else None


def spec_decode_summary(before: dict[str, float] | None,
                        after: dict[str, float] | None) -> dict[str, float] | None:
    """Acceptance over the run: accepted / drafted tokens, and the mean accepted length (the
    tokens a verified sequence gained per step: accepted drafts + 1, vLLM's definition)."""
    if before is None or after is None:
        return None
    d = {k: after[k] - before[k] for k in SPEC_DECODE_COUNTERS}
    drafts, tokens = d["spec_decode_num_drafts"], d["spec_decode_num_draft_tokens"]
    accepted = d["spec_decode_num_accepted_tokens"]
    return {"num_drafts": drafts, "num_draft_tokens": tokens, "num_accepted_tokens": accepted,
            "acceptance_rate": accepted / tokens if tokens else 0.0,
            "mean_acceptance_length": 1 + accepted / drafts if drafts else 0.0}


async def run_async(cfg: BenchConfig, progress: bool = True) -> dict[str, Any]:
    rng = random.Random(cfg.seed)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=cfg.base_url, headers=headers, limits=limits,
                                 timeout=cfg.timeout) as client:
        model = cfg.model or await _resolve_model(client)
        spec_before = await _spec_decode_counts(client)
        summary = await _run_workload(client, cfg, model, rng, progress)
        summary["spec_decode"] = spec_decode_summary(spec_before,
                                                     await _spec_decode_counts(client))
    return summary


async def _run_workload(client: httpx.AsyncClient, cfg: BenchConfig, model: str,
                        rng: random.Random, progress: bool) -> dict[str, Any]:
    if cfg.workload == "multi-turn":
        results, duration = await _multi_turn(client, cfg, model, rng, progress)
        return summarize(cfg, model, results, duration)
    prompts = [[rng.randrange(cfg.vocab_low, cfg.vocab_high) for _ in range(cfg.input_len)]
               for _ in range(cfg.num_prompts)]
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
        "spec_decode": None,  # run_async's: from the server's counters
    }
    if cfg.workload == "multi-turn":
        later = [r for r in ok if r.turn > 0]
        by_conversation = [results[i:i + cfg.turns]
                           for i in range(0, cfg.conversations * cfg.turns, cfg.turns)]
        replicas = [len({r.replica for r in rs if r.ok and r.replica})
                    for rs in by_conversation]
        summary.update({
            "workload": "multi-turn", "conversations": cfg.conversations, "turns": cfg.turns,
            "system_words": cfg.system_words, "turn_words": cfg.turn_words,
            "think_time": cfg.think_time,
            "num_prompts": len(results), "input_len": None,
            "total_cached_tokens": sum(r.cached_tokens for r in ok),
            "cached_token_share": sum(r.cached_tokens for r in ok) / max(1, in_tokens),
            "ttft_later_turns_ms": percentiles([r.ttft for r in later]),
            "replicas_per_conversation": replicas if any(replicas) else None,
            "requests_per_replica": dict(sorted(collections.Counter(
                r.replica for r in ok if r.replica).items())) or None,
        })
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
    if min(args.conversations, args.turns, args.turn_words) < 1 or args.system_words < 0 \
            or args.think_time < 0:
        raise SystemExit("ember bench serve: --conversations, --turns and --turn-words must "
                         "be >= 1, --system-words and --think-time >= 0")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise SystemExit("ember bench serve: --max-concurrency must be >= 1")
    if not args.request_rate > 0:
        raise SystemExit("ember bench serve: --request-rate must be > 0")
    return BenchConfig(base_url=args.base_url.rstrip("/"), model=args.model,
                       num_prompts=args.num_prompts, input_len=args.input_len,
                       output_len=args.output_len, max_concurrency=args.max_concurrency,
                       request_rate=args.request_rate, seed=args.seed, api_key=args.api_key,
                       vocab_high=args.vocab_size, workload=args.workload,
                       conversations=args.conversations, turns=args.turns,
                       system_words=args.system_words, turn_words=args.turn_words,
                       think_time=args.think_time)


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
    if s.get("workload") == "multi-turn":
        p = s["ttft_later_turns_ms"]
        lines.append(f"{'TTFT turns 2+ p50/p90/p99':<28}"
                     f"{p['median']:.1f} / {p['p90']:.1f} / {p['p99']:.1f}")
        lines.append(f"{'prompt tokens cached':<28}{100 * s['cached_token_share']:.1f}%")
        if s["replicas_per_conversation"] is not None:
            lines.append(f"{'replicas per conversation':<28}"
                         f"{' '.join(map(str, s['replicas_per_conversation']))}")
    if s["cost"] is not None:
        lines.append(f"{'cost per output token':<28}{format_per_token(s['cost'])}")
    if s.get("spec_decode") is not None:
        sd = s["spec_decode"]
        lines.append(f"{'draft acceptance rate':<28}{100 * sd['acceptance_rate']:.1f}%")
        lines.append(f"{'mean acceptance length':<28}{sd['mean_acceptance_length']:.2f}")
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

