"""What each request costs: CPU time, wall time, energy, dollars and carbon.

Every engine step is metered (process CPU time, wall time, energy counters) and its usage is
split between the requests it served by their share of its tokens, prompt and generated
tokens kept apart. While the engine is busy the metered intervals are contiguous (one step's
ends where the next one's starts), so the time spent between steps on a request's behalf
(delivering outputs, admitting requests, the HTTP side in the same process) is charged too:
the per-request figures add up to the process's CPU time while it serves. Idle time is
charged to nobody.

Energy comes from the best source there is, each figure labelled with it:
- `rapl`: the CPU packages' counters in /sys/class/powercap (intel-rapl, also on AMD Zen),
  where readable; they measure the whole package, other processes included;
- `nvml`: the GPU's own energy counter on CUDA (the optional `pynvml` module);
- `estimate`: CPU time x `--watts-per-core`, where RAPL cannot be read.
Dollars are the machine's price for the wall time a request held it (`--price-per-hour`),
carbon is energy x grid intensity (`--carbon-intensity`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ember.config import DEFAULT_PRICE_PER_CPU_HOUR, EngineConfig

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("ember")

POWERCAP = Path("/sys/class/powercap")


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class CostRates:
    """The conversion factors: one per flag, resolved (no None)."""

    watts_per_core: float
    price_per_hour: float  # $ per hour of the machine
    carbon_intensity: float  # gCO2e per kWh

    @classmethod
    def from_config(cls, config: EngineConfig) -> "CostRates":
        price = config.price_per_hour
        if price is None:
            price = DEFAULT_PRICE_PER_CPU_HOUR * available_cpus()
        return cls(config.watts_per_core, price, config.carbon_intensity)

    def usd(self, wall_seconds: float) -> float:
        return wall_seconds * self.price_per_hour / 3600

    def grams_co2e(self, joules: float) -> float:
        return joules / 3.6e6 * self.carbon_intensity


@dataclass
class Usage:
    """Resources used: by one request in one phase, by one step, or in total."""

    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    joules: dict[str, float] = field(default_factory=dict)  # energy by source

    @property
    def energy_joules(self) -> float:
        return sum(self.joules.values())

    def add(self, other: "Usage", share: float = 1.0) -> None:
        self.cpu_seconds += other.cpu_seconds * share
        self.wall_seconds += other.wall_seconds * share
        for source, j in other.joules.items():
            self.joules[source] = self.joules.get(source, 0.0) + j * share


@dataclass
class RequestUsage:
    """What one sequence has used so far, its prompt's processing and its generation apart."""

    prompt: Usage = field(default_factory=Usage)
    generation: Usage = field(default_factory=Usage)


@dataclass
class RequestCost:
    """A request's cost (all its sequences), as it travels on RequestMetrics."""

    prompt: Usage
    generation: Usage
    usd: float
    grams_co2e: float

    @property
    def total(self) -> Usage:
        total = Usage()
        total.add(self.prompt)
        total.add(self.generation)
        return total

    @property
    def energy_source(self) -> str:
        """The sources of the energy figure, e.g. `rapl` or `estimate+nvml`."""
        return "+".join(sorted(self.total.joules)) or "none"


class RaplReader:
    """The CPU packages' energy counters (microjoules, wrapping at max_energy_range_uj)."""

    def __init__(self, zones: list[tuple[Path, int]]) -> None:
        self.zones = zones  # (energy_uj file, its wrap range)

    @classmethod
    def open(cls, root: Path = POWERCAP) -> "RaplReader | None":
        """The reader, or None where no package counter is readable (no RAPL, or not root:
        energy_uj is readable by root only since Linux 5.10)."""
        zones = []
        for zone in sorted(root.glob("intel-rapl:*")):
            if zone.name.count(":") != 1:
                continue  # a sub-zone (core, uncore, dram): inside its package's figure
            try:
                if not (zone / "name").read_text().strip().startswith("package"):
                    continue  # psys would count the packages twice
                wrap = int((zone / "max_energy_range_uj").read_text())
                int((zone / "energy_uj").read_text())
            except (OSError, ValueError) as e:
                logger.info("RAPL %s is not readable (%s): energy is estimated", zone, e)
                return None
            zones.append((zone / "energy_uj", wrap))
        return cls(zones) if zones else None

    def read(self) -> list[int] | None:
        try:
            return [int(path.read_text()) for path, _ in self.zones]
        except (OSError, ValueError):
            return None  # a counter became unreadable: this step's energy is estimated

    def joules(self, before: list[int], after: list[int]) -> float:
        total = 0
        for (_, wrap), b, a in zip(self.zones, before, after):
            total += a - b if a >= b else a + wrap - b  # the counter wrapped once
        return total / 1e6


class NvmlReader:
    """A GPU's total-energy counter (millijoules, Volta and newer), through pynvml."""

    def __init__(self, handle, nvml) -> None:
        self.handle, self.nvml = handle, nvml

    @classmethod
    def open(cls, device: "torch.device") -> "NvmlReader | None":
        if device.type != "cuda":
            return None
        try:
            import pynvml
        except ImportError:
            logger.info("pynvml is not installed: the GPU's energy is not measured")
            return None
        try:
            import torch

            pynvml.nvmlInit()
            bus_id = getattr(torch.cuda.get_device_properties(device), "pci_bus_id", None)
            if bus_id:
                handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)
            else:
                handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except Exception as e:  # NVML missing, or a GPU without the counter
            logger.info("NVML energy counter unavailable (%s)", e)
            return None
        return cls(handle, pynvml)

    def read(self) -> int | None:
        try:
            return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except Exception:
            return None


@dataclass(frozen=True)
class Reading:
    cpu: float  # process CPU seconds, every thread
    wall: float
    rapl: list[int] | None
    nvml: int | None


class Charged(Protocol):
    """What a step's request shows the meter (an engine Request)."""

    num_prompt_tokens: int
    cost: RequestUsage


class CostMeter:
    """Meters the engine's steps and charges them to their requests (one per engine)."""

    def __init__(self, rates: CostRates, device: "torch.device") -> None:
        self.rates = rates
        self.rapl = RaplReader.open()
        self.nvml = NvmlReader.open(device)
        self.total = Usage()  # everything charged so far
        self._last: Reading | None = None  # the end of the last step, while busy

    def read(self) -> Reading:
        return Reading(time.process_time(), time.perf_counter(),
                       self.rapl.read() if self.rapl else None,
                       self.nvml.read() if self.nvml else None)

    def usage(self, start: Reading, end: Reading) -> Usage:
        cpu = end.cpu - start.cpu
        joules = {}
        if start.rapl is not None and end.rapl is not None:
            joules["rapl"] = self.rapl.joules(start.rapl, end.rapl)  # type: ignore[union-attr]
        else:
            joules["estimate"] = cpu * self.rates.watts_per_core
        if start.nvml is not None and end.nvml is not None:
            joules["nvml"] = (end.nvml - start.nvml) / 1e3
        return Usage(cpu, end.wall - start.wall, joules)

    def charge(self, step_start: Reading, scheduled: Sequence[tuple[Charged, int, int]],
               busy: bool) -> None:
        """Charge the interval since the last busy step's end (else since `step_start`) to
        the step's requests, each with the position its tokens started at and the tokens it
        computed (drafted ones included). `busy`: requests remain, so the next step's
        interval starts where this one ends."""
        end = self.read()
        used = self.usage(self._last or step_start, end)
        self._last = end if busy else None
        self.total.add(used)
        total_tokens = sum(n for _, _, n in scheduled)
        for req, first, n in scheduled:
            prompt = min(max(req.num_prompt_tokens - first, 0), n)
            if prompt:
                req.cost.prompt.add(used, prompt / total_tokens)
            if n - prompt:
                req.cost.generation.add(used, (n - prompt) / total_tokens)

    def cost(self, usages: Sequence[RequestUsage]) -> RequestCost:
        prompt, generation = Usage(), Usage()
        for u in usages:
            prompt.add(u.prompt)
            generation.add(u.generation)
        wall = prompt.wall_seconds + generation.wall_seconds
        joules = prompt.energy_joules + generation.energy_joules
        return RequestCost(prompt, generation, self.rates.usd(wall),
                           self.rates.grams_co2e(joules))


def per_output_token(cpu_seconds: float, energy_joules: float, usd: float, grams_co2e: float,
                     output_tokens: int, energy_source: str) -> dict[str, float | str | int]:
    """A run's cost per output token (the prompts' share included), as the benchmarks
    report it."""
    n = max(output_tokens, 1)
    return {"output_tokens": output_tokens, "energy_source": energy_source,
            "joules_per_token": energy_joules / n, "cpu_seconds_per_token": cpu_seconds / n,
            "usd_per_million_tokens": usd / n * 1e6,
            "grams_co2e_per_million_tokens": grams_co2e / n * 1e6}


def format_per_token(cost: dict[str, float | str | int]) -> str:
    return (f"{cost['joules_per_token']:.4g} J/token ({cost['energy_source']}), "
            f"{cost['cpu_seconds_per_token']:.4g} CPU-s/token, "
            f"${cost['usd_per_million_tokens']:.4g}/Mtoken, "
            f"{cost['grams_co2e_per_million_tokens']:.4g} gCO2e/Mtoken")
