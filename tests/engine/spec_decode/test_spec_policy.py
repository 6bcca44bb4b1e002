"""When a sequence speculates: its acceptance against break-even, the step's batch size."""

from __future__ import annotations

from ember.config import SpeculativeConfig
from ember.engine.spec_decode.policy import BREAK_EVEN, DraftAcceptance, SpeculationPolicy


def test_a_sequence_below_break_even_pauses_then_probes_again():
    policy = SpeculationPolicy(SpeculativeConfig())
    record = DraftAcceptance()
    policy.observe(record, 10, 4, 4)
    assert policy.allows(record, 11)
    policy.observe(record, 11, 4, 0)  # 0.7 -> 0.35: still above break-even
    assert record.rate > BREAK_EVEN and policy.allows(record, 12)
    policy.observe(record, 13, 4, 0)  # below: paused for 16 tokens
    assert not policy.allows(record, 14) and not policy.allows(record, 28)
    assert policy.allows(record, 29)
    policy.observe(record, 29, 4, 0)  # the probe fails: the next pause is twice as long
    assert not policy.allows(record, 29 + 31) and policy.allows(record, 29 + 32)
    policy.observe(record, 61, 4, 3)  # a good probe: speculating again
    assert policy.allows(record, 62)


def test_a_first_draft_that_fails_pauses_and_a_half_accepted_one_goes_on():
    policy = SpeculationPolicy(SpeculativeConfig())
    failed, half = DraftAcceptance(), DraftAcceptance()
    policy.observe(failed, 5, 4, 0)
    policy.observe(half, 5, 4, 2)
    assert not policy.allows(failed, 6) and policy.allows(half, 6)


def test_large_batches_do_not_speculate():
    policy = SpeculationPolicy(SpeculativeConfig(disable_by_batch_size=4))
    assert policy.step_allows(4) and not policy.step_allows(5)
