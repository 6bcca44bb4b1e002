"""Tiny GGUF files written by tests: Llama hyper-parameters, a tiny vocabulary and given tensors."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from tokenizers import pre_tokenizers

BYTE_CHARS = sorted(pre_tokenizers.ByteLevel.alphabet())
SPM_PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "he", "ll", "lo", "▁he", "llo",
              "▁hel", "▁hello", "▁w", "or", "▁wor", "ld", "▁world", "!", "▁!", "é"]


def write_gguf(
    path: Path,
    tensors: dict[str, tuple[np.ndarray, QT | None]],
    *,
    arch: str = "llama",
    n_head: int = 4,
    n_head_kv: int = 2,
    tokenizer: str = "gpt2",
    eos_token_id: int | None = None,
) -> Path:
    """A GGUF with Llama hyper-parameters, a tiny byte-level vocabulary and `tensors`
    (name -> (array, raw type of an already-quantized array, or None to store as is))."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model(tokenizer)
    if tokenizer == "llama":  # SentencePiece-style: scores, byte-fallback tokens, no merges
        tokens = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256)), *SPM_PIECES]
        w.add_token_list(tokens)
        w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))])
        w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES))
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
    else:  # byte-level BPE, with a control token <s>
        tokens = [*BYTE_CHARS, "he", "ll", "<s>"]
        w.add_token_list(tokens)
        w.add_token_types([1] * (len(tokens) - 1) + [3])
        w.add_token_merges(["h e", "l l"])
        w.add_bos_token_id(len(tokens) - 1)
        w.add_eos_token_id(len(tokens) - 1 if eos_token_id is None else eos_token_id)
    for name, (array, raw_dtype) in tensors.items():
        w.add_tensor(name, array, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
