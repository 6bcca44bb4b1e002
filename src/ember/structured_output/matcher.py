"""One sequence's grammar state.

The matcher follows the sequence's accepted tokens by count: `advance(output_token_ids)`
consumes only the tokens past those it has seen, so a preempted sequence, whose prompt and
output are recomputed without sampling, is never advanced twice, and a request of n
sequences has n matchers. `validate` and `rollback` check and undo a run of draft tokens
(speculative decoding).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import llguidance.torch
import torch


class GrammarRejectedError(RuntimeError):
    """A sampled token the grammar does not allow (the mask was not applied: a bug)."""


class RequestMatcher:
    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int,
                 executor: ThreadPoolExecutor) -> None:
        self._m = matcher
        self._executor = executor
        self.num_consumed = 0  # output tokens fed to the grammar
        self._mask = llguidance.torch.allocate_token_bitmask(1, vocab_size)
        self._pending: Future[None] | None = None

    # ---- the step's mask ---------------------------------------------------------------
    def prefetch_mask(self) -> None:
        """Start computing the next token's mask on the worker thread."""
        prefetch_masks([self])

    def _fill(self) -> None:
        llguidance.torch.fill_next_token_bitmask(self._m, self._mask, 0)

    def mask(self) -> torch.Tensor:
        """[W] int32: bit i of word i // 32 set = token i allowed next."""
        if self._pending is None:
            self._fill()
        else:
            self._pending.result()
            self._pending = None
        return self._mask[0]

    def _settle(self) -> None:
        """Never touch the parser while the worker may be reading it."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    # ---- accepted tokens ---------------------------------------------------------------
    def advance(self, output_token_ids: list[int]) -> None:
        self._settle()
        new = output_token_ids[self.num_consumed:]
        if new and not self._m.consume_tokens(new):
            raise GrammarRejectedError(f"the grammar rejected token(s) {new}: "
                                       f"{self._m.get_error()}")
        self.num_consumed = len(output_token_ids)

    @property
    def is_finished(self) -> bool:
        """The grammar is complete and allows nothing more (not even EOS)."""
        return self._m.is_stopped()

    # ---- draft tokens ------------------------------------------------------------------
    def validate(self, draft_token_ids: list[int]) -> int:
        """How many of the draft tokens, in order, the grammar accepts from here."""
        self._settle()
        return self._m.validate_tokens(draft_token_ids)

    def draft_masks(self, draft_token_ids: list[int]) -> torch.Tensor:
        """[k + 1, W] int32: the masks before each of k validated draft tokens and after the
        last (a verify step's rows); the parser ends where it was."""
        self._settle()
        masks = llguidance.torch.allocate_token_bitmask(len(draft_token_ids) + 1,
                                                        self._mask.shape[1] * 32)
        llguidance.torch.fill_next_token_bitmask(self._m, masks, 0)
        consumed = 0
        for i, token in enumerate(draft_token_ids):
            if self._m.is_stopped() or not self._m.consume_tokens([token]):
                break  # the rows after it are never kept: the sequence ends at it
            consumed += 1
            llguidance.torch.fill_next_token_bitmask(self._m, masks, i + 1)
        if consumed and not self._m.rollback(consumed):
            raise GrammarRejectedError(f"cannot roll back {consumed} draft tokens: "
                                       f"{self._m.get_error()}")
        return masks

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` consumed tokens (rejected drafts)."""
        self._settle()
        if not self._m.rollback(num_tokens):
            raise GrammarRejectedError(f"cannot roll back {num_tokens} tokens: "
                                       f"{self._m.get_error()}")
        self.num_consumed -= num_tokens


def prefetch_masks(matchers: list[RequestMatcher]) -> None:
    """Start the next masks of `matchers` on the worker thread, as one job (a step's
    constrained rows: one hand-over to the worker, not one per row)."""
    todo = [m for m in matchers if m._pending is None]
    if not todo:
        return

    def fill_all() -> None:
        for m in todo:
            m._fill()

    pending = todo[0]._executor.submit(fill_all)
    for m in todo:
        m._pending = pending
