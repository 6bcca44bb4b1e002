"""`ember serve`: uvicorn up first (/health answers 503), the model loads on the engine
thread, then /health turns 200.

SIGTERM / SIGINT: uvicorn stops accepting connections and waits for open ones; the engine
refuses new requests, lets running ones finish for `--shutdown-grace` seconds, then aborts
the rest (their clients get an error response), and the process exits 0.

If the engine dies (the model fails to load, a step raises a batch-wide failure such as a
lost device, or a tensor-parallel worker is gone), every request in flight gets a 503,
/health answers 503, and the server shuts down and exits 1: it fails fast and visibly, for
its supervisor to restart it, never hangs.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import threading
from types import FrameType

import uvicorn

from ember.config import EngineConfig
from ember.engine.async_engine import AsyncLLMEngine
from ember.server.app import build_app

logger = logging.getLogger("ember.server")
API_KEY_ENV = "EMBER_API_KEY"  # the key, kept off the command line (which `ps` shows)


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: AsyncLLMEngine, grace_s: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.grace_s = grace_s

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            logger.info("shutting down: in-flight requests have %.1f s to finish", self.grace_s)
            # Off the event loop: shutdown blocks through the grace period.
            threading.Thread(target=self.engine.shutdown, args=(self.grace_s,),
                             name="ember-shutdown", daemon=True).start()
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.engine.error is not None and not self.should_exit:
            logger.error("the engine is dead (%s): shutting down", self.engine.error)
            self.should_exit = True
        return await super().on_tick(counter)


def warn_if_open(host: str, keys: list[str]) -> bool:
    """Warn (and return True) when a host other than loopback is served without an API key:
    anyone who can reach the port can then use the model."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        loopback = False
    if keys or loopback:
        return False
    logger.warning("serving on %s without an API key: anyone who can reach this port can use "
                   "the model; set --api-key or %s", host, API_KEY_ENV)
    return True


def served_name(config: EngineConfig) -> str:
    if config.model is None:
        from ember.loading.gguf import default_gguf_path

        return default_gguf_path().stem
    return config.model


def serve(args: argparse.Namespace, config: EngineConfig) -> int:
    engine = AsyncLLMEngine.from_config(config, freeze_gc=True)  # this process serves it alone
    name = args.served_model_name or served_name(config)
    keys = list(args.api_key or [])
    if not keys and os.environ.get(API_KEY_ENV):
        keys = [os.environ[API_KEY_ENV]]
    warn_if_open(args.host, keys)
    app = build_app(engine, name, keys, metrics_require_key=args.metrics_require_key,
                    max_body_bytes=args.max_request_body_bytes, send_timeout=args.send_timeout)
    uvicorn_config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
        # The same event loop and HTTP parser whatever else is installed (uvicorn's "auto"
        # takes uvloop and httptools where present, as Ray Serve's dependencies bring).
        loop="asyncio", http="h11",
        # A backstop: the engine aborts what is left at the grace period's end.
        timeout_graceful_shutdown=args.shutdown_grace + 5,
    )
    server = _Server(uvicorn_config, engine, args.shutdown_grace)
    # uvicorn re-raises the signal it handled once it has stopped; let that be a no-op so
    # that a graceful shutdown exits 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    logger.info("serving %s as %r on http://%s:%d (loading the model)",
                config.model or "the default model", name, args.host, args.port)
    # The port is bound before the engine starts: nothing it opens while loading (tensor
    # parallelism's TCP store and gloo sockets take ephemeral ports) can take it first.
    sock = uvicorn_config.bind_socket()
    engine.start()
    server.run(sockets=[sock])
    engine.shutdown(0)
    return 1 if engine.error is not None else 0

