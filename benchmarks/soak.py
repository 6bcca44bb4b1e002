"""Soak: a bounded run of mixed requests against one `ember serve`, then checks that it is idle.

    .venv/bin/python benchmarks/soak.py [--requests 3000] [--duration 300] [--concurrency 32]
    .venv/bin/python benchmarks/soak.py --url http://127.0.0.1:8000 --pid PID [--api-key KEY]

Without --url it starts `ember serve` on a free loopback port (the default model) and stops it
at the end; with --url it drives that server (--pid: its process, for the memory readings).
The run stops after --requests requests or --duration seconds, whichever comes first.

The mix, drawn from --seed: chat and text completions, streaming or not, 1-3 choices, random
sampling values, prompt lengths (mostly short, a fifth up to 200 words) and max_tokens (1-12);
a share of the requests is abandoned by its client (a stream closed after a few events, or a
request given up after a short timeout), a share is invalid on purpose (it must get a 4xx).
Every admitted request must end with a complete response or a clean error: a "lost" request (no
complete answer, no error) and any 5xx fail the run. Afterwards /metrics must come back to
idle: nothing running or waiting, no KV block in use, no request in flight. The server's
resident memory is sampled throughout; its growth from the end of the warm-up (the first tenth
of the requests or of the duration) to the end is reported.

Prints one summary line and writes benchmarks/results/soak.json; exits 1 if the run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil

from ember.cpuinfo import cpu_model

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge "
         "every box of mixed pancakes near the old river bank at dawn").split()
OK, ABORTED, REFUSED = "ok", "aborted by client", "refused (4xx, as expected)"
FAILURES = ("lost", "5xx", "unexpected status")


@dataclass
class Outcome:
    kind: str  # OK, ABORTED, REFUSED or one of FAILURES
    latency: float
    detail: str = ""


@dataclass
class Plan:
    """One request of the mix."""

    path: str
    body: dict
    stream: bool
    abort_after: int | float | None = None  # events (stream) or seconds (not) before giving up
    invalid: bool = False


def make_plan(rng: random.Random, max_model_len: int, model: str) -> Plan:
    chat = rng.random() < 0.5
    stream = rng.random() < 0.5
    longest = max(1, min(200, max_model_len // 8))
    words = rng.randint(1, longest) if rng.random() < 0.2 else rng.randint(1, min(16, longest))
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    body: dict = {"model": model, "max_tokens": rng.randint(1, 12),
                  "n": 1 if rng.random() < 0.8 else rng.randint(2, 3)}
    if rng.random() < 0.3:
        body["temperature"] = 0
    else:
        body["temperature"] = round(rng.uniform(0.1, 1.5), 2)
        body["top_p"] = rng.choice([1.0, 0.9, 0.5])
        body["top_k"] = rng.choice([0, 10, 50])
    if rng.random() < 0.3:
        body["seed"] = rng.randint(0, 2**31)
    if rng.random() < 0.2:
        body["stop"] = [rng.choice(WORDS)]
    if rng.random() < 0.3:
        body["ignore_eos"] = True
    if rng.random() < 0.2:
        body["presence_penalty"] = round(rng.uniform(-1, 1), 2)
    if chat:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": text}]
        if rng.random() < 0.2:
            body["logprobs"], body["top_logprobs"] = True, rng.randint(0, 5)
    else:
        path = "/v1/completions"
        body["prompt"] = text if rng.random() < 0.8 else [rng.randint(100, 40000)
                                                         for _ in range(words)]
        if rng.random() < 0.2:
            body["logprobs"] = rng.randint(0, 5)
    if stream:
        body["stream"] = True
        if rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
    plan = Plan(path, body, stream)
    roll = rng.random()
    if roll < 0.1:  # the client gives up
        plan.abort_after = rng.randint(1, 4) if stream else rng.uniform(0.05, 0.5)
    elif roll < 0.15:  # invalid on purpose
        plan.invalid = True
        key, value = rng.choice([("temperature", -1), ("n", 0), ("max_tokens", 10**9),
                                 ("top_p", 2), ("logprobs" if not chat else "top_logprobs", 99),
                                 ("stop", [""]), ("model", "no-such-model")])
        body[key] = value
        if key == "top_logprobs":
            body["logprobs"] = True
    return plan


def check_response(plan: Plan, body: dict) -> str:
    """"" if a non-streamed response is complete, else what is wrong."""
    choices = body.get("choices") or []
    if len(choices) != plan.body["n"]:
        return f"{len(choices)} choices for n={plan.body['n']}"
    if any(c.get("finish_reason") not in ("stop", "length") for c in choices):
        return "a choice without a finish reason"
    if "usage" not in body:
        return "no usage"
    return ""


def run_one(http: httpx.Client, plan: Plan) -> Outcome:
    t0 = time.monotonic()

    def outcome(kind: str, detail: str = "") -> Outcome:
        return Outcome(kind, time.monotonic() - t0, detail)

    try:
        if not plan.stream:
            timeout = plan.abort_after if plan.abort_after else 300
            try:
                r = http.post(plan.path, json=plan.body, timeout=timeout)
            except httpx.TimeoutException:
                if plan.abort_after:
                    return outcome(ABORTED)
                raise
            return judge(plan, r.status_code, r.json(), outcome)
        with http.stream("POST", plan.path, json=plan.body, timeout=300) as r:
            if r.status_code != 200:
                r.read()
                return judge(plan, r.status_code, r.json(), outcome)
            finished: set[int] = set()
            events = 0
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                events += 1
                if plan.abort_after and events >= plan.abort_after:
                    return outcome(ABORTED)  # leaving the block closes the connection
                if line == "data: [DONE]":
                    if len(finished) != plan.body["n"]:
                        return outcome("lost", f"[DONE] with {len(finished)} finished choices")
                    return outcome(OK)
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    kind = "5xx" if chunk["error"]["type"] in (
                        "internal_server_error", "service_unavailable_error") else "lost"
                    return outcome(kind, chunk["error"]["message"])
                for c in chunk["choices"]:
                    if c.get("finish_reason"):
                        finished.add(c["index"])
            return outcome("lost", "the stream ended without [DONE]")
    except (httpx.TransportError, json.JSONDecodeError) as e:
        return outcome("lost", repr(e))


def judge(plan: Plan, status: int, body: dict, outcome) -> Outcome:
    if status >= 500:
        return outcome("5xx", f"{status}: {body}")
    if plan.invalid:
        return outcome(REFUSED) if 400 <= status < 500 else outcome(
            "unexpected status", f"{status} for an invalid request")
    if status != 200:
        return outcome("unexpected status", f"{status}: {body}")
    problem = check_response(plan, body)
    return outcome("lost", problem) if problem else outcome(OK)


# ---- the server -----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="ember-soak-", suffix=".log")[1])
    cmd = [sys.executable, "-m", "ember", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--max-num-seqs", str(args.concurrency), "--kv-cache-memory", "100000000",
           *args.server_args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"ember serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url, log
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit("ember serve did not get ready in 300 s")


def engine_state(http: httpx.Client) -> dict[str, float]:
    state = {}
    for line in http.get("/metrics", timeout=10).text.splitlines():
        for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                     "num_requests_in_flight"):
            if line.startswith(f"ember:{name}{{"):
                state[name] = float(line.rsplit(" ", 1)[1])
    return state


@dataclass
class MemorySampler:
    """The server's RSS, every `interval` seconds, on a thread."""

    pid: int
    interval: float = 1.0
    samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds, bytes)

    def __post_init__(self) -> None:
        self._process = psutil.Process(self.pid)
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> int:
        rss = self._process.memory_info().rss
        self.samples.append((time.monotonic() - self._t0, rss))
        return rss

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# ---- the run --------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000, help="most requests (default 3000)")
    ap.add_argument("--duration", type=float, default=300,
                    help="most seconds of load (default 300)")
    ap.add_argument("--concurrency", type=int, default=32, help="clients at once (default 32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="the started server's torch threads (OMP_NUM_THREADS; default 1: the "
                    "soak's clients need a core of their own on a small machine)")
    ap.add_argument("--url", default=None, help="a running server (default: start one)")
    ap.add_argument("--pid", type=int, default=None, help="the --url server's process id")
    ap.add_argument("--api-key", default=os.environ.get("EMBER_API_KEY"))
    ap.add_argument("--out", default="benchmarks/results/soak.json")
    ap.add_argument("server_args", nargs="*", help="more `ember serve` flags (after --)")
    args = ap.parse_args()

    proc = log = None
    if args.url is None:
        proc, url, log = start_server(args)
        pid = proc.pid
    else:
        url, pid = args.url.rstrip("/"), args.pid
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    control = httpx.Client(base_url=url, headers=headers)
    card = control.get("/v1/models", timeout=10).json()["data"][0]
    memory = MemorySampler(pid) if pid else None

    rng = random.Random(args.seed)
    plans = [make_plan(rng, card["max_model_len"], card["id"]) for _ in range(args.requests)]
    local = threading.local()
    t0 = time.monotonic()
    deadline = t0 + args.duration
    outcomes: list[Outcome] = []
    warm_rss: list[int] = []
    lock = threading.Lock()

    def worker(plan: Plan) -> Outcome | None:
        if time.monotonic() > deadline:
            return None
        if not hasattr(local, "http"):
            local.http = httpx.Client(base_url=url, headers=headers)
        out = run_one(local.http, plan)
        with lock:
            outcomes.append(out)
            warm = (len(outcomes) >= len(plans) // 10
                    or time.monotonic() - t0 >= args.duration / 10)
            if warm and memory and not warm_rss:
                warm_rss.append(memory.sample())  # the end of the warm-up
        return out

    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(worker, plans))
    elapsed = time.monotonic() - t0

    # Idle again: nothing running, waiting, in flight; no KV block in use.
    idle_deadline = time.monotonic() + 15
    while True:
        state = engine_state(control)
        idle = (state.get("num_requests_running") == 0 and state.get("num_requests_waiting") == 0
                and state.get("kv_cache_usage_perc") == 0
                and state.get("num_requests_in_flight", 0) == 0)
        if idle or time.monotonic() > idle_deadline:
            break
        time.sleep(0.2)
    healthy = control.get("/health", timeout=10).status_code == 200
    rss_end = memory.sample() if memory else None
    if memory:
        memory.stop()

    kinds = Counter(o.kind for o in outcomes)
    latencies = [o.latency for o in outcomes if o.kind == OK]
    failures = [o for o in outcomes if o.kind in FAILURES]
    rss_start = warm_rss[0] if warm_rss else (memory.samples[0][1] if memory else None)
    mib = 1024 * 1024
    result = {
        "requests": len(outcomes), "planned": len(plans), "seconds": round(elapsed, 1),
        "requests_per_second": round(len(outcomes) / elapsed, 2),
        "outcomes": dict(kinds),
        "lost": kinds["lost"], "server_errors_5xx": kinds["5xx"],
        "unexpected_status": kinds["unexpected status"],
        "failures": [asdict(o) for o in failures[:20]],
        "latency_ok_s": {"p50": round(percentile(latencies, 0.5), 3),
                         "p90": round(percentile(latencies, 0.9), 3),
                         "p99": round(percentile(latencies, 0.99), 3),
                         "max": round(max(latencies, default=float("nan")), 3)},
        "idle_after": idle, "engine_state_after": state, "healthy_after": healthy,
        "rss_mib": None if not memory else {
            "after_warmup": round(rss_start / mib, 1), "end": round(rss_end / mib, 1),
            "max": round(max(s[1] for s in memory.samples) / mib, 1),
            "growth": round((rss_end - rss_start) / mib, 1),
            "growth_percent": round(100 * (rss_end - rss_start) / rss_start, 2),
            "samples": [(round(t, 1), round(b / mib, 1)) for t, b in memory.samples[::5]],
        },
        "config": {"concurrency": args.concurrency, "seed": args.seed, "threads": args.threads,
                   "requests": args.requests, "duration": args.duration,
                   "model": card["id"], "max_model_len": card["max_model_len"],
                   "server_args": args.server_args, "own_server": proc is not None},
        "host": {"machine": platform.machine(), "cpu": cpu_model(), "cpus": os.cpu_count(),
                 "python": platform.python_version()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    errors = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()) if k != OK) or "none"
    rss = ("RSS n/a" if not memory else
           f"RSS {result['rss_mib']['after_warmup']:.0f} -> {result['rss_mib']['end']:.0f} MiB "
           f"({result['rss_mib']['growth']:+.1f} MiB, {result['rss_mib']['growth_percent']:+.1f}%)")
    ok = not failures and idle and healthy
    print(f"soak: {len(outcomes)} requests in {elapsed:.0f} s ({result['requests_per_second']}/s):"
          f" {kinds[OK]} ok, {errors}; lost {kinds['lost']}, 5xx {kinds['5xx']} | latency p50 "
          f"{result['latency_ok_s']['p50']:.2f} s, p99 {result['latency_ok_s']['p99']:.2f} s | "
          f"{rss} | idle after: {'yes' if idle else f'NO {state}'} | "
          f"{'PASS' if ok else 'FAIL'}")
    for o in failures[:5]:
        print(f"  {o.kind}: {o.detail}", file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if proc is not None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        if not ok and log is not None:
            print(log.read_text()[-3000:], file=sys.stderr)
        log.unlink()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
