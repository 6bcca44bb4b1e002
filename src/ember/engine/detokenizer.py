"""Incremental detokenization: UTF-8 safe text deltas and stop strings.

Decoding token by token is wrong for byte-level BPE (a character can span tokens) and for
tokenizers whose decoders treat a sequence's first token specially (leading spaces). So, as in
vLLM/TGI, each step decodes a short window twice, the tokens already emitted ("prefix") and the
same plus the new tokens, and emits the difference, once it does not end in a partial character.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from ember.loading.tokenizer import Tokenizer

_CONTEXT_TOKENS = 5  # prompt tokens decoded before the first output token (vLLM uses 5)
_REPLACEMENT = "\ufffd"  # what a partial UTF-8 character decodes to


class IncrementalDetokenizer:
    """Turns a request's output tokens into text deltas, one step at a time.

    `output_text` is the text handed out so far (the concatenation of every delta): while
    streaming it lags the decoded text by up to max(len(stop)) - 1 characters, so that text
    later cut by a stop string is never shown; `finish()` releases that tail.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] | None = None,
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = list(stop or [])
        self.include_stop_str_in_output = include_stop_str_in_output
        self.min_tokens = min_tokens  # as in vLLM: no stop string ends within the first ones
        self.stop_reason: str | None = None  # the stop string that matched
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        # The prompt's tail gives the first output tokens their left context (a leading space
        # must survive). A tail ending mid-character would garble the diff: do without it.
        context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        if context and self._decode(context).endswith(_REPLACEMENT):
            context = []
        self._ids = context
        self._prefix_offset = 0  # window start: context for the tokens at read_offset
        self._read_offset = len(context)  # first token whose text is not in _text yet
        self._num_output_tokens = 0
        self._text = ""  # decoded output, cut at a matched stop string
        self._emitted = 0  # characters of _text already returned as deltas

    @property
    def output_text(self) -> str:
        return self._text[: self._emitted]

    def add_tokens(self, new_ids: list[int]) -> tuple[str, str | None]:
        """Append generated tokens; return (text to emit now, the stop string matched or None)."""
        if self.stop_reason is not None:
            return "", None
        self._ids.extend(new_ids)
        self._num_output_tokens += len(new_ids)
        new_text = self._decode_new(flush=False)
        if not new_text:
            return "", None
        searched_from = len(self._text)
        self._text += new_text
        stop = None
        if self.stop and self._num_output_tokens > self.min_tokens:
            stop = self._find_stop(searched_from)
        if stop is None:
            end = max(self._emitted, len(self._text) - self._hold)
        else:
            end = len(self._text)
        delta, self._emitted = self._text[self._emitted : end], end
        return delta, stop

    def finish(self) -> str:
        """Generation ended for another reason than a stop string: return the held-back text.

        A trailing partial character is flushed as U+FFFD, as `tokenizer.decode` would show it.
        """
        if self.stop_reason is None:
            self._text += self._decode_new(flush=True)
        delta, self._emitted = self._text[self._emitted :], len(self._text)
        return delta

    # ---- internals ----------------------------------------------------------------------
    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _decode_new(self, flush: bool) -> str:
        """Text of the tokens from read_offset on, or "" while it ends in a partial character."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        # Not longer: only skipped special tokens so far; keep them in the window.
        if len(full_text) <= len(prefix_text) or (
            full_text.endswith(_REPLACEMENT) and not flush
        ):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full_text[len(prefix_text) :]

    def _find_stop(self, searched_from: int) -> str | None:
        """Earliest stop string that ends in the new text; cut _text at it."""
        best: tuple[int, str] | None = None
        for s in self.stop:
            # Start len(s) - 1 characters back: the match may begin in older text.
            i = self._text.find(s, max(0, searched_from - len(s) + 1))
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self._text = self._text[: i + len(s) if self.include_stop_str_in_output else i]
        self.stop_reason = s
        return s


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenBytes:
    """The exact bytes each token adds to the text after other tokens (logprob `token`/`bytes`).

    Decoding a token alone is wrong twice over: a decoder drops a sequence's leading space
    (SentencePiece's "▁Paris" decodes to "Paris" alone, " Paris" in context), and a token that
    holds part of a UTF-8 character decodes to U+FFFD. A token's own piece gives its bytes:
    byte-level BPE spells bytes in GPT-2's alphabet, SentencePiece writes "▁" for a space and
    "<0xNN>" for a byte fallback, added tokens are their content. Looked up once per id.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        backend = tokenizer.backend
        self._backend = backend
        decoder = json.loads(backend.to_str()).get("decoder") or {}
        kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders") or ()}
        self._byte_level = _byte_level_alphabet() if "ByteLevel" in kinds else None
        self._added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        self._cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        b = self._cache.get(token_id)
        if b is None:
            b = self._cache[token_id] = self._bytes(token_id)
        return b

    def text(self, token_id: int) -> str:
        """The token's bytes as text; a partial UTF-8 character shows as U+FFFD."""
        return self(token_id).decode("utf-8", "replace")

    def _bytes(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode()
        piece = self._backend.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level is not None:
            alphabet = self._byte_level
            return bytes(alphabet[c] for c in piece if c in alphabet)
        m = _BYTE_TOKEN.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode()
