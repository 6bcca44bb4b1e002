"""Measurement tools: `ember bench latency | accuracy` (and the benchmarks/ scripts)."""
