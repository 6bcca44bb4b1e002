"""Constraints -> llguidance grammars, validated against the model's vocabulary and cached.

A compiled grammar is an `LLMatcher` in its initial state; every sequence that uses the
constraint gets a deep copy of it (cheap: the lexer and the grammar are shared). Compiling
happens on the caller's thread (the server's event loop hands it to a worker thread), so an
invalid constraint is refused with a message naming it before the request is queued.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import llguidance.gbnf_to_lark

from ember.errors import InvalidRequestError
from ember.loading.tokenizer import Tokenizer
from ember.sampling_params import StructuredOutputsParams
from ember.structured_output.matcher import RequestMatcher
from ember.structured_output.schema import closed_schema

# JSON schemas compile to compact JSON: a small model given free whitespace can spend its
# tokens on newlines. oneOf is read as anyOf (pydantic emits oneOf for unions), as vLLM does.
JSON_OPTIONS = {"whitespace_flexible": False, "coerce_one_of": True}

_WHAT = {"json": "JSON schema", "json_object": "JSON schema", "regex": "regex",
         "choice": "choice", "grammar": "grammar"}


class CompiledGrammar:
    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int,
                 executor: ThreadPoolExecutor) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._executor = executor

    def new_matcher(self) -> RequestMatcher:
        return RequestMatcher(self._matcher.deep_copy(), self._vocab_size, self._executor)


class GrammarCompiler:
    """Compiles `StructuredOutputsParams` for one tokenizer; thread-safe."""

    CACHE_SIZE = 256  # distinct constraints kept compiled

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        # The masks' worker: one thread, so a step's masks never compete with each other
        # for the cores the model uses; llguidance releases the GIL while it computes.
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="ember-grammar")
        # Building the token trie takes most of a second: started now, waited for on use.
        self._lltok: Future[llguidance.LLTokenizer] = self.executor.submit(
            llguidance.LLTokenizer, tokenizer.backend.to_str(), n_vocab=vocab_size,
            eos_token=list(tokenizer.eos_token_ids) or None)
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def lltokenizer(self) -> llguidance.LLTokenizer:
        return self._lltok.result()

    def compile(self, params: StructuredOutputsParams) -> CompiledGrammar:
        key = params.cache_key()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        compiled = self._compile(params)
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self.CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, params: StructuredOutputsParams) -> CompiledGrammar:
        kind = params.kind
        what = _WHAT[kind]
        try:
            grammar = self.grammar_text(params)
        except (ValueError, TypeError, RuntimeError,
                llguidance.gbnf_to_lark.GbnfToLarkError) as e:
            raise InvalidRequestError(f"invalid {what}: {e}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, self.lltokenizer)
        if error:
            raise InvalidRequestError(f"invalid {what}: {error}")
        matcher = llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"invalid {what}: {matcher.get_error()}")
        return CompiledGrammar(matcher, self.vocab_size, self.executor)

    @staticmethod
    def grammar_text(params: StructuredOutputsParams) -> str:
        """The llguidance grammar for a constraint (not validated yet)."""
        if params.json is not None:
            return llguidance.LLMatcher.grammar_from_json_schema(closed_schema(params.json),
                                                                 defaults=JSON_OPTIONS)
        if params.json_object:
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"},
                                                                 defaults=JSON_OPTIONS)
        if params.regex is not None:
            return llguidance.LLMatcher.grammar_from_regex(params.regex)
        if params.choice is not None:
            return llguidance.grammar_from("choice", list(params.choice))
        assert params.grammar is not None
        text = params.grammar
        if not llguidance.gbnf_to_lark.is_lark_syntax(text):
            text = llguidance.gbnf_to_lark.any_to_lark(text)  # GBNF (llama.cpp's syntax)
        return llguidance.LLMatcher.grammar_from_lark(text)
