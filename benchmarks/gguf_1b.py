"""GGUFs at the scale people run on CPUs: Llama-3.2-1B's shape (or 3B's) with random weights,
quantized by llama.cpp's own quantizer.

    .venv/bin/python benchmarks/gguf_1b.py [--shape 1b|3b] [--types Q4_0 Q4_K_M] [--out DIR]

Writes <out>/llama-<shape>-random.F16.gguf (random normal weights, std 0.02; unit norms; the
default model's tokenizer, SmolLM2's 49k byte-level BPE, so prompts are the same ids for
every engine), then each type with `llama_cpp.llama_model_quantize` (llama-cpp-python, the
build `make compare` makes): llama.cpp's own choice of types per tensor (Q4_K_M: Q4_K with
Q6_K for some V / down projections and the tied embedding; Q4_0: Q4_0 with a Q6_K embedding).
Random weights make garbage text and real work. Benchmark a file with
`benchmarks/compare.py --model <file>`.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

ROOT = Path(__file__).resolve().parent.parent
LLAMA_BIN = ROOT / ".peers" / "llama.cpp-build" / "bin"

# hidden, layers, heads, KV heads, FFN (tied embeddings, rope theta 500000, head_dim 64 / 128)
SHAPES = {"1b": (2048, 16, 32, 8, 8192), "3b": (3072, 28, 24, 8, 8192)}
FTYPES = {"Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
          "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M"}


def write_f16(path: Path, shape: str, seed: int = 0) -> None:
    from ember.loading.gguf import default_gguf_path

    hidden, layers, heads, kv_heads, ffn = SHAPES[shape]
    head_dim = hidden // heads
    source = GGUFReader(default_gguf_path())
    w = GGUFWriter(str(path), "llama")
    w.add_name(f"llama-{shape}-random")
    w.add_file_type(1)  # mostly F16
    w.add_block_count(layers)
    w.add_context_length(8192)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    vocab = 0
    for name, field in source.fields.items():
        if name.startswith("tokenizer."):
            value = field.contents()
            sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            w.add_key_value(name, value, field.types[0], sub)
            if name == "tokenizer.ggml.tokens":
                vocab = len(value)
    rng = np.random.default_rng(seed)

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    w.add_tensor("token_embd.weight", matrix(vocab, hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", matrix(heads * head_dim, hidden))
        w.add_tensor(f"blk.{i}.attn_k.weight", matrix(kv_heads * head_dim, hidden))
        w.add_tensor(f"blk.{i}.attn_v.weight", matrix(kv_heads * head_dim, hidden))
        w.add_tensor(f"blk.{i}.attn_output.weight", matrix(hidden, heads * head_dim))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", matrix(ffn, hidden))
        w.add_tensor(f"blk.{i}.ffn_up.weight", matrix(ffn, hidden))
        w.add_tensor(f"blk.{i}.ffn_down.weight", matrix(hidden, ffn))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize(src: Path, dst: Path, kind: str, threads: int) -> None:
    os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(LLAMA_BIN))
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[kind])
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                        ctypes.byref(params))
    if rc != 0:
        sys.exit(f"llama_model_quantize failed ({rc}) for {dst}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--types", nargs="+", choices=sorted(FTYPES), default=["Q4_0", "Q4_K_M"])
    p.add_argument("--out", default=str(Path.home() / ".cache" / "ember" / "bench-models"))
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = out / f"llama-{args.shape}-random.F16.gguf"
    if not src.exists():
        start = time.perf_counter()
        write_f16(src.with_suffix(".tmp"), args.shape)
        src.with_suffix(".tmp").rename(src)
        print(f"wrote {src} ({src.stat().st_size / 1e9:.2f} GB) in "
              f"{time.perf_counter() - start:.0f} s")
    for kind in args.types:
        dst = out / f"llama-{args.shape}-random.{kind}.gguf"
        if not dst.exists():
            start = time.perf_counter()
            quantize(src, dst, kind, args.threads)
            print(f"quantized {dst} ({dst.stat().st_size / 1e9:.2f} GB) in "
                  f"{time.perf_counter() - start:.0f} s")
        print(dst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
