"""llguidance vs xgrammar on the default model's tokenizer: what ember's grammar engine was
chosen by (docs/benchmarks.md, "Grammar engine").

For a ~10-field JSON schema (the one of benchmarks/structured.py) each engine is timed on:
- compiling the schema against the 49k vocabulary (a fresh compiler, so no cache helps);
- computing one row's token bitmask at each step of a valid JSON document, feeding the
  document's own tokens (the mean and p99 per token, and the worst step).

    PYTHONPATH=src python benchmarks/grammar_engines.py [--xgrammar-path DIR] [--out FILE]

xgrammar is not one of ember's dependencies: install it anywhere (`pip install --target DIR
xgrammar apache-tvm-ffi --no-deps`) and pass that folder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

from structured_schema import EXAMPLE_DOCUMENT, SCHEMA  # beside this script

from ember.cpuinfo import cpu_model


def _stats(times: list[float]) -> dict[str, float]:
    times_us = sorted(t * 1e6 for t in times)
    return {"mean_us": round(statistics.mean(times_us), 1),
            "p50_us": round(times_us[len(times_us) // 2], 1),
            "p99_us": round(times_us[int(len(times_us) * 0.99)], 1),
            "max_us": round(times_us[-1], 1)}


def bench_llguidance(tok_json: str, vocab: int, eos: int, doc_ids: list[int]) -> dict:
    import llguidance
    import llguidance.torch as llt

    t0 = time.perf_counter()
    lltok = llguidance.LLTokenizer(tok_json, n_vocab=vocab, eos_token=eos)
    tokenizer_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        SCHEMA, defaults={"whitespace_flexible": False})
    matcher = llguidance.LLMatcher(lltok, grammar)
    compile_s = time.perf_counter() - t0
    assert not matcher.is_error(), matcher.get_error()
    mask = llt.allocate_token_bitmask(1, vocab)
    times = []
    for t in doc_ids:
        t0 = time.perf_counter()
        llt.fill_next_token_bitmask(matcher, mask, 0)
        times.append(time.perf_counter() - t0)
        assert matcher.consume_token(t), matcher.get_error()
    return {"version": version("llguidance"),
            "tokenizer_init_s": round(tokenizer_s, 3), "compile_ms": round(compile_s * 1e3, 2),
            "mask": _stats(times)}


def bench_xgrammar(tok_json: str, vocab: int, eos: int, doc_ids: list[int]) -> dict:
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer as HFTokenizer

    hf = PreTrainedTokenizerFast(tokenizer_object=HFTokenizer.from_str(tok_json))
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[eos])
    tokenizer_s = time.perf_counter() - t0
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False,
                                           separators=(",", ":"))
    compile_s = time.perf_counter() - t0
    matcher = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, vocab)
    times = []
    for t in doc_ids:
        t0 = time.perf_counter()
        matcher.fill_next_token_bitmask(mask, 0)
        times.append(time.perf_counter() - t0)
        assert matcher.accept_token(t)
    return {"version": version("xgrammar"), "tokenizer_init_s": round(tokenizer_s, 3),
            "compile_ms": round(compile_s * 1e3, 2), "mask": _stats(times)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--xgrammar-path", help="a folder holding xgrammar (not an ember dependency)")
    ap.add_argument("--out", default="benchmarks/results/grammar_engines.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from ember.loading.loader import open_model

    ckpt, _ = open_model(None, torch.float32, None)
    tok = ckpt.tokenizer
    vocab = ckpt.config.vocab_size
    eos = tok.eos_token_ids[0]
    tok_json = tok.backend.to_str()
    doc_ids = tok.encode(json.dumps(EXAMPLE_DOCUMENT, separators=(",", ":")),
                         add_special_tokens=False) + [eos]
    result = {"cpu": cpu_model(), "load_average_at_start": os.getloadavg()[0],
              "command": "PYTHONPATH=src python benchmarks/grammar_engines.py "
                         "--xgrammar-path DIR",
              "vocab_size": vocab, "document_tokens": len(doc_ids),
              "threads": 1, "llguidance": bench_llguidance(tok_json, vocab, eos, doc_ids)}
    if args.xgrammar_path:
        sys.path.insert(0, args.xgrammar_path)
        result["xgrammar"] = bench_xgrammar(tok_json, vocab, eos, doc_ids)
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
