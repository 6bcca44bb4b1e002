"""A request's cost on the wire, beside OpenAI's bodies, never inside them.

- Every completion response carries `x-ember-*` headers: CPU seconds, wall seconds, energy
  (joules, and its source: `rapl`, `nvml`, `estimate`, joined by `+`), dollars and grams of
  CO2e. A whole response's headers cover the whole request (`x-ember-cost-scope: request`).
- A stream's headers leave before its tokens, so they cover the prompt's processing and the
  first token (`x-ember-cost-scope: first-token`); the whole request's figures close the
  stream as an SSE comment line before `data: [DONE]`:
      : x-ember-cost {"cpu_seconds": ..., "energy_joules": ..., ...}
  SSE clients skip comment lines (the event-stream format's rule; openai-python and browsers
  do), so no chunk changes shape. The per-request log line and /metrics have them too.
"""

from __future__ import annotations

import json

from ember.engine.cost import RequestCost

COMMENT_TAG = "x-ember-cost"


def cost_fields(cost: RequestCost) -> dict[str, float | str]:
    total = cost.total
    return {"cpu_seconds": round(total.cpu_seconds, 6),
            "wall_seconds": round(total.wall_seconds, 6),
            "energy_joules": round(total.energy_joules, 6),
            "energy_source": cost.energy_source,
            "cost_usd": float(f"{cost.usd:.6g}"),
            "carbon_grams": float(f"{cost.grams_co2e:.6g}")}


def cost_headers(cost: RequestCost | None, scope: str) -> dict[str, str]:
    """`scope`: `request` (the whole request) or `first-token` (a stream's start)."""
    if cost is None:
        return {}
    headers = {f"x-ember-{k.replace('_', '-')}": str(v) for k, v in cost_fields(cost).items()}
    headers["x-ember-cost-scope"] = scope
    return headers


def cost_comment(cost: RequestCost | None) -> str:
    if cost is None:
        return ""
    return f": {COMMENT_TAG} {json.dumps(cost_fields(cost), separators=(',', ':'))}\n\n"


def parse_cost_comment(line: str) -> dict[str, float | str] | None:
    """The figures of a stream's closing comment line, or None for any other line."""
    prefix = f": {COMMENT_TAG} "
    return json.loads(line[len(prefix):]) if line.startswith(prefix) else None
