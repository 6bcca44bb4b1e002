"""Cost accounting (engine/cost.py): energy counters, and the engine's per-request charges
adding up to what the process used."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ember.config import EngineConfig
from ember.engine.cost import CostRates, RaplReader, Usage
from ember.errors import ConfigError
from ember.sampling_params import SamplingParams


def _zone(root: Path, name: str, label: str, energy: int | None, wrap: int = 1000) -> Path:
    zone = root / name
    zone.mkdir(parents=True)
    (zone / "name").write_text(label + "\n")
    (zone / "max_energy_range_uj").write_text(f"{wrap}\n")
    if energy is None:
        (zone / "energy_uj").mkdir()  # unreadable as a file (permissions do not stop root)
    else:
        (zone / "energy_uj").write_text(f"{energy}\n")
    return zone


def test_rapl_sums_packages_and_handles_wrap_around(tmp_path):
    p0 = _zone(tmp_path, "intel-rapl:0", "package-0", 900, wrap=1000)
    p1 = _zone(tmp_path, "intel-rapl:1", "package-1", 5_000, wrap=10**9)
    _zone(tmp_path, "intel-rapl:0:0", "core", 123)  # a sub-zone: inside package-0
    _zone(tmp_path, "intel-rapl:2", "psys", 77)  # the platform: would count twice
    rapl = RaplReader.open(tmp_path)
    assert rapl is not None and len(rapl.zones) == 2
    before = rapl.read()
    (p0 / "energy_uj").write_text("100\n")  # wrapped: 900 -> 1000 == 0 -> 100
    (p1 / "energy_uj").write_text("2005000\n")
    after = rapl.read()
    assert rapl.joules(before, after) == pytest.approx((200 + 2_000_000) / 1e6)


def test_rapl_unreadable_means_estimate(tmp_path):
    _zone(tmp_path, "intel-rapl:0", "package-0", None)
    assert RaplReader.open(tmp_path) is None
    assert RaplReader.open(tmp_path / "absent") is None


def test_rapl_counter_lost_midway_reads_none(tmp_path):
    zone = _zone(tmp_path, "intel-rapl:0", "package-0", 10)
    rapl = RaplReader.open(tmp_path)
    (zone / "energy_uj").unlink()
    assert rapl.read() is None


def test_rates_and_flags():
    rates = CostRates(watts_per_core=2.0, price_per_hour=3.6, carbon_intensity=500.0)
    assert rates.usd(10.0) == pytest.approx(0.01)
    assert rates.grams_co2e(3.6e6) == pytest.approx(500.0)
    default = CostRates.from_config(EngineConfig())
    assert default.price_per_hour > 0 and default.watts_per_core == 3.5
    for bad in ({"watts_per_core": -1.0}, {"price_per_hour": float("nan")},
                {"carbon_intensity": -5.0}):
        with pytest.raises(ConfigError):
            EngineConfig(**bad)


@pytest.fixture(scope="module")
def engine():
    from ember.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(kv_cache_memory=100_000_000, max_num_batched_tokens=64,
                                  enforce_eager=True))


def test_engine_charges_every_step_to_its_requests(engine):
    """A batch with a chunked prompt: every request is charged for its prompt and its
    generation apart, and the charges add up to the meter's total and to the process's CPU
    time over the run (the loop runs on this thread: nothing else happens meanwhile)."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [list(range(100, 100 + n)) for n in (8, 150, 30)]  # 150: chunked over 3 steps
    total_before = Usage()
    total_before.add(engine.cost.total)
    cpu0 = time.process_time()
    for i, p in enumerate(prompts):
        engine.add_request(f"cost-{i}", p, params)
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    cpu = time.process_time() - cpu0
    costs = [finals[f"cost-{i}"].metrics.cost for i in range(3)]
    for c in costs:
        assert c.prompt.cpu_seconds > 0 and c.generation.cpu_seconds > 0
        assert c.prompt.wall_seconds > 0 and c.generation.wall_seconds > 0
        assert c.energy_source in ("estimate", "rapl")
        assert c.total.energy_joules > 0 and c.usd > 0 and c.grams_co2e > 0
        if c.energy_source == "estimate":
            assert c.total.energy_joules == pytest.approx(c.total.cpu_seconds * 3.5)
    # The longest prompt costs the most to prefill.
    assert costs[1].prompt.cpu_seconds > costs[0].prompt.cpu_seconds
    charged = sum(c.total.cpu_seconds for c in costs)
    assert charged == pytest.approx(engine.cost.total.cpu_seconds - total_before.cpu_seconds)
    assert charged == pytest.approx(cpu, rel=0.10)
