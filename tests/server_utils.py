"""`ember serve` as a real subprocess on 127.0.0.1, for the server tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """Starts at construction (the model loads while the caller does other work)."""

    def __init__(self, *args: str, api_key: str | None = None, key_in_env: bool = False,
                 module: str = "ember", env: dict[str, str] | None = None) -> None:
        """`key_in_env`: pass the key as EMBER_API_KEY rather than --api-key; `module`: what
        `python -m` runs (a test's own launcher, say), with `serve ...` as its arguments;
        `env`: more environment variables."""
        self.port = free_port()
        self.api_key = api_key
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", module, "serve", "--host", "127.0.0.1",
               "--port", str(self.port), *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        env.pop("EMBER_API_KEY", None)
        if api_key and key_in_env:
            env["EMBER_API_KEY"] = api_key
        elif api_key:
            cmd += ["--api-key", api_key]
        self.cmd = cmd
        self._log = tempfile.NamedTemporaryFile(prefix="ember-serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     cwd=os.path.dirname(os.path.abspath(__file__)))

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        with open(self._log.name, errors="replace") as f:
            return f.read()

    def wait_ready(self, timeout: float = 180.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ember serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"ember serve not ready after {timeout} s:\n{self.log()}")

    def metrics(self) -> dict[str, float]:
        """Unlabelled-by-reason samples of /metrics: name (without labels) -> value."""
        text = httpx.get(f"{self.url}/metrics", headers=self.headers, timeout=5).text
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name_labels, value = line.rsplit(" ", 1)
                values[name_labels] = float(value)
        return values

    def metric(self, name: str, **labels: str) -> float:
        """The sum of `name`'s samples whose labels include `labels`."""
        total = 0.0
        for key, value in self.metrics().items():
            base, _, rest = key.partition("{")
            if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
                total += value
        return total

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        os.unlink(self._log.name)
        return self.proc.returncode
