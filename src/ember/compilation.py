"""Graph fusion: `torch.compile` of the decoder layer's two fixed-shape regions.

Each layer runs [norm, QKV, rope] -> paged attention -> [o_proj, residual, norm, MLP,
residual]. The bracketed regions are compiled once for all layers (regional compilation:
the layers share code, their weights are graph inputs) and fuse the many small elementwise
kernels between the matmuls; the paged attention, whose shapes follow each batch's context
lengths, stays eager. Shapes: the token count T is the only varying size; T = 1 (one
sequence decoding) gets a graph of its own, every T >= 2 shares one dynamic-shape graph.
Both are compiled at start (warm-up), and Inductor's on-disk cache makes a second start fast.
"""

from __future__ import annotations

import logging
import os
import time
import types
from pathlib import Path

import torch
from tqdm.auto import tqdm

logger = logging.getLogger("ember")

REGIONS = ("attention_inputs", "attention_output_and_mlp")


def _cache_dir() -> None:
    # Inductor's default lives in /tmp, which many hosts clear: keep compiled kernels with
    # the user's other caches unless they chose a place.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                          str(Path.home() / ".cache" / "ember" / "torchinductor"))


def compile_layers(model: torch.nn.Module, dtype: torch.dtype) -> bool:
    """Compile the regions of every layer of `model` and warm them up; on any failure the
    model stays eager (with a warning). Returns whether the compiled regions are in use."""
    _cache_dir()
    layer_cls = type(model.layers[0])
    compiled = {name: torch.compile(getattr(layer_cls, name), dynamic=None) for name in REGIONS}
    for layer in model.layers:
        for name, fn in compiled.items():
            setattr(layer, name, types.MethodType(fn, layer))
    start = time.perf_counter()
    try:
        _warm_up(model, dtype)
    except Exception as e:  # a compiler bug must never take the engine down
        logger.warning("torch.compile failed (%s: %s); running eager", type(e).__name__,
                       str(e).splitlines()[0] if str(e) else "")
        for layer in model.layers:
            for name in REGIONS:
                delattr(layer, name)
        return False
    logger.info("compiled the decoder layer's regions for T=1 and T>=2 in %.1f s",
                time.perf_counter() - start)
    return True


@torch.inference_mode()
def _warm_up(model: torch.nn.Module, dtype: torch.dtype) -> None:
    layer = model.layers[0]
    cfg = model.config
    device = model.embed_tokens.weight.device
    attn = layer.self_attn
    with tqdm(total=2, desc="Compiling (T=1, T>=2)", leave=False,
              disable=not logger.isEnabledFor(logging.INFO)) as bar:
        for t in (1, 2):
            x = torch.zeros(t, cfg.hidden_size, device=device)  # the float32 residual stream
            positions = torch.zeros(t, dtype=torch.long, device=device)
            rope = model.rotary(positions, dtype)
            o = torch.zeros(t, attn.num_heads * attn.head_dim, dtype=dtype, device=device)
            if t > 1:
                for tensor in (x, *rope, o):
                    torch._dynamo.mark_dynamic(tensor, 0)
            layer.attention_inputs(x, rope)
            layer.attention_output_and_mlp(x, o)
            bar.update(1)
