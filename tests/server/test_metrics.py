"""The Prometheus export of the engine's cumulative counters (model-free)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from ember.bench.serve import SPEC_DECODE_COUNTERS, spec_decode_summary
from ember.engine.llm_engine import EngineStats
from ember.engine.spec_decode.metrics import SpecDecodingStats
from ember.server.metrics import ServerMetrics


def samples(metrics: ServerMetrics) -> dict[tuple[str, str], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            if s.name.endswith("_total") and "spec_decode" in s.name:
                out[(s.name, s.labels.get("position", ""))] = s.value
    return out


def test_spec_decode_counters_export_the_engines_growth():
    metrics = ServerMetrics("m")
    stats = SpecDecodingStats(3)
    stats.observe_draft(3, 2)
    metrics.update_engine(EngineStats(1, 0, 10, 9, 0.1, 0, 0, 0, spec_decoding=stats))
    later = SpecDecodingStats(3)
    later.add(stats)
    later.observe_draft(3, 0)
    later.observe_draft(2, 1)
    metrics.update_engine(EngineStats(1, 0, 10, 9, 0.1, 0, 0, 0, spec_decoding=later))
    got = samples(metrics)
    assert got[("ember:spec_decode_num_drafts_total", "")] == 3
    assert got[("ember:spec_decode_num_draft_tokens_total", "")] == 8
    assert got[("ember:spec_decode_num_accepted_tokens_total", "")] == 3
    assert [got[("ember:spec_decode_num_accepted_tokens_per_pos_total", str(p))]
            for p in range(3)] == [2, 1, 0]
    assert later.acceptance_rate == 3 / 8 and later.mean_acceptance_length == 2.0


def test_bench_serve_reads_acceptance_from_the_counters():
    before = dict.fromkeys(SPEC_DECODE_COUNTERS, 0.0)
    after = {"spec_decode_num_drafts": 4.0, "spec_decode_num_draft_tokens": 16.0,
             "spec_decode_num_accepted_tokens": 12.0}
    summary = spec_decode_summary(before, after)
    assert summary["acceptance_rate"] == 0.75 and summary["mean_acceptance_length"] == 4.0
    assert spec_decode_summary(None, after) is None
