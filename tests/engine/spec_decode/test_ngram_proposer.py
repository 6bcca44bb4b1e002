"""N-gram prompt lookup: which suffix is looked up, which occurrence is copied."""

from __future__ import annotations

import numpy as np

from ember.config import SpeculativeConfig
from ember.engine.spec_decode.ngram_proposer import NgramProposer


def propose(tokens: list[int], k: int = 3, lo: int = 2, hi: int = 3) -> list[int]:
    proposer = NgramProposer(SpeculativeConfig(prompt_lookup_min=lo,
                                               prompt_lookup_max=hi))
    return proposer.propose(np.array(tokens, dtype=np.int64), k)


def test_copies_what_followed_the_suffix():
    assert propose([1, 2, 3, 4, 5, 6, 9, 2, 3]) == [4, 5, 6]
    assert propose([1, 2, 3, 4, 9, 2, 3], k=5) == [4, 9, 2, 3]  # to the end: fewer than k


def test_longest_suffix_first_then_latest_occurrence():
    # The 3-gram [7, 2, 3] occurred once (followed by 8); the 2-gram [2, 3] later (followed by 5).
    assert propose([7, 2, 3, 8, 0, 2, 3, 5, 1, 7, 2, 3]) == [8, 0, 2]
    # Two occurrences of the same 2-gram: the latest one's continuation.
    assert propose([2, 3, 4, 2, 3, 6, 0, 2, 3], hi=2) == [6, 0, 2]


def test_no_draft_without_a_long_enough_match():
    assert propose([1, 2, 3, 4, 5, 3]) == []  # only the 1-gram [3] recurs
    assert propose([5, 5]) == []  # too short to hold an earlier occurrence
    assert propose([1, 2, 1, 2], k=0) == []


def test_the_suffix_itself_is_not_a_match():
    # [4, 4] occurs at 0..1 and 1..2 (overlapping the suffix start), never only as itself.
    assert propose([4, 4, 4], hi=2) == [4]
