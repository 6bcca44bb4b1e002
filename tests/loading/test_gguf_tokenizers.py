"""GGUF vocabularies tokenize as llama.cpp does: SentencePiece with byte fallback (Gemma 3's
262k vocabulary) and byte-level BPE under each pre-tokenizer, on English, German, Chinese,
emoji, code and runs of spaces and newlines. The reference ids are llama.cpp's, stored in
tests/llama_cpp_tokens.json by `python tests/tokenizer_vocabs.py`, and compared live too where
llama-cpp-python is importable."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from ember.errors import ModelLoadError
from ember.loading.gguf import _build_tokenizer, _Metadata, load_gguf, open_gguf
from tokenizer_vocabs import REFERENCE, TEXTS, vocabularies

REFERENCE_IDS = json.loads(REFERENCE.read_text())


def _llama_cpp():
    """llama-cpp-python where it loads (`make compare` builds it; its library may be missing
    or built for another CPU's instructions), else None: the stored ids stand in."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    try:
        import llama_cpp
    except (ImportError, OSError, RuntimeError):
        return None
    return llama_cpp


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return vocabularies(tmp_path_factory.mktemp("vocabs"))


@pytest.fixture(scope="module")
def tokenizers(files):
    return {name: _build_tokenizer(_Metadata(open_gguf(path), path))
            for name, path in files.items()}


@pytest.mark.parametrize("name", ["smollm", "gemma3", "llama-bpe", "qwen2", "gpt-2", "default"])
def test_ids_equal_llama_cpp(tokenizers, files, name):
    tok = tokenizers[name]
    llama_cpp = _llama_cpp()
    live = None
    if llama_cpp is not None:
        live = llama_cpp.Llama(str(files[name]), vocab_only=True, verbose=False)
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == REFERENCE_IDS[name][text], text
        if live is not None:
            assert ids == live.tokenize(text.encode(), add_bos=False, special=False), text
        assert tok.decode(ids, skip_special_tokens=False) == text


def test_gemma3_special_tokens_and_bos(tokenizers):
    tok = tokenizers["gemma3"]
    assert tok.add_bos_token and tok.bos_token_id == 2
    # <eos> and, as llama.cpp, the chat format's <end_of_turn> end a generation.
    assert tok.eos_token_ids == (1, tok.backend.token_to_id("<end_of_turn>"))
    ids = tok.encode("<start_of_turn>user\nhi<end_of_turn>")
    assert ids[:2] == [2, tok.backend.token_to_id("<start_of_turn>")]
    assert tok.decode(ids) == "user\nhi"  # control tokens are skipped


def _vocab_gguf(path, pre="made-up", bos=1):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("block_count", 1), ("context_length", 64), ("embedding_length", 64),
                       ("feed_forward_length", 64)):
        w.add_uint32(f"llama.{key}", value)
    w.add_head_count(4)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(["a", "b", "ab"])
    w.add_token_types([1, 1, 1])
    w.add_token_merges(["a b"])
    w.add_bos_token_id(bos)
    w.add_tensor("output_norm.weight", np.ones(64, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unknown_pre_tokenizer_is_named(tmp_path):
    path = _vocab_gguf(tmp_path / "pre.gguf")
    with pytest.raises(ModelLoadError, match="unsupported GGUF pre-tokenizer 'made-up'"):
        load_gguf(path, torch.float32)


def test_special_token_outside_vocabulary(tmp_path):
    path = _vocab_gguf(tmp_path / "bos.gguf", pre="gpt-2", bos=7)
    with pytest.raises(ModelLoadError, match="bos_token_id=7 is outside the vocabulary of 3"):
        load_gguf(path, torch.float32)
