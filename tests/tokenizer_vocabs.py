"""The GGUF vocabularies the tokenizer tests compare against llama.cpp, and the text set.

Real files where the repository has them (the default model's SmolLM2 vocabulary, `smollm`;
Gemma 3 270M's SentencePiece vocabulary), and the SmolLM2 vocabulary written again under the
other byte-level pre-tokenizers (`llama-bpe`, `qwen2`, `gpt-2`, `default`): the merges are
the same, the splitting differs, which is what these vocabularies' ids depend on.

`PYTHONPATH=src:tests python tests/tokenizer_vocabs.py` (with llama-cpp-python importable:
`make compare` builds it) writes tests/llama_cpp_tokens.json, the reference ids the tests read.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf

TEXTS = [
    "Hello world! How are you doing today?",
    "The capital of France is Paris, and it's lovely in the spring.",
    "Die Straße führt über die Brücke; Größe und Übermut.",
    "我们今天去公园散步，天气很好。",
    "Emoji: 🎉🙂👍🏽 and 🇫🇷 flags",
    "def fib(n):\n    if n < 2:\n        return n\n\treturn fib(n - 1) + fib(n - 2)  # 🐍",
    "12345 and 3.14159, in 2024: 1,000,000",
    "  leading spaces,\n\n\nblank lines   and trailing   ",
    "x =\n    1\n\n\n\n   \t  y",
]
# Gemma 3 270M's exactness test: plain prompts, tokenized with the BOS token.
GEMMA_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "def add(a, b):\n    return",
    "Water boils at a temperature of",
    "Die Hauptstadt von Deutschland ist",
]
BPE_PRE = ("llama-bpe", "qwen2", "gpt-2", "default")
REFERENCE = Path(__file__).parent / "llama_cpp_tokens.json"


def smollm_gguf() -> Path:
    from ember.loading.gguf import default_gguf_path

    return default_gguf_path()


def gemma3_gguf() -> Path:
    from ember.loading.packaged import packaged_model_path

    return packaged_model_path("gemma-3-270m")


def write_bpe_vocab(pre: str, out: Path) -> Path:
    """The SmolLM2 vocabulary (tokens, types, merges, special ids) under pre-tokenizer `pre`,
    with the few hyper-parameters llama.cpp reads when it loads only a vocabulary."""
    reader = gguf.GGUFReader(smollm_gguf())
    field = {k: reader.get_field(k).contents() for k in reader.fields
             if k.startswith("tokenizer.ggml.") and k != "tokenizer.ggml.pre"}
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(field["tokenizer.ggml.tokens"])
    w.add_token_types(field["tokenizer.ggml.token_type"])
    w.add_token_merges(field["tokenizer.ggml.merges"])
    w.add_bos_token_id(field["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(field["tokenizer.ggml.eos_token_id"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def vocabularies(tmp: Path) -> dict[str, Path]:
    """Name -> GGUF file of every vocabulary in the reference."""
    files = {"smollm": smollm_gguf(), "gemma3": gemma3_gguf()}
    for pre in BPE_PRE:
        files[pre] = write_bpe_vocab(pre, tmp / f"{pre}.gguf")
    return files


def main() -> None:
    import tempfile

    import llama_cpp

    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in vocabularies(Path(tmp)).items():
            llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
            result[name] = {text: llm.tokenize(text.encode(), add_bos=False, special=False)
                            for text in TEXTS}
            if name == "gemma3":
                result["gemma3-prompts"] = {
                    text: llm.tokenize(text.encode(), add_bos=True, special=False)
                    for text in GEMMA_PROMPTS}
    REFERENCE.write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {REFERENCE}", file=sys.stderr)


if __name__ == "__main__":
    main()
