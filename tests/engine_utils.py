"""What engine tests share: deterministic prompts of exact lengths, and the engine at rest."""

from __future__ import annotations

import random


WORDS = ("river stone light garden winter paper engine silver market forest window quiet "
         "history number yellow travel ocean mountain letter coffee music simple bright "
         "morning").split()


def text_ids(tok, n: int, seed: int) -> list[int]:
    """A deterministic prompt of exactly n tokens."""
    rng = random.Random(seed)
    ids: list[int] = []
    while len(ids) < n:
        ids += tok.encode(" ".join(rng.choice(WORDS) for _ in range(64)) + ".",
                          add_special_tokens=False)
    return ids[:n]


def assert_idle(engine) -> None:
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert not engine.has_unfinished_requests() and not engine._children
    assert not engine.scheduler.requests and engine.get_stats().num_queued_requests == 0
