"""IncrementalDetokenizer on a real byte-level BPE tokenizer, trained here (no network)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from ember.engine.detokenizer import IncrementalDetokenizer
from ember.loading.tokenizer import Tokenizer

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, hello there",
    "STOP here and END there",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 5, trainer)
    return Tokenizer(backend=backend, eos_token_ids=(backend.token_to_id("<eos>"),))


def stream(detok: IncrementalDetokenizer, ids: list[int], finish: bool = True):
    """Feed ids one at a time like the engine; return (deltas, stop string)."""
    deltas: list[str] = []
    for i in ids:
        delta, stop = detok.add_tokens([i])
        deltas.append(delta)
        # Whatever was shown must stay: the text so far is always a prefix of the final text.
        assert "".join(deltas) == detok.output_text
        if stop is not None:
            return deltas, stop
    if finish:
        deltas.append(detok.finish())
    return deltas, None


def test_multibyte_characters_are_never_split(tok):
    text = "héllo 世界 🎉 done"
    ids = tok.encode(text)
    # The test means something only if characters do span several tokens.
    assert sum("\ufffd" in tok.decode([i]) for i in ids) >= 4
    detok = IncrementalDetokenizer(tok, tok.encode("hello"))
    deltas, stop = stream(detok, ids)
    assert stop is None
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == detok.output_text == text == tok.decode(ids)


def test_leading_space_after_the_prompt_survives(tok):
    ids = tok.encode(" world, hello")
    detok = IncrementalDetokenizer(tok, tok.encode("hello"))
    deltas, _ = stream(detok, ids)
    assert deltas[0].startswith(" ")
    assert detok.output_text == " world, hello" == tok.decode(ids)


def test_stop_string_across_tokens_is_trimmed(tok):
    ids = tok.encode("the END of it")
    assert "END" not in [tok.decode([i]).strip() for i in ids]  # spans two tokens
    detok = IncrementalDetokenizer(tok, [], stop=["END"])
    deltas, stop = stream(detok, ids)
    assert stop == "END" == detok.stop_reason
    assert "".join(deltas) == detok.output_text == "the "
    assert not any("E" in d for d in deltas)
    assert detok.finish() == "" and detok.add_tokens(tok.encode(" more")) == ("", None)
    assert detok.output_text == "the "


def test_stop_string_kept_with_include_stop_str_in_output(tok):
    detok = IncrementalDetokenizer(
        tok, [], stop=["xyz", "END"], include_stop_str_in_output=True
    )
    deltas, stop = stream(detok, tok.encode("the END of it"))
    assert stop == "END"
    assert "".join(deltas) == detok.output_text == "the END"


def test_stop_string_made_of_multibyte_characters(tok):
    ids = tok.encode("héllo 世界 🎉")
    detok = IncrementalDetokenizer(tok, [], stop=["世界"])
    deltas, stop = stream(detok, ids)
    assert stop == "世界" and detok.output_text == "héllo "
    assert not any("\ufffd" in d or "世" in d for d in deltas)


def test_earliest_stop_wins_when_several_complete_at_once(tok):
    detok = IncrementalDetokenizer(tok, [], stop=["there", "lo"])
    delta, stop = detok.add_tokens(tok.encode("hello there"))
    assert (delta, stop) == ("hel", "lo") and detok.output_text == "hel"


def test_held_back_text_is_flushed_by_finish(tok):
    ids = tok.encode("hello STO")
    detok = IncrementalDetokenizer(tok, [], stop=["STOP here"])
    deltas, stop = stream(detok, ids, finish=False)
    assert stop is None
    assert "".join(deltas) == "h"  # the last len("STOP here") - 1 characters are held back
    tail = detok.finish()
    assert "".join(deltas) + tail == detok.output_text == "hello STO"


def test_min_tokens_defers_stop_strings(tok):
    ids = tok.encode("END hello END")
    assert tok.decode(ids[:3]).startswith("END")  # the first END ends within min_tokens
    detok = IncrementalDetokenizer(tok, [], stop=["END"], min_tokens=3)
    deltas, stop = stream(detok, ids)
    assert stop == "END" and detok.output_text == "END hello "


def test_special_tokens(tok):
    eos = tok.eos_token_ids[0]
    ids = tok.encode("hello") + [eos]
    skipped = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    assert "".join(stream(skipped, ids)[0]) == "hello" == skipped.output_text
    kept = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    assert "".join(stream(kept, ids)[0]) == "hello<eos>" == kept.output_text


def test_trailing_partial_character_only_at_finish(tok):
    ids = tok.encode("ok 🎉")[:-1]  # the emoji's last byte never comes
    detok = IncrementalDetokenizer(tok, [])
    deltas, _ = stream(detok, ids, finish=False)
    assert "".join(deltas) == "ok " and "\ufffd" not in "".join(deltas)
    assert detok.finish().startswith("\ufffd")
    assert detok.output_text == tok.decode(ids)


def test_prompt_ending_mid_character(tok):
    ids = tok.encode("世界 hello")
    assert tok.decode(ids[:2]) == "\ufffd"  # two of the three bytes of "世"
    detok = IncrementalDetokenizer(tok, ids[:2])  # the prompt stops inside "世"
    stream(detok, ids[2:])
    assert detok.output_text == tok.decode(ids[2:])
