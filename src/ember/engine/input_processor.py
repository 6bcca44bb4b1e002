"""The one place a request is tokenized and validated, for the server and the offline API alike.

`InputProcessor.process` turns a prompt (text or token ids) and its `SamplingParams` into a
`ProcessedRequest` the engine accepts without further checks: the prompt is tokenized once,
its ids are in the vocabulary, prompt plus completion fit the context and the KV cache, and the
output a request can ask for (n x max_tokens x (logprobs + 1) entries) is bounded, logit_bias ids
are in the vocabulary, and a structured-outputs constraint compiles. Every refusal
is an `InvalidRequestError` (HTTP 400) whose message says what to change.

It only reads the tokenizer and fixed limits, so the server calls it from worker threads, off
the event loop, while the engine thread runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from ember.errors import InvalidRequestError
from ember.loading.tokenizer import Tokenizer
from ember.sampling_params import SamplingParams
from ember.structured_output import CompiledGrammar, GrammarCompiler

# n x max_tokens x (logprobs + 1): the token ids and logprob entries one request may produce.
# It bounds a request's memory and the work of assembling its output.
MAX_OUTPUT_ENTRIES = 1 << 20


@dataclass(frozen=True)
class ProcessedRequest:
    prompt: str | None  # the text, when the prompt was given as text
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # params.max_tokens, or what is left of the context when it is None
    grammar: CompiledGrammar | None = None  # params.structured_outputs, compiled


class InputProcessor:
    def __init__(self, tokenizer: Tokenizer, model_vocab_size: int, max_model_len: int,
                 num_kv_blocks: int, block_size: int, grammars: GrammarCompiler) -> None:
        self.tokenizer = tokenizer
        self.grammars = grammars
        # Token ids below this are valid for both the model and its tokenizer.
        self.vocab_size = min(model_vocab_size, tokenizer.vocab_size)
        self.max_model_len = max_model_len
        self.num_kv_blocks = num_kv_blocks
        self.block_size = block_size

    def check_text(self, text: str, where: str = "prompt") -> None:
        """Refuse, without tokenizing it, a text that cannot fit in the context."""
        max_len = self.max_model_len
        if len(text) > max_len * self.tokenizer.max_token_chars:
            raise InvalidRequestError(
                f"This model's maximum context length is {max_len} tokens. However, the "
                f"{where} has {len(text)} characters, more than {max_len} tokens can hold. "
                f"Please reduce the length of the {where}.")

    def check_token_ids(self, ids: list[int], what: str) -> None:
        vocab = self.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(
                f"{what} token id {bad[0]} is outside the vocabulary [0, {vocab})")

    def process(self, prompt: str | list[int], params: SamplingParams,
                where: str = "prompt") -> ProcessedRequest:
        """Tokenize (a text prompt) and validate; `where` names the prompt in messages
        ("prompt", or "messages" for a rendered chat)."""
        if isinstance(prompt, str):
            self.check_text(prompt, where)
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt)
        n = len(ids)
        if n == 0:
            raise InvalidRequestError(f"the {where} is empty")
        self.check_token_ids(ids, where)
        self.check_token_ids(params.stop_token_ids or [], "stop_token_ids")
        if params.prompt_logprobs is not None:
            raise InvalidRequestError("prompt_logprobs is not supported")
        max_len = self.max_model_len
        if n >= max_len or (params.max_tokens is not None and n + params.max_tokens > max_len):
            asked = n + (params.max_tokens or 0)
            raise InvalidRequestError(
                f"This model's maximum context length is {max_len} tokens. However, you "
                f"requested {asked} tokens ({n} in the {where}, {params.max_tokens or 0} in "
                f"the completion). Please reduce the length of the {where} or completion.")
        max_tokens = max_len - n if params.max_tokens is None else params.max_tokens
        need = -(-(n + max_tokens) // self.block_size)
        if need > self.num_kv_blocks:
            raise InvalidRequestError(
                f"the request needs {need} KV blocks ({n} prompt + {max_tokens} new tokens) "
                f"but the cache has only {self.num_kv_blocks}")
        entries = params.n * max_tokens * ((params.logprobs or 0) + 1)
        if entries > MAX_OUTPUT_ENTRIES:
            raise InvalidRequestError(
                f"the request may produce n x max_tokens x (logprobs + 1) = {params.n} x "
                f"{max_tokens} x {(params.logprobs or 0) + 1} = {entries} output entries; at "
                f"most {MAX_OUTPUT_ENTRIES} are allowed. Lower n, max_tokens or logprobs.")
        # ---- structured outputs: refused here (HTTP 400) rather than failing in the step ----
        self.check_token_ids(list(params.logit_bias or ()), "logit_bias")
        grammar = None
        if params.structured_outputs is not None:
            grammar = self.grammars.compile(params.structured_outputs)  # cached per constraint
        return ProcessedRequest(text, ids, params, max_tokens, grammar)
