"""Prometheus metrics (vLLM's names under an `ember:` prefix) and the per-request log line."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ember.engine.cost import RequestCost
from ember.engine.llm_engine import EngineStats
from ember.engine.spec_decode.metrics import SpecDecodingStats
from ember.outputs import RequestOutput

logger = logging.getLogger("ember.server")

# vLLM's buckets.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
# Per output token (the prompt's share included): from a tiny model on many cores to a large
# one on one.
JOULES_PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                            5.0, 10.0, 25.0, 50.0, 100.0)
CPU_SECONDS_PER_TOKEN_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


@dataclass
class RequestProgress:
    """What the server has seen of one request so far."""

    request_id: str
    prompt_tokens: int
    arrival: float = field(default_factory=time.monotonic)
    num_tokens: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None
    cost: RequestCost | None = None  # as of the latest output


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r, m = self.registry, ["model_name"]

        def counter(name: str, doc: str, labels: tuple[str, ...] = ("model_name",)) -> Counter:
            return Counter(f"ember:{name}", doc, labels, registry=r)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"ember:{name}", doc, m, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"ember:{name}", doc, m, buckets=buckets,
                             registry=r).labels(model_name)

        self._success = counter("request_success", "Finished requests by finish reason.",
                                ("model_name", "finished_reason"))
        self._aborted = counter("request_aborted", "Requests that ran but did not finish: "
                                "their client left, they failed, or the server stopped them.")
        self._errors = counter("request_errors", "Requests refused or failed, by HTTP status.",
                               ("model_name", "status_code"))
        self._prompt_tokens = counter("prompt_tokens", "Prefill tokens processed.")
        self._generation_tokens = counter("generation_tokens", "Generated tokens.")
        self._prefix_queries = counter("prefix_cache_queries",
                                       "Prompt tokens looked up in the prefix cache.")
        self._prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the cache.")
        self._preemptions = counter("num_preemptions", "Preemptions (KV cache full).")
        self._ttft = histogram("time_to_first_token_seconds", "Time to first token.",
                               TTFT_BUCKETS)
        self._itl = histogram("inter_token_latency_seconds", "Time between two tokens.",
                              ITL_BUCKETS)
        self._e2e = histogram("e2e_request_latency_seconds", "Request latency, end to end.",
                              LATENCY_BUCKETS)
        self._queue = histogram("request_queue_time_seconds", "Time spent waiting to start.",
                                LATENCY_BUCKETS)
        # Cost accounting (engine/cost.py), counted when a request ends.
        self._energy = counter("energy_joules", "Energy charged to requests, by source "
                               "(rapl, nvml, estimate).", ("model_name", "source"))
        self._cpu = counter("cpu_seconds", "Process CPU time charged to requests.")
        self._usd = counter("cost_usd", "Dollars charged to requests (--price-per-hour).")
        self._carbon = counter("carbon_grams", "Grams of CO2e charged to requests "
                               "(--carbon-intensity).")
        self._joules_per_token = histogram(
            "energy_joules_per_output_token", "A request's energy per output token.",
            JOULES_PER_TOKEN_BUCKETS)
        self._cpu_per_token = histogram(
            "cpu_seconds_per_output_token", "A request's CPU time per output token.",
            CPU_SECONDS_PER_TOKEN_BUCKETS)
        self._running = gauge("num_requests_running", "Sequences running.")
        self._waiting = gauge("num_requests_waiting", "Sequences waiting to start.")
        self._kv_usage = gauge("kv_cache_usage_perc", "KV-cache usage: 1 = full.")
        self._in_flight = gauge("num_requests_in_flight",
                                "Requests admitted and not yet finished (the request table).")
        # Speculative decoding (vLLM's names): verified drafts, their tokens, the accepted ones
        # in all and by position in the draft.
        self._spec_drafts = counter("spec_decode_num_drafts", "Drafts verified.")
        self._spec_draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens.")
        self._spec_accepted = counter("spec_decode_num_accepted_tokens",
                                      "Draft tokens accepted.")
        self._spec_accepted_per_pos = counter(
            "spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted, by their position in the draft.", ("model_name", "position"))
        # The engine's counters are cumulative: export their growth since the last scrape.
        self._last = EngineStats(0, 0, 0, 0, 0.0, 0, 0, 0)

    # ---- per request ---------------------------------------------------------------------
    def record_output(self, progress: RequestProgress, out: RequestOutput) -> None:
        """Account one delta output."""
        if out.metrics is not None and out.metrics.cost is not None:
            progress.cost = out.metrics.cost
        new = sum(len(c.token_ids) for c in out.outputs)
        if new <= 0:
            return
        self._generation_tokens.labels(self.model_name).inc(new)
        now = (out.metrics.last_token_time if out.metrics and out.metrics.last_token_time
               else time.monotonic())
        if progress.first_token_time is None:
            progress.first_token_time = now
            self._prompt_tokens.labels(self.model_name).inc(progress.prompt_tokens)
            self._ttft.observe(now - progress.arrival)
            if out.metrics and out.metrics.queue_time is not None:
                self._queue.observe(out.metrics.queue_time)
        elif progress.last_token_time is not None:
            self._itl.observe(now - progress.last_token_time)
        progress.num_tokens += new
        progress.last_token_time = now

    def record_finished(self, progress: RequestProgress, finish_reason: str) -> None:
        """A request that ran has ended; "abort" (its client left, it failed, or the server
        stopped it) is not a success: it has its own counter."""
        total = time.monotonic() - progress.arrival
        if finish_reason == "abort":
            self._aborted.labels(self.model_name).inc()
        else:
            self._success.labels(self.model_name, finish_reason).inc()
            self._e2e.observe(total)
        ttft = (f"{progress.first_token_time - progress.arrival:.3f}s"
                if progress.first_token_time is not None else "-")
        cost = self._record_cost(progress)
        logger.info(
            "Finished request %s: prompt tokens %d, completion tokens %d, TTFT %s, "
            "total %.3fs, finish reason %s%s",
            progress.request_id, progress.prompt_tokens, progress.num_tokens, ttft, total,
            finish_reason, cost,
        )

    def _record_cost(self, progress: RequestProgress) -> str:
        """Count a finished request's cost; its part of the log line."""
        cost = progress.cost
        if cost is None:
            return ""
        m, used = self.model_name, cost.total
        for source, joules in used.joules.items():
            self._energy.labels(m, source).inc(joules)
        self._cpu.labels(m).inc(used.cpu_seconds)
        self._usd.labels(m).inc(cost.usd)
        self._carbon.labels(m).inc(cost.grams_co2e)
        if progress.num_tokens:
            self._joules_per_token.observe(used.energy_joules / progress.num_tokens)
            self._cpu_per_token.observe(used.cpu_seconds / progress.num_tokens)
        return (f", CPU {used.cpu_seconds:.3f}s, energy {used.energy_joules:.3f} J "
                f"({cost.energy_source}), ${cost.usd:.3g}, {cost.grams_co2e:.3g} gCO2e")

    def record_error(self, status_code: int) -> None:
        self._errors.labels(self.model_name, str(status_code)).inc()

    # ---- engine and export ---------------------------------------------------------------
    def update_engine(self, stats: EngineStats | None, in_flight: int = 0) -> None:
        self._in_flight.set(in_flight)
        if stats is None:
            return
        self._running.set(stats.num_running)
        self._waiting.set(stats.num_waiting)
        self._kv_usage.set(stats.kv_cache_usage)
        for metric, now, before in (
            (self._prefix_queries, stats.prefix_cache_queries, self._last.prefix_cache_queries),
            (self._prefix_hits, stats.prefix_cache_hits, self._last.prefix_cache_hits),
            (self._preemptions, stats.num_preemptions, self._last.num_preemptions),
        ):
            metric.labels(self.model_name).inc(max(now - before, 0))
        self._update_spec_decoding(stats.spec_decoding, self._last.spec_decoding)
        self._last = stats

    def _update_spec_decoding(self, now: SpecDecodingStats | None,
                              before: SpecDecodingStats | None) -> None:
        if now is None:
            return
        before = before or SpecDecodingStats(now.num_spec_tokens)
        m = self.model_name
        self._spec_drafts.labels(m).inc(max(now.num_drafts - before.num_drafts, 0))
        self._spec_draft_tokens.labels(m).inc(
            max(now.num_draft_tokens - before.num_draft_tokens, 0))
        self._spec_accepted.labels(m).inc(
            max(now.num_accepted_tokens - before.num_accepted_tokens, 0))
        for pos, (n, b) in enumerate(zip(now.num_accepted_tokens_per_pos,
                                         before.num_accepted_tokens_per_pos)):
            self._spec_accepted_per_pos.labels(m, str(pos)).inc(max(n - b, 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
