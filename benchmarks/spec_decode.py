"""Speculative decoding (n-gram prompt lookup, a draft model) against plain decoding, side by
side in one run, on the default model (in-process engines, greedy).

- input-grounded prompts (repeat, correct or edit a given text or function, quote a passage)
  at 1 stream: decode tokens/s (each request's first token to its last) with and without
  speculation, and whether the outputs agree;
- free-form chat at 1 stream (decode tokens/s) and at 16 streams (aggregate tokens/s);
- the verify cost that the adaptive policy rests on: the median step time of B sequences
  that each verify k = 4 drafts, against B plain decodes (B = 1 .. 16);
- draft model: the float32 exactness mode plain against drafted by the int4 default model
  (the same GGUF), free-form chat at 1 stream, for each k of `--draft-k`.

The two engines alternate, each workload `--repeats` times (the best run counts: the machine
is shared). The result JSON names the CPU.

    PYTHONPATH=src python benchmarks/spec_decode.py [--out benchmarks/results/spec_decode.json]
    PYTHONPATH=src python benchmarks/spec_decode.py --only draft_model --draft-k 2,4,6,8 \
        --out benchmarks/results/spec_decode_draft_model.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from ember import LLM, SamplingParams
from ember.cpuinfo import cpu_model
from ember.loading.gguf import default_gguf_path

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
         "prompt_lookup_min": 2}
EXACT = {"quantization": "none", "dtype": "float32"}


def draft_model_config(k: int) -> dict:
    """The default GGUF in its own int4 precision drafting for the float32 exactness mode."""
    return {"method": "draft_model", "model": str(default_gguf_path()), "quantization": "auto",
            "num_speculative_tokens": k}

PASSAGE = (
    "The lighthouse stood on a rock a mile from the shore. Every evening at dusk the keeper "
    "climbed its one hundred and twelve steps, wound the clockwork that turned the lens, "
    "trimmed the wick and lit the lamp. In winter storms the spray reached the gallery, and "
    "he stayed awake until dawn, watching the beam sweep the dark water for ships.")
CODE = '''def parse_config(path):
    settings = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, value = line.split("=", 1)
            settings[key.strip()] = value.strip()
    return settings
'''
TYPOS = ("Teh comittee will meet on Wendesday to discus the new budjet. All memebers are "
         "expected to atend and to bring there notes from the previus meeting.")
GROUNDED = [
    f"Repeat the following passage exactly, word for word:\n\n{PASSAGE}",
    f"Rename the function parse_config to load_settings and return the whole code:\n\n{CODE}",
    f"Correct the spelling mistakes in this text and return the corrected text:\n\n{TYPOS}",
    f"Add a docstring to this function and return the whole function:\n\n{CODE}",
    f"Quote the sentences of this passage that mention the keeper:\n\n{PASSAGE}",
    f"Rewrite this code so that the variable `settings` is called `config`:\n\n{CODE}",
]
CHAT = [
    "Write a short story about a dragon who learns to bake bread.",
    "What are three good habits for staying healthy? Explain each briefly.",
    "Explain how a rainbow forms.",
    "Give me some ideas for a weekend trip in the mountains.",
    "Why is the sky blue?",
    "Describe your ideal city.",
    "What makes a good teacher?",
    "Write a poem about autumn leaves.",
    "How do airplanes stay in the air?",
    "Suggest a recipe for a quick vegetarian dinner.",
    "What is the difference between weather and climate?",
    "Tell me about the history of chess.",
    "How can I learn to play the guitar?",
    "Why do cats purr?",
    "Describe a day in the life of a lighthouse keeper.",
    "What are the benefits of reading books?",
]


def chat_ids(llm: LLM, text: str) -> list[int]:
    tok = llm.get_tokenizer()
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]),
                      add_special_tokens=False)


def timed(llm: LLM, prompts: list[list[int]], max_tokens: int, streams: int
          ) -> tuple[float, float, list[list[int]]]:
    """Greedy generation of every prompt, `streams` at a time: (seconds, decode seconds,
    outputs). Decode seconds: the sum over requests of first to last token (the prompt's
    prefill, the same with or without speculation, left out)."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    outs: list[list[int]] = []
    decode = 0.0
    t0 = time.perf_counter()
    for i in range(0, len(prompts), streams):
        batch = llm.generate(prompts[i:i + streams], params, use_tqdm=False)
        outs += [o.outputs[0].token_ids for o in batch]
        decode += sum(o.metrics.last_token_time - o.metrics.first_token_time for o in batch)
    return time.perf_counter() - t0, decode, outs


def spec_counts(llm: LLM) -> tuple[int, int, int]:
    s = llm.llm_engine.scheduler.spec_stats
    return s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens


def workload(plain: LLM, spec: LLM, prompts: list[list[int]], max_tokens: int, streams: int,
             repeats: int, method: str = "ngram") -> dict:
    """Tokens/s of both engines; at 1 stream also decode tokens/s (after each first token):
    the speedup is the decode one at 1 stream, the aggregate one at more."""
    best = {"plain": float("inf"), method: float("inf")}
    best_decode = dict(best)
    outputs = {}
    before = spec_counts(spec)
    for _ in range(repeats):
        for name, llm in (("plain", plain), (method, spec)):
            seconds, decode, outs = timed(llm, prompts, max_tokens, streams)
            best[name] = min(best[name], seconds)
            best_decode[name] = min(best_decode[name], decode)
            outputs[name] = outs
    drafts, drafted, accepted = (a - b for a, b in zip(spec_counts(spec), before))
    tokens = {k: sum(map(len, v)) for k, v in outputs.items()}
    result = {
        "streams": streams, "prompts": len(prompts), "max_tokens": max_tokens,
        "tokens": tokens,
        "plain_tok_s": tokens["plain"] / best["plain"],
        f"{method}_tok_s": tokens[method] / best[method],
        "identical_outputs": sum(a == b for a, b in zip(outputs["plain"], outputs[method])),
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "mean_acceptance_length": 1 + accepted / drafts if drafts else 0.0,
    }
    result["total_speedup"] = result[f"{method}_tok_s"] / result["plain_tok_s"]
    if streams == 1:
        for name in best_decode:  # each request's first token comes from its prefill
            result[f"{name}_decode_tok_s"] = (tokens[name] - len(prompts)) / best_decode[name]
        result["speedup"] = result[f"{method}_decode_tok_s"] / result["plain_decode_tok_s"]
    else:
        result["speedup"] = result["total_speedup"]
    return result


def step_times(llm: LLM, prompt: list[int], batch: int, verify: bool, k: int, steps: int = 8
               ) -> float:
    """Median time of a step of `batch` decoding copies of `prompt`; with `verify`, only the
    steps in which every sequence verified k drafts count."""
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=steps * (k + 1) + 8, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"cost-{batch}-{verify}-{i}", prompt, params)
    times = []
    while engine.has_unfinished_requests():
        before = spec_counts(llm)[1]
        t0 = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t0
        decoding = all(o.outputs[0].token_ids for o in outs) and len(outs) == batch
        drafted = spec_counts(llm)[1] - before
        if decoding and (drafted == k * batch if verify else drafted == 0):
            times.append(dt)
        if len(times) >= steps:
            for i in range(batch):
                engine.abort_request(f"cost-{batch}-{verify}-{i}")
    return statistics.median(times) if times else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/spec_decode.json")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batches", default="1,2,4,8,16",
                    help="batch sizes of the verify-cost measurement")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--only", choices=("ngram", "draft_model"),
                    help="run one method's workloads (default: both)")
    ap.add_argument("--ngram-k", type=int, default=NGRAM["num_speculative_tokens"],
                    help="num_speculative_tokens of the n-gram measurement")
    ap.add_argument("--draft-k", default="4",
                    help="num_speculative_tokens values of the draft-model measurement")
    args = ap.parse_args()
    results = {
        "cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "model": "default (SmolLM2-135M-Instruct Q4_1 GGUF)", "repeats": args.repeats,
        "command": "PYTHONPATH=src python benchmarks/spec_decode.py " + " ".join(sys.argv[1:]),
        # The machine's 1-minute load average before and after: above ~1.5 on 2 cores, other
        # processes share them and the figures measure the contention too.
        "load_average": {"before": os.getloadavg()[0]},
    }
    if args.only != "draft_model":
        results.update(ngram(args))
    if args.only != "ngram":
        results["draft_model"] = draft_model(args)
    results["load_average"]["after"] = os.getloadavg()[0]
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


def draft_model(args: argparse.Namespace) -> list[dict]:
    """The exactness mode plain against drafted by the int4 default model, chat at 1 stream."""
    plain = LLM(max_model_len=2048, **EXACT)
    chat = [chat_ids(plain, p) for p in CHAT[:4]]
    timed(plain, chat[:1], 16, 1)  # warm-up
    rows = []
    for k in map(int, args.draft_k.split(",")):
        config = draft_model_config(k)
        spec = LLM(max_model_len=2048, **EXACT, speculative_config=config)
        timed(spec, chat[:1], 16, 1)
        row = {"target": "exactness mode (float32)", "draft": "default mode (int4 GGUF)",
               "speculative_config": config,
               **workload(plain, spec, chat, args.max_tokens, 1, args.repeats, "draft_model")}
        print("draft model, chat, 1 stream:", row, flush=True)
        rows.append(row)
        del spec
    return rows


def ngram(args: argparse.Namespace) -> dict:
    """n-gram prompt lookup against plain decoding, default mode."""
    plain = LLM(max_model_len=2048, max_num_seqs=16)
    config = {**NGRAM, "num_speculative_tokens": args.ngram_k}
    spec = LLM(max_model_len=2048, max_num_seqs=16, speculative_config=config)
    # Speculation at every batch size, for the verify-cost measurement.
    forced = LLM(max_model_len=2048, max_num_seqs=16,
                 speculative_config={**config, "disable_by_batch_size": 64})
    grounded = [chat_ids(plain, p) for p in GROUNDED]
    chat = [chat_ids(plain, p) for p in CHAT]
    for llm in (plain, spec, forced):  # warm-up: the compiled graphs' shapes
        timed(llm, grounded[:2], 16, 2)

    results: dict = {"dtype": str(plain.llm_engine.dtype).removeprefix("torch."),
                     "speculative_config": config}
    results["grounded_1_stream"] = workload(plain, spec, grounded, args.max_tokens, 1,
                                            args.repeats)
    print("grounded, 1 stream:", results["grounded_1_stream"], flush=True)
    results["chat_1_stream"] = workload(plain, spec, chat[:4], args.max_tokens, 1, args.repeats)
    print("chat, 1 stream:", results["chat_1_stream"], flush=True)
    results["chat_16_streams"] = workload(plain, spec, chat, args.max_tokens, 16, args.repeats)
    print("chat, 16 streams:", results["chat_16_streams"], flush=True)

    # The verify cost: the sequences copy the passage, so every step drafts k tokens each.
    cost = []
    for batch in map(int, args.batches.split(",")):
        t_plain = step_times(plain, grounded[0], batch, verify=False, k=args.ngram_k)
        t_verify = step_times(forced, grounded[0], batch, verify=True, k=args.ngram_k)
        cost.append({"batch": batch, "plain_step_ms": t_plain * 1e3,
                     "verify_step_ms": t_verify * 1e3, "ratio": t_verify / t_plain,
                     # the acceptance rate at which k drafts pay for their rows
                     "break_even_acceptance": (t_verify / t_plain - 1) / args.ngram_k})
        print("verify cost:", cost[-1], flush=True)
    results["verify_cost"] = cost
    return results


if __name__ == "__main__":
    main()
