"""When to speculate: per sequence, by its acceptance so far; per step, by its batch size.

Verifying k drafts adds k rows to a sequence's step. The weights are read and decoded once
for all of a step's rows, so a verify row costs a fraction of a one-row decode step:
`BREAK_EVEN` is that fraction, measured with the default model (docs/benchmarks.md: 0.17 on
an AVX2 EPYC, 0.22 on an AVX512-BF16 Xeon), rounded up. A
sequence gains by speculating while it accepts more than that fraction of its drafted
tokens. Its acceptance rate is a moving average over its drafts; when it falls below
break-even the sequence stops speculating for a while (16 tokens, doubling each time it
falls again, at most 256), then probes again: a chat answer may start quoting its input.

A step with more decoding sequences than `disable_by_batch_size` does not speculate: its
rows already keep the multiply-adds busy, and extra rows cost nearly their full price.
"""

from __future__ import annotations

from dataclasses import dataclass

from ember.config import SpeculativeConfig

BREAK_EVEN = 0.25  # a verify row's cost, as a fraction of a one-row decode step
_EMA_WEIGHT = 0.5  # of the latest draft in the moving acceptance rate
_FIRST_RATE = 0.4  # a first draft that fails (0.2) pauses; one half accepted (0.45) goes on
_PAUSE_TOKENS = 16
_MAX_PAUSE_TOKENS = 256


@dataclass
class DraftAcceptance:
    """One sequence's record of its drafts."""

    rate: float = _FIRST_RATE  # moving average of accepted / drafted tokens
    resume_at: int = 0  # output length from which it may speculate again
    pause: int = _PAUSE_TOKENS  # the next pause, in output tokens


class SpeculationPolicy:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.max_batch = config.disable_by_batch_size

    def step_allows(self, num_decoding: int) -> bool:
        return num_decoding <= self.max_batch

    @staticmethod
    def allows(record: DraftAcceptance, num_output_tokens: int) -> bool:
        return num_output_tokens >= record.resume_at

    @staticmethod
    def observe(record: DraftAcceptance, num_output_tokens: int, num_draft_tokens: int,
                num_accepted_tokens: int) -> None:
        record.rate += _EMA_WEIGHT * (num_accepted_tokens / num_draft_tokens - record.rate)
        if record.rate < BREAK_EVEN:
            record.resume_at = num_output_tokens + record.pause
            record.pause = min(2 * record.pause, _MAX_PAUSE_TOKENS)
            record.rate = BREAK_EVEN  # the probe after the pause decides alone
