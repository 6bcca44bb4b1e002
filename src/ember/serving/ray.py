"""Engine replicas on Ray Serve, behind one OpenAI-compatible endpoint.

    ember serve --data-parallel-size 2 --data-parallel-backend ray        # the CLI
    serve run ember.serving.ray:build_app data_parallel_size=2 model=...  # Ray Serve / KubeRay

Two deployments make the application:
- `EngineReplica` (N replicas, or autoscaled between --min-replicas and --max-replicas on
  requests in flight): each holds one `AsyncLLMEngine` and the single-engine app around it,
  with `OMP_NUM_THREADS` and its Ray CPUs set to its share of the cores.
- `Ingress` (one replica, no engine): forwards every HTTP request to a replica through a
  deployment handle and relays the response, streams included. Requests pick a replica with
  `PrefixRouter`: Ray Serve's PrefixCacheAffinityRouter (while the replicas' loads differ by
  at most --router-imbalanced-threshold, the replica that served the longest shared prefix, so
  that its prefix cache hits) falling back to power of two choices. A replica that dies before
  it accepts a request has the request retried on another; one that dies while running it
  answers 503, or, when its event stream has begun, ends the stream with a 503 error event.
  `/metrics` is every replica's metrics with a `replica` label, plus the router's decisions.
"""

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, fields
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
# Ray Serve's two routers by their defining modules: the public `ray.serve.llm.request_router`
# re-exports PrefixCacheAffinityRouter but imports Ray's whole LLM stack (pyarrow, ...) first.
from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import (
    PrefixCacheAffinityRouter,
)
from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from ember.config import (
    DEFAULT_MAX_BODY_BYTES, DEFAULT_SEND_TIMEOUT, DataParallelConfig, EngineConfig,
)
from ember.errors import ConfigError
from ember.serving import decisions
from ember.serving.proxy import ForwardedRequest, run_asgi

logger = logging.getLogger("ember.serving")

APP_NAME = "ember"
RAY_NAMESPACE = "ember"
METRICS_PUSH_S = 2.0  # how often a replica publishes its metrics for the ingress's /metrics
METRICS_MAX_AGE_S = 15.0  # a replica silent this long (dead, or gone) is left out
# How often the ingress tries replicas for one request that no replica has started answering
# (each failure a replica that died or left): then 503.
MAX_ATTEMPTS = 3
HEALTH_TIMEOUT_S = 5.0
# The first message of every replica's response: the replica has the request. Before it, a
# replica lost never ran the request (another may); after it, the request dies with it.
ACCEPTED = {"type": "ember.request.accepted"}
_RETRYABLE = (ray.exceptions.RayActorError, DeploymentUnavailableError)


def _replica_unavailable(detail: str) -> dict[str, Any]:
    return {"error": {"message": f"no engine replica could serve the request: {detail}",
                      "type": "service_unavailable_error", "param": None,
                      "code": "replica_unavailable"}}


def _plain_logs(level: str = "INFO") -> None:
    """ember's log lines as `ember serve` writes them: Ray's workers (and a driver, once Ray
    is started) format the root logger's records as JSON."""
    ember_logger = logging.getLogger("ember")
    if not any(getattr(h, "_ember", False) for h in ember_logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._ember = True  # type: ignore[attr-defined]
        ember_logger.addHandler(handler)
        ember_logger.setLevel(level)
        ember_logger.propagate = False


# ---- routing ----------------------------------------------------------------------------------
class PrefixRouter(PrefixCacheAffinityRouter):
    """Ray Serve's prefix-cache affinity router, for ember's forwarded requests: requests with
    no prompt (models, tokenizer, health) go by load alone, and every decision is counted.

    Ray Serve pickles a router's module by value into the process that routes (the ingress's):
    the counters it increments therefore live in another module (`decisions`), and its own
    state on the instance."""

    def initialize_state(self, **kwargs: Any) -> None:
        super().initialize_state(**kwargs)
        # each request's decision, from choosing its replica until it is sent there
        self._ember_decisions: dict[int, str] = {}

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if pending_request is None or not _prompt_of(pending_request):
            return await PowerOfTwoChoicesRequestRouter.choose_replicas(
                self, candidate_replicas=candidate_replicas, pending_request=pending_request)
        return await super().choose_replicas(candidate_replicas, pending_request)

    async def _prefix_match_best_replicas(self, pending_request, candidate_replicas):
        chosen = await super()._prefix_match_best_replicas(pending_request, candidate_replicas)
        decision = decisions.LOAD_BALANCED
        if chosen[0]:
            # The prefix tree chose: by a shared prefix, or, when no replica served one, the
            # replica whose cache holds least (a balancing choice). Which, only the match says.
            text = self._extract_text_from_request(pending_request)
            matched, _ = ray.get(self._tree_actor.prefix_match.remote(
                text, [r.replica_id.to_full_id_str() for r in chosen[0]]))
            if text and len(matched) >= self._match_rate_threshold * len(text):
                decision = decisions.CACHE_AFFINE
        self._ember_decisions[id(pending_request)] = decision
        return chosen

    def on_request_routed(self, pending_request, replica_id, result):
        decisions.count(self._ember_decisions.pop(id(pending_request), decisions.LOAD_BALANCED))
        if _prompt_of(pending_request):  # the prefix tree learns only real prompts
            super().on_request_routed(pending_request, replica_id, result)


def _prompt_of(pending_request) -> str:
    return next((a.prompt for a in pending_request.args if isinstance(a, ForwardedRequest)), "")


class PowerOfTwoRouter(PowerOfTwoChoicesRequestRouter):
    """Power of two choices for every request (--router pow2), decisions counted."""

    def on_request_routed(self, pending_request, replica_id, result):
        super().on_request_routed(pending_request, replica_id, result)
        decisions.count(decisions.LOAD_BALANCED)


# ---- metrics: each replica publishes, the ingress merges ------------------------------------
@ray.remote(num_cpus=0)
class MetricsBoard:
    """The latest metrics text of each replica, for the ingress's /metrics."""

    def __init__(self) -> None:
        self.texts: dict[str, tuple[float, str]] = {}

    def put(self, replica: str, text: str) -> None:
        self.texts[replica] = (time.monotonic(), text)

    def get(self, max_age_s: float) -> dict[str, str]:
        now = time.monotonic()
        return {r: text for r, (at, text) in self.texts.items() if now - at <= max_age_s}


def _board_name(app_name: str) -> str:
    return f"ember-metrics-{app_name}"


class _Labelled:
    """A Prometheus collector of the replicas' metric families, each sample labelled with its
    replica."""

    def __init__(self, texts: dict[str, str]) -> None:
        self.texts = texts

    def collect(self):
        families: dict[str, Metric] = {}
        for replica, text in sorted(self.texts.items()):
            for family in text_string_to_metric_families(text):
                merged = families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type))
                for s in family.samples:
                    merged.add_sample(s.name, {**s.labels, "replica": replica}, s.value,
                                      s.timestamp, s.exemplar)
        yield from families.values()


# ---- the deployments ---------------------------------------------------------------------
class EngineReplica:
    """One engine and the single-engine app around it; `forward` runs one HTTP request
    through that app."""

    def __init__(self, engine_config: dict[str, Any], served_model_name: str,
                 api_keys: list[str], server_options: dict[str, Any], threads: int) -> None:
        import torch

        from ember.engine.async_engine import AsyncLLMEngine
        from ember.server.app import build_app

        _plain_logs()
        torch.set_num_threads(threads)
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        self.engine = AsyncLLMEngine.from_config(EngineConfig(**engine_config))
        self.engine.start()
        self.engine.wait_ready()
        if self.engine.error is not None:  # Ray Serve retries, then reports the deployment
            raise RuntimeError(f"the engine failed to start: {self.engine.error}")
        self.app = build_app(self.engine, served_model_name, api_keys, **server_options)
        self._board_name = _board_name(context.app_name)
        self._stop = threading.Event()
        threading.Thread(target=self._publish_metrics, name="ember-metrics", daemon=True).start()
        logger.info("replica %s serves %s with %d threads", self.replica, served_model_name,
                    threads)

    async def forward(self, req: ForwardedRequest) -> AsyncIterator[dict[str, Any]]:
        yield ACCEPTED
        async for message in run_asgi(self.app, req):
            if message["type"] == "http.response.start":  # which replica answered
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-ember-replica", self.replica.encode())]}
            yield message

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine died is replaced."""
        if self.engine.error is not None:
            raise RuntimeError(f"the engine is dead: {self.engine.error}")

    def _publish_metrics(self) -> None:
        board = None
        metrics = self.app.state.server.metrics
        while not self._stop.wait(METRICS_PUSH_S):
            try:
                board = board or ray.get_actor(self._board_name, namespace=RAY_NAMESPACE)
                metrics.update_engine(self.engine.stats(), self.engine.num_in_flight)
                board.put.remote(self.replica, metrics.render().decode())
            except (ValueError, ray.exceptions.RayActorError):
                board = None  # not created yet, or restarted with the ingress: look again

    def __del__(self) -> None:
        self._stop.set()
        self.engine.shutdown(0)


_ingress_app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]


@serve.ingress(_ingress_app)
class Ingress:
    """The endpoint: every request forwarded to an engine replica, its response relayed."""

    def __init__(self, engines: DeploymentHandle, max_body_bytes: int) -> None:
        self.engines = engines.options(stream=True)
        self.max_body_bytes = max_body_bytes
        app_name = serve.get_replica_context().app_name
        self.board = MetricsBoard.options(  # type: ignore[attr-defined]
            name=_board_name(app_name), namespace=RAY_NAMESPACE, get_if_exists=True).remote()

    @_ingress_app.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        # A replica's own /metrics answers first, so that the ingress's /metrics is open or
        # needs a key exactly as theirs does.
        first = await self._first_message(request, b"", timeout=HEALTH_TIMEOUT_S)
        if isinstance(first, Response):
            return first
        start, gen = first
        if start["status"] != 200:
            return self._response(start, gen)
        gen.cancel()
        registry = CollectorRegistry()
        registry.register(_Labelled(await self.board.get.remote(METRICS_MAX_AGE_S)))
        body = generate_latest(registry) + decisions.render()
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @_ingress_app.api_route("/{path:path}", methods=_METHODS)
    async def forward(self, path: str, request: Request) -> Response:
        body = await self._read_body(request)
        timeout = HEALTH_TIMEOUT_S if request.url.path == "/health" else None
        first = await self._first_message(request, body, timeout)
        return first if isinstance(first, Response) else self._response(*first)

    def _response(self, start: dict[str, Any], gen) -> Response:
        response = StreamingResponse(self._relay(gen, start), status_code=start["status"])
        response.raw_headers = [tuple(h) for h in start["headers"]]
        return response

    async def _read_body(self, request: Request) -> bytes:
        """The body, up to one byte past the replicas' limit (they then answer 413)."""
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                break
        return bytes(body)

    async def _first_message(self, request: Request, body: bytes,
                             timeout: float | None) -> Any:
        """Send the request to a replica and wait for its response to start; a replica that
        fails before that is replaced by another, up to MAX_ATTEMPTS. Returns the start
        message and the response's generator, or an error Response."""
        path = request.url.path
        req = ForwardedRequest.create(
            request.method, path, request.url.query.encode(),
            [(k.lower(), v) for k, v in request.headers.raw], body,
            (request.client.host, request.client.port) if request.client else None)
        detail = "no replica answered"
        try:
            async with asyncio.timeout(timeout):
                for _ in range(MAX_ATTEMPTS):
                    gen = self.engines.forward.remote(req)
                    accepted = False
                    try:
                        accepted = await anext(gen) == ACCEPTED
                        start = await anext(gen)
                    except _RETRYABLE as e:
                        gen.cancel()
                        if accepted:  # it was running the request: that is lost
                            logger.warning("a replica failed running %s %s (%s)",
                                           request.method, path, type(e).__name__)
                            detail = f"the replica serving it failed ({type(e).__name__})"
                            break
                        detail = type(e).__name__
                        logger.warning("a replica failed before accepting %s %s (%s): trying "
                                       "another", request.method, path, detail)
                        continue
                    except BaseException:
                        gen.cancel()
                        raise
                    return start, gen
        except TimeoutError:
            detail = f"no replica answered within {timeout:.0f} s"
        return JSONResponse(_replica_unavailable(detail), status_code=503)

    async def _relay(self, gen, start: dict[str, Any]) -> AsyncIterator[bytes]:
        """The response's body chunks; a replica lost mid-stream ends an event stream with
        an error event (503), as ember's own server does when its engine dies."""
        event_stream = any(k == b"content-type" and v.startswith(b"text/event-stream")
                           for k, v in start["headers"])
        try:
            async for message in gen:
                if message["type"] == "http.response.body" and message.get("body"):
                    yield message["body"]
        except _RETRYABLE as e:
            logger.warning("a replica failed mid-response (%s)", type(e).__name__)
            if event_stream:
                error = _replica_unavailable(f"the replica serving it failed "
                                             f"({type(e).__name__})")
                error["error"]["code"] = 503
                yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()
        finally:
            gen.cancel()  # a client gone: the replica's app sees the disconnect and aborts


# ---- the application ---------------------------------------------------------------------
def replica_threads(replicas: DataParallelConfig) -> int:
    if replicas.replica_threads is not None:
        return replicas.replica_threads
    most = replicas.max_replicas or replicas.data_parallel_size
    return max(1, (os.cpu_count() or 1) // most)


def application(config: EngineConfig, replicas: DataParallelConfig, served_model_name: str,
                api_keys: list[str] | None = None, *,
                max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                send_timeout: float = DEFAULT_SEND_TIMEOUT,
                metrics_require_key: bool = False) -> serve.Application:
    """The Ray Serve application: the engine replicas and the ingress in front of them."""
    if config.tensor_parallel_size > 1:
        raise ConfigError("replicas of tensor-parallel engines are not supported: use "
                          "--tensor-parallel-size 1 with --data-parallel-size")
    threads = replica_threads(replicas)
    router = PrefixRouter if replicas.router == "prefix" else PowerOfTwoRouter
    scaling: dict[str, Any]
    if replicas.autoscaling:
        scaling = {"autoscaling_config": {
            "min_replicas": replicas.min_replicas or 1,
            "max_replicas": replicas.max_replicas or replicas.data_parallel_size,
            "initial_replicas": max(replicas.min_replicas or 1,
                                    min(replicas.data_parallel_size,
                                        replicas.max_replicas or replicas.data_parallel_size)),
            "target_ongoing_requests": replicas.target_ongoing_requests}}
    else:
        scaling = {"num_replicas": replicas.data_parallel_size}
    engine = serve.deployment(EngineReplica).options(
        name="EngineReplica",
        # ember queues and refuses (429) itself; Ray Serve must not refuse first.
        max_ongoing_requests=config.max_num_seqs + (config.max_queued_requests or 1024),
        ray_actor_options={"num_cpus": threads,
                           "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads)}}},
        request_router_config=RequestRouterConfig(
            request_router_class=router,
            request_router_kwargs=({"imbalanced_threshold": replicas.router_imbalanced_threshold}
                                   if router is PrefixRouter else {})),
        health_check_period_s=5, health_check_timeout_s=30,
        **scaling,
    ).bind(asdict(config), served_model_name, list(api_keys or []),
           {"max_body_bytes": max_body_bytes, "send_timeout": send_timeout,
            "metrics_require_key": metrics_require_key}, threads)
    ingress = serve.deployment(Ingress).options(
        name="Ingress", num_replicas=1, max_ongoing_requests=4096,
        ray_actor_options={"num_cpus": 0}).bind(engine, max_body_bytes)
    return ingress


@dataclass
class ServerOptions:
    """The HTTP server's settings of `ember serve` that the replicas' apps take."""

    served_model_name: str | None = None
    api_key: str | None = None  # default: the EMBER_API_KEY environment variable
    max_request_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    send_timeout: float = DEFAULT_SEND_TIMEOUT
    metrics_require_key: bool = False


def build_app(args: dict[str, Any]) -> serve.Application:
    """`serve run ember.serving.ray:build_app key=value ...` and KubeRay's RayService: the keys
    are `ember serve`'s flags with underscores: engine settings, replica settings and the
    server's (served_model_name, api_key, max_request_body_bytes, send_timeout,
    metrics_require_key)."""
    return _application(*parse_settings(args))


def parse_settings(args: dict[str, Any]
                   ) -> tuple[EngineConfig, DataParallelConfig, ServerOptions]:
    """build_app's settings as typed configs; a key none of them has is a ConfigError."""
    known = {cls: {f.name: f for f in fields(cls)}
             for cls in (EngineConfig, DataParallelConfig, ServerOptions)}
    valid = {name for names in known.values() for name in names}
    if unknown := set(args) - valid:
        raise ConfigError(f"unknown setting(s) {', '.join(sorted(unknown))}; valid: "
                          f"{', '.join(sorted(valid))}")
    config, replicas, server = (
        cls(**{name: _typed(known[cls][name], value) for name, value in args.items()
               if name in known[cls]}) for cls in known)
    return config, replicas, server


def _typed(f: Any, value: Any) -> Any:
    """A setting's value as its field's type (`serve run` passes strings)."""
    kind = str(f.type).split(" | ")[0]
    if not isinstance(value, str) or kind == "str":
        return value
    if kind == "bool":
        if value.lower() not in ("true", "false"):
            raise ConfigError(f"{f.name} must be true or false, got {value!r}")
        return value.lower() == "true"
    try:
        return {"int": int, "float": float}[kind](value)
    except (KeyError, ValueError):
        raise ConfigError(f"{f.name} must be a {kind}, got {value!r}") from None


def _application(config: EngineConfig, replicas: DataParallelConfig,
                 server: ServerOptions) -> serve.Application:
    from ember.server.launch import API_KEY_ENV, served_name

    key = server.api_key or os.environ.get(API_KEY_ENV)
    return application(config, replicas, server.served_model_name or served_name(config),
                       [key] if key else [], max_body_bytes=server.max_request_body_bytes,
                       send_timeout=server.send_timeout,
                       metrics_require_key=server.metrics_require_key)


def serve_replicas(args: argparse.Namespace, config: EngineConfig,
                   replicas: DataParallelConfig) -> int:
    """`ember serve --data-parallel-size N`: the application on the Ray cluster at RAY_ADDRESS,
    else on a local one started here; serves until SIGTERM/SIGINT."""
    keys = args.api_key or [None]
    if len(keys) > 1:
        raise ConfigError("replicas take one --api-key")
    app = _application(config, replicas, ServerOptions(
        args.served_model_name, keys[0], args.max_request_body_bytes, args.send_timeout,
        args.metrics_require_key))
    threads = replica_threads(replicas)
    most = replicas.max_replicas or replicas.data_parallel_size
    if os.environ.get("RAY_ADDRESS"):
        ray.init(namespace=RAY_NAMESPACE, log_to_driver=True)
    else:  # this host alone, on loopback, with logical CPUs enough for the replicas and
        # Serve's own actors
        ray.init(namespace=RAY_NAMESPACE, num_cpus=max(os.cpu_count() or 1, most * threads + 1),
                 include_dashboard=False, _node_ip_address="127.0.0.1")
    def stop(*_: Any) -> None:  # also while serve.run waits for the replicas to load
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    _plain_logs(args.log_level.upper())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        logger.info("starting %d engine replica(s) of %d thread(s) on Ray (loading the model)",
                    replicas.data_parallel_size, threads)
        serve.run(app, name=APP_NAME, route_prefix="/")
        logger.info("serving on http://%s:%d with %d replica(s), router %s", args.host,
                    args.port, replicas.data_parallel_size, replicas.router)
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        logger.info("shutting down the replicas")
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
    return 0

