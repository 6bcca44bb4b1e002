"""The request router's decisions, counted for the ingress's /metrics.

A module of its own because Ray Serve pickles a request router's defining module by value
into the process that routes (the one holding the deployment handle: the ingress). Counters
defined beside the router would be private copies there; this module is imported, so the
router and the ingress's /metrics share its counter.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest

CACHE_AFFINE = "cache_affine"
LOAD_BALANCED = "load_balanced"

_REGISTRY = CollectorRegistry()
_DECISIONS = Counter(
    "ember:router_decisions", "Requests routed, by how the replica was chosen: cache_affine (the "
    "replica that served the longest shared prefix) or load_balanced (power of two choices, or, "
    "with no shared prefix, the replica whose cache holds least).", ["decision"],
    registry=_REGISTRY)
for _decision in (CACHE_AFFINE, LOAD_BALANCED):  # both exported from the start, at 0
    _DECISIONS.labels(_decision)


def count(decision: str) -> None:
    _DECISIONS.labels(decision).inc()


def render() -> bytes:
    """The counters in Prometheus's text format."""
    return generate_latest(_REGISTRY)
