"""Prefix-affine routing vs power of two choices, for engine replicas on Ray Serve.

    .venv/bin/python benchmarks/replica_routing.py [--conversations 4] [--turns 4] [--output-len 16]

For each router (`--router prefix`, then `--router pow2`) it starts `ember serve
--data-parallel-size 2 --replica-threads 1` (the default model, on a local Ray cluster that the
server starts and stops), runs `ember bench serve --workload multi-turn` against it (each
conversation's turns resend its growing history), and stops it. The same conversations (the
same --seed) go to both. Prints each run's summary and writes
benchmarks/results/replica_routing.json: the CPU, the commands, and per router the aggregate
throughput, TTFT (all turns and turns 2+), the share of prompt tokens found cached and how many
replicas each conversation visited.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from ember.cpuinfo import cpu_model

ROOT = Path(__file__).resolve().parent.parent
# Ray on loopback alone, no usage reports, its token authentication on.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token"}
SERVE = ["--data-parallel-size", "2", "--replica-threads", "1", "--max-model-len", "4096"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_router(router: str, bench: list[str]) -> dict:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, **RAY_ENV, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    log = tempfile.NamedTemporaryFile(prefix=f"ember-replicas-{router}-", suffix=".log",
                                      delete=False)
    server = subprocess.Popen(
        [sys.executable, "-m", "ember", "serve", "--host", "127.0.0.1", "--port", str(port),
         *SERVE, "--router", router], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 900
        while True:
            if server.poll() is not None:
                raise SystemExit(f"ember serve exited: see {log.name}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"ember serve not ready: see {log.name}")
            time.sleep(1)
        out = Path(tempfile.mkdtemp()) / "bench.json"
        subprocess.run([sys.executable, "-m", "ember", "bench", "serve", "--base-url", url,
                        *bench, "--output-json", str(out)], check=True, env=env)
        return json.loads(out.read_text())
    finally:
        server.terminate()
        server.wait(180)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conversations", type=int, default=4)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--system-words", type=int, default=300)
    p.add_argument("--turn-words", type=int, default=30)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-rate", type=float, default=0.5,
                   help="conversations starting per second (Poisson)")
    p.add_argument("--think-time", type=float, default=2.0,
                   help="mean seconds between an answer and the next turn")
    p.add_argument("--output", default=str(ROOT / "benchmarks/results/replica_routing.json"))
    args = p.parse_args()
    bench = ["--workload", "multi-turn", "--conversations", str(args.conversations),
             "--turns", str(args.turns), "--system-words", str(args.system_words),
             "--turn-words", str(args.turn_words), "--output-len", str(args.output_len),
             "--seed", str(args.seed), "--request-rate", str(args.request_rate),
             "--think-time", str(args.think_time)]
    runs = {}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = [os.getloadavg()[0]]
    for router in ("prefix", "pow2"):
        s = run_router(router, bench)
        runs[router] = {k: s[k] for k in (
            "completed", "failed", "duration_s", "total_input_tokens", "total_output_tokens",
            "total_cached_tokens", "cached_token_share", "output_throughput",
            "total_token_throughput", "ttft_ms", "ttft_later_turns_ms", "e2e_ms",
            "replicas_per_conversation", "requests_per_replica")}
        load.append(os.getloadavg()[0])
    result = {
        "command": "python benchmarks/replica_routing.py " + " ".join(sys.argv[1:]),
        "serve": "ember serve " + " ".join(SERVE) + " --router {prefix,pow2}",
        "bench": "ember bench serve " + " ".join(bench),
        "date": started, "cpu": cpu_model(), "cores": os.cpu_count(),
        # the machine's 1-minute load average before and after each run: other jobs share it
        "load_average": [round(x, 1) for x in load], "torch": torch.__version__,
        "python": platform.python_version(), "runs": runs,
    }
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    for router, r in runs.items():
        print(f"{router:>6}: {r['total_token_throughput']:.1f} tok/s total, "
              f"{r['output_throughput']:.2f} output tok/s, "
              f"TTFT p50 {r['ttft_ms']['median']:.0f} ms "
              f"(turns 2+ {r['ttft_later_turns_ms']['median']:.0f} ms), "
              f"{100 * r['cached_token_share']:.0f}% of prompt tokens cached, replicas per "
              f"conversation {r['replicas_per_conversation']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
