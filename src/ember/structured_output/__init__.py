"""Constrained decoding with llguidance: grammars compiled once per constraint, one matcher
per sequence, and each step's token bitmask computed while the model runs.

- `compiler.GrammarCompiler`: constraint -> compiled grammar (cached), on the caller's side,
  so an invalid schema, regex or grammar is refused before the request is queued;
- `matcher.RequestMatcher`: one sequence's parser state, advanced by its accepted tokens;
- `bitmask`: the step's masks (started before the forward pass, on a worker thread) and
  their application to the logits (in the sampler).

Why llguidance and not xgrammar: docs/architecture.md ("Structured outputs").
"""

from ember.structured_output.bitmask import apply_token_bitmask, start_step_masks
from ember.structured_output.compiler import CompiledGrammar, GrammarCompiler
from ember.structured_output.matcher import RequestMatcher

__all__ = ["CompiledGrammar", "GrammarCompiler", "RequestMatcher", "apply_token_bitmask",
           "start_step_masks"]
