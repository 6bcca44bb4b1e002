"""The CPU's identity: named in benchmark results, part of the kernel cache's key."""

from ember import cpuinfo, kernels


def test_cpu_model_is_named():
    assert cpuinfo.cpu_model().strip()


def test_kernel_cache_is_keyed_by_cpu(monkeypatch):
    here = kernels._cache_path("g++")
    monkeypatch.setattr(kernels, "cpu_model", lambda: "Another CPU")
    other_model = kernels._cache_path("g++")
    monkeypatch.setattr(kernels, "cpu_flags", lambda: "avx2 fma")
    other_flags = kernels._cache_path("g++")
    assert len({here, other_model, other_flags}) == 3
