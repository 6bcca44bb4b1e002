"""N-gram prompt lookup (vLLM's `ngram` method, llama.cpp's lookup decoding).

Answers that copy from their input (extraction, edits, quotes, code changes) repeat runs of
tokens that are already in the sequence. The proposer takes the sequence's last n tokens,
for n from `prompt_lookup_max` down to `prompt_lookup_min`, finds their latest earlier
occurrence in the prompt or the output, and drafts the tokens that followed it there.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ember.config import SpeculativeConfig


class NgramProposer:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max

    def propose(self, token_ids: np.ndarray, k: int) -> list[int]:
        """Up to k draft tokens to follow `token_ids` (int64, the prompt then the output);
        [] when no suffix of at least `prompt_lookup_min` tokens occurred before."""
        length = len(token_ids)
        if k <= 0 or length <= self.min_n:
            return []
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            suffix = token_ids[length - n:]
            # Windows starting at 0 .. length - n - 1: every earlier occurrence (the suffix
            # itself excluded), each with at least one token after it.
            windows = sliding_window_view(token_ids[: length - 1], n)
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n  # the latest occurrence: closest to what is copied
                return token_ids[start : start + k].tolist()
        return []
