"""Graph fusion: `torch.compile` of the decoder layer, compiled once and reused by every layer.

The paged attention is an opaque custom op inside the layer's graph (see `layers.attention`),
so one graph serves every batch of the same token count T, decode or prefill or both: T is
the only varying size. T = 1 (one sequence decoding, the latency case) gets a graph of its
own, T >= 2 one dynamic-shape graph (two without ember's CPU kernels: split at 16 rows, where
int4 layers switch to dequantize + dense GEMM). On CPU with ember's kernels every step goes
through the fused C++ call instead (`models.fused_decode`) and nothing is compiled; the graphs
serve the other cases (CUDA, layers the fused call does not run). All are compiled at start (warm-up, with a
progress bar), and Inductor's on-disk cache makes a second start fast. The layers share the
compiled code (regional compilation: their weights are graph inputs), so compile time does
not grow with depth; a model with sliding-window layers beside global ones (Gemma 3) gets one
variant of the graph for each (the window is a constant of the attention op), both warmed up.
What the graph fuses: norms (QK-norm, Gemma's four), rotary, residual adds, the gated MLP's
activation and dtype casts around the matmuls (ATen's int4/int8/bf16 kernels) and the
attention op.
"""

from __future__ import annotations

import logging
import os
import time
import types
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ember import kernels
from ember.layers.attention import AttentionMetadata

logger = logging.getLogger("ember")


def _cache_dir() -> None:
    # Inductor's default lives in /tmp, which many hosts clear: keep compiled kernels with
    # the user's other caches unless they chose a place.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                          str(Path.home() / ".cache" / "ember" / "torchinductor"))


# Per-call overhead matters: the layer's graph runs 30 times a decode step. A C++ wrapper
# instead of Inductor's Python one, and no debug checks of the extern kernels' output strides
# (what each saves: docs/benchmarks.md).
INDUCTOR_OPTIONS = {"cpp_wrapper": True, "size_asserts": False}


def compile_model(model: torch.nn.Module, kv_caches: list) -> bool:
    """Compile the decoder layers of `model` and warm them up on `kv_caches` (slots 0 and 1
    are written: the caller zeroes blocks as it hands them out); on any failure the model
    stays eager (with a warning). Returns whether the compiled layers are in use."""
    _cache_dir()
    compiled = torch.compile(type(model.layers[0]).forward, options=INDUCTOR_OPTIONS)

    def forward(layer, x, rope, kv_cache):
        # Batches of 2+ tokens share one graph, dynamic in T: said up front, or Dynamo would
        # specialize the first graph on the warm-up's T and recompile (~1 s) on the next T.
        if x.shape[0] >= 2:
            for t in (x, *rope):
                torch._dynamo.maybe_mark_dynamic(t, 0)
        return compiled(layer, x, rope, kv_cache)

    for layer in model.layers:
        layer.forward = types.MethodType(forward, layer)
    start = time.perf_counter()
    try:
        _warm_up(model, kv_caches)
    except Exception as e:  # a compiler bug must never take the engine down
        logger.warning("torch.compile failed (%s: %s); running eager", type(e).__name__,
                       str(e).splitlines()[0] if str(e) else "")
        for layer in model.layers:
            del layer.forward
        return False
    logger.info("compiled the decoder layer for %s tokens in %.1f s",
                _describe(warm_up_tokens(model)), time.perf_counter() - start)
    return True


# Token counts that warm up every graph the model will run: one decoding sequence; a small
# batch (the dynamic graph for T >= 2); without ember's CPU kernels, a batch large enough for
# the dense path of the int4 layers (T >= 16, see `quantization.int4`), which Dynamo then keeps
# as a graph of its own.
def warm_up_tokens(model: torch.nn.Module) -> tuple[int, ...]:
    return (1, 2) if kernels.available(model.embed_tokens.weight.device) else (1, 2, 64)


def _describe(sizes: tuple[int, ...]) -> str:
    return ", ".join({1: "T=1", 2: "T>=2" if 64 not in sizes else "T=2..15", 64: "T>=16"}[t]
                     for t in sizes)


@torch.inference_mode()
def _warm_up(model: torch.nn.Module, kv_caches: list) -> None:
    device = model.embed_tokens.weight.device
    sizes = [t for t in warm_up_tokens(model) if t <= kv_caches[0][0].shape[0]]
    with tqdm(total=len(sizes), desc=f"Compiling (T={', '.join(map(str, sizes))})", leave=False,
              disable=not logger.isEnabledFor(logging.INFO)) as bar:
        for t in sizes:
            ids = torch.zeros(t, dtype=torch.long, device=device)
            positions = torch.arange(t, device=device)
            # One sequence of t tokens in block 0, of t slots (T is a dynamic size: see
            # `compile_model`; t = 1 is a decode step).
            meta = AttentionMetadata.build(range(t), [t], [t], [[0]], t).to(device)
            model(ids, positions, kv_caches, meta)
            bar.update(1)
