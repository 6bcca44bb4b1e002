"""What engine tests share: deterministic prompts of exact lengths, the engine at rest, an abort
between a speculative step's scheduling and its run."""

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


def first_outputs(llm, prompts, params) -> list:
    """Each request's first completion (`CompletionOutput`), offline."""
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


def assert_no_block_in_use(llm) -> None:
    bm = llm.llm_engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


def abort_mid_verification(engine, prompt: list[int], params, verifying) -> None:
    """Run a request until it has drafted twice, schedule its next verify step (`verifying`
    checks the SchedulerOutput), abort it before that step runs, and check it left nothing:
    no request in the engine, none in the runner once it reads the next schedule."""
    stats = engine.scheduler.spec_stats
    engine.add_request("abort-me", prompt, params)
    drafts = stats.num_drafts
    while stats.num_drafts < drafts + 2:
        assert engine.step()[0].finished is False
    assert verifying(engine.scheduler.schedule())  # the next verify step is scheduled ...
    engine.abort_request("abort-me")  # ... and its request aborted before it runs
    assert not engine.has_unfinished_requests()
    engine.runner._update_states(engine.scheduler.schedule())  # the runner drops it
    assert not engine.runner.requests
