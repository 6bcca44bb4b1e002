"""Accuracy of a precision mode: perplexity of a fixed text and greedy top-1 agreement with
a reference (the float32 dense model), both teacher-forced over the same tokens.

    ember bench accuracy [--model M] [--modes none:float32 gguf:auto int8:auto int4:auto]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ember.layers.attention import AttentionMetadata


@torch.inference_mode()
def teacher_forced_logits(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    """float32 logits [T, vocab] of one sequence run as a single causal prefill, with a KV
    cache of its own (the engine's cache, and its prefix cache, are left alone)."""
    device = model.embed_tokens.weight.device
    dtype = model.embed_tokens.weight.dtype
    cfg = model.config
    n = len(token_ids)
    shape = (n, cfg.num_key_value_heads, cfg.head_dim)
    kv = [(torch.zeros(shape, dtype=dtype, device=device),
           torch.zeros(shape, dtype=dtype, device=device)) for _ in range(cfg.num_hidden_layers)]
    slots = torch.arange(n, device=device)
    meta = AttentionMetadata.build(range(n), [n], [n], [[0]], n).to(device)  # block 0: n slots
    hidden = model(torch.tensor(token_ids, device=device), slots, kv, meta)
    return model.compute_logits(hidden)


@dataclass
class Accuracy:
    perplexity: float
    top1_agreement: float | None  # against the reference's argmax; None without one


def score(logits: torch.Tensor, token_ids: list[int],
          reference: torch.Tensor | None = None) -> Accuracy:
    """Perplexity of `token_ids[1:]` under `logits[:-1]`; argmax agreement with `reference`."""
    targets = torch.tensor(token_ids[1:], device=logits.device)
    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), targets)
    agree = None
    if reference is not None:
        agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return Accuracy(math.exp(nll.item()), agree)


def add_args(p) -> None:
    p.add_argument("--modes", nargs="+", default=["none:float32", "auto:auto", "int8:auto",
                                                    "int4:auto", "none:bfloat16"],
                   help="QUANTIZATION:DTYPE pairs to compare; the first is the reference")
    p.add_argument("--text", default=None, help="a text file (default: the tests' fixed text)")
    p.add_argument("--output-json", default=None, help="write the results here as JSON")


def main(args, config) -> int:
    import dataclasses
    import json
    from pathlib import Path

    from ember.loading.loader import load_model_from_config
    from ember.quantization import weight_bytes

    text_file = args.text or Path(__file__).parents[3] / "tests" / "data" / "perplexity.txt"
    text = Path(text_file).read_text()
    reference, ids, results = None, None, []
    for mode in args.modes:
        quantization, dtype = mode.split(":")
        cfg = dataclasses.replace(config, quantization=quantization, dtype=dtype)
        loaded = load_model_from_config(cfg, torch.device("cpu") if config.device == "auto"
                            else torch.device(config.device))
        ids = ids or loaded.checkpoint.tokenizer.encode(text)
        logits = teacher_forced_logits(loaded.model, ids)
        reference = logits if reference is None else reference
        acc = score(logits, ids, reference)
        results.append({"mode": mode, "quantization": loaded.quantization,
                        "dtype": str(loaded.dtype).removeprefix("torch."),
                        "weight_mb": weight_bytes(loaded.model) / 1e6,
                        "perplexity": acc.perplexity, "top1_agreement": acc.top1_agreement})
        print(f"{mode:>16}: perplexity {acc.perplexity:.3f}, top-1 agreement with "
              f"{args.modes[0]} {acc.top1_agreement:.3f}, weights {results[-1]['weight_mb']:.0f} MB")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(
            {"tokens": len(ids), "reference": args.modes[0], "results": results}, indent=2))
    return 0
