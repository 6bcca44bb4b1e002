"""A short soak (benchmarks/soak.py, a hundred mixed requests, some abandoned by their
clients, some invalid) against the shared server: nothing lost, no 5xx, idle afterwards.
`make soak` runs the long one on a server of its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REL_KEY

SOAK = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"


def test_short_soak(rel_server, tmp_path):
    out = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, str(SOAK), "--url", rel_server.url, "--pid", str(rel_server.proc.pid),
         "--api-key", REL_KEY, "--requests", "100", "--duration", "120", "--concurrency", "6",
         "--seed", "7", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    print(run.stdout, run.stderr)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert result["lost"] == result["server_errors_5xx"] == result["unexpected_status"] == 0
    assert result["idle_after"] and result["healthy_after"]
    assert result["outcomes"]["ok"] >= result["requests"] // 2
    rss = result["rss_mib"]
    # The reading is the server's (torch and the model are resident: hundreds of MiB), and
    # 100 requests leave it without a leak's growth.
    assert rss["after_warmup"] > 200
    assert rss["growth_percent"] < 25, rss
