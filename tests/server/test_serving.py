"""OpenAI bodies from engine outputs (server/serving.py), without a model: logprob token
strings and bytes, usage, and streams built from deltas."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers

from ember.engine.detokenizer import TokenBytes
from ember.outputs import CompletionOutput, Logprob, RequestOutput, merge_outputs
from ember.server.serving import ResponseBuilder


@pytest.fixture(scope="module")
def byte_level():
    """SmolLM2's tokenizer (byte-level BPE), read without the weights."""
    from ember.loading.loader import open_model

    ckpt, _ = open_model(None, torch.float32, None)
    return ckpt.tokenizer


@pytest.fixture(scope="module")
def sentencepiece():
    """A Llama-style SentencePiece BPE: "▁" for spaces, <0xNN> byte fallback, and a decoder
    that strips the leading space of a sequence."""
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}, "▁": 257, "P": 258,
             "a": 259, "r": 260, "i": 261, "s": 262, "▁P": 263, "ar": 264, "▁Par": 265,
             "is": 266, "▁Paris": 267}
    merges = [("▁", "P"), ("a", "r"), ("i", "s"), ("▁P", "ar"), ("▁Par", "is")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True,
                               unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return SimpleNamespace(backend=tok)


def completion_with_logprobs(token_ids: list[int], text: str) -> RequestOutput:
    logprobs = [{t: Logprob(-0.5, 1)} for t in token_ids]
    return RequestOutput("r", None, [1, 2, 3], [CompletionOutput(
        0, text, token_ids, -0.5 * len(token_ids), logprobs, "length")], True,
        num_cached_tokens=2)


@pytest.mark.parametrize("text", ["日本 Paris héllo ✓", "Paris é Paris"])
def test_logprob_bytes_rebuild_the_text_exactly(byte_level, sentencepiece, text):
    for tok in (byte_level, sentencepiece):
        ids = tok.backend.encode(text, add_special_tokens=False).ids
        builder = ResponseBuilder("chat", "id", "m", TokenBytes(tok), logprobs=1)
        body = builder.response(completion_with_logprobs(ids, text)).model_dump()
        content = body["choices"][0]["logprobs"]["content"]
        joined = b"".join(bytes(entry["bytes"]) for entry in content)
        # Each token's own bytes, partial UTF-8 characters included (not U+FFFD's bytes);
        # SentencePiece writes the text's first space too (its "▁" prefix).
        assert joined.decode() == (" " + text if tok is sentencepiece else text)
        assert all(bytes(t["bytes"]) == bytes(e["bytes"])
                   for e in content for t in e["top_logprobs"])


def test_a_sentencepiece_token_keeps_its_leading_space(sentencepiece):
    ids = sentencepiece.backend.encode("Paris Paris").ids
    assert sentencepiece.backend.decode(ids[1:]) == "Paris"  # alone, the decoder drops it
    builder = ResponseBuilder("completion", "id", "m", TokenBytes(sentencepiece), logprobs=0)
    lp = builder.response(completion_with_logprobs(ids, "Paris Paris")).model_dump()
    assert lp["choices"][0]["logprobs"]["tokens"] == [" Paris", " Paris"]
    assert lp["choices"][0]["logprobs"]["text_offset"] == [0, 6]


def test_usage_reports_cached_prompt_tokens(byte_level):
    builder = ResponseBuilder("completion", "id", "m", TokenBytes(byte_level), None)
    usage = builder.response(completion_with_logprobs([5, 6], "ab")).usage.model_dump()
    assert usage["prompt_tokens_details"] == {"cached_tokens": 2}
    assert usage["completion_tokens"] == 2 and usage["total_tokens"] == 5


def test_a_stream_sends_each_delta_as_it_is(byte_level):
    builder = ResponseBuilder("chat", "id", "m", TokenBytes(byte_level), None,
                              include_usage=True)
    deltas = [RequestOutput("r", None, [1, 2], [CompletionOutput(0, "He", [10])], False),
              RequestOutput("r", None, [1, 2], [CompletionOutput(0, "llo", [11, 12],
                                                                 finish_reason="stop")], True)]
    events = [e for d in deltas for e in builder.delta(d)] + builder.end(deltas[-1])
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert [p["choices"][0]["delta"]["content"] for p in payloads[:2]] == ["He", "llo"]
    assert payloads[1]["choices"][0]["finish_reason"] == "stop"
    assert payloads[2]["usage"]["completion_tokens"] == 3
    assert events[-1] == "data: [DONE]\n\n"
    merged = merge_outputs(deltas)
    assert merged.outputs[0].text == "Hello" and merged.outputs[0].token_ids == [10, 11, 12]
