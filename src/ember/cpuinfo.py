"""What CPU this is: its model name and instruction-set flags, from /proc/cpuinfo.

Benchmark results name the CPU they ran on, and the kernel cache is keyed by it: kernels built
with -march=native for one CPU must not be loaded on another that shares the cache folder.
"""

from __future__ import annotations

import functools
import platform


@functools.cache
def _fields() -> dict[str, str]:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():  # the first processor's block
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def cpu_model() -> str:
    """The CPU's model name, family/model numbers and widest vector extension, e.g.
    "AMD EPYC (family 25 model 1, AVX2)": a VM may name only the vendor."""
    info = _fields()
    name = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" not in info:
        return name
    flags = set(info.get("flags", "").split())
    vector = ("AVX512-BF16" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags
              else "AVX2" if "avx2" in flags else "no AVX2")
    return f"{name} (family {info['cpu family']} model {info.get('model')}, {vector})"


def cpu_flags() -> str:
    """The CPU's feature flags, space-separated and sorted ("" where unknown)."""
    return " ".join(sorted(_fields().get("flags", "").split()))
