"""The scheduler and the block manager without a model (in the style of vLLM's
tests/v1/core/test_scheduler.py): fake requests, hand-built runner outputs."""

from __future__ import annotations

from ember.config import EngineConfig
from ember.engine import block_manager as block_manager_module
from ember.engine.block_manager import BlockManager, chain_hash
from ember.engine.request import Request, RequestStatus
from ember.engine.scheduler import LogprobsLists, ModelRunnerOutput, Scheduler, SchedulerOutput
from ember.sampling_params import SamplingParams

BLOCK = 4
EOS = 2


def make_scheduler(num_blocks: int = 64, budget: int = 64, max_num_seqs: int = 16,
                   prefix_caching: bool = True) -> Scheduler:
    config = EngineConfig(block_size=BLOCK, max_num_batched_tokens=budget,
                          max_num_seqs=max_num_seqs, enable_prefix_caching=prefix_caching)
    return Scheduler(config, BlockManager(num_blocks, BLOCK, prefix_caching))


def make_request(req_id: str, prompt: list[int] | int, max_tokens: int = 8,
                 **params) -> Request:
    ids = list(range(100, 100 + prompt)) if isinstance(prompt, int) else prompt
    return Request(req_id, ids, SamplingParams(max_tokens=max_tokens, **params), seed=0,
                   max_tokens=max_tokens, eos_token_ids=(EOS,))


def runner_output(sched: SchedulerOutput, scheduler: Scheduler, token: int = 7,
                  tokens: dict[str, int] | None = None) -> ModelRunnerOutput:
    """What the runner answers: a token for every request that reached its last known token."""
    ids = [rid for rid, n in sched.num_scheduled_tokens.items()
           if scheduler.requests[rid].num_computed_tokens + n == scheduler.requests[rid].num_tokens]
    sampled = [[(tokens or {}).get(rid, token)] for rid in ids]
    return ModelRunnerOutput(ids, sampled, LogprobsLists([-0.5] * len(ids)))


def step(scheduler: Scheduler, **kwargs):
    sched = scheduler.schedule()
    return sched, scheduler.update_from_output(sched, runner_output(sched, scheduler, **kwargs))


def assert_all_free(scheduler: Scheduler) -> None:
    bm = scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert not scheduler.running and not scheduler.waiting and not scheduler.requests


def test_chunked_prefill_keeps_decodes_going():
    s = make_scheduler(budget=16)
    s.add_request(make_request("short", 3, max_tokens=20))
    sched, outs = step(s)
    assert sched.num_scheduled_tokens == {"short": 3}
    assert [o.req_id for o in outs] == ["short"]
    s.add_request(make_request("long", 40))
    chunks = []
    while True:
        sched, outs = step(s)
        assert sched.num_scheduled_tokens["short"] == 1  # the decode goes on every step
        chunks.append(sched.num_scheduled_tokens.get("long"))
        if any(o.req_id == "long" for o in outs):
            break
    assert chunks == [15, 15, 10]  # 40 prompt tokens in chunks of the budget left
    long = s.requests["long"]
    assert long.num_computed_tokens == 40 and long.output_token_ids == [7]
    # The first chunk was announced in full once; later chunks are cached-request updates.
    s.finish_requests(["short", "long"], "abort")
    assert_all_free(s)


def test_typed_messages_carry_ids_and_new_blocks_only():
    s = make_scheduler()
    s.add_request(make_request("a", 6))
    sched = s.schedule()
    (new,) = sched.scheduled_new_reqs
    assert new.req_id == "a" and new.num_computed_tokens == 0 and len(new.block_ids) == 2
    s.update_from_output(sched, runner_output(sched, s))
    for _ in range(2):  # 7 and 8 tokens: the 8th fits in block 2, the 9th needs a third block
        sched = s.schedule()
        assert not sched.scheduled_new_reqs
        (cached,) = sched.scheduled_cached_reqs
        s.update_from_output(sched, runner_output(sched, s))
    assert cached.new_block_ids == [] and cached.num_computed_tokens == 7
    sched = s.schedule()
    assert len(sched.scheduled_cached_reqs[0].new_block_ids) == 1
    assert sched.num_touched_blocks == 3


def test_preemption_frees_the_newest_and_resumes_it_as_new():
    s = make_scheduler(num_blocks=6, budget=64)
    s.add_request(make_request("old", 8, max_tokens=12))
    s.add_request(make_request("new", 8, max_tokens=12))
    step(s)  # both prefilled: 2 + 2 blocks used, tokens 9 need a 3rd block each
    preempted = None
    for _ in range(10):
        sched, _ = step(s)
        if sched.preempted_req_ids:
            preempted = sched
            break
    assert preempted is not None and preempted.preempted_req_ids == ["new"]
    assert "new" in preempted.finished_req_ids  # the runner drops its state
    victim = s.requests["new"]
    assert victim.status is RequestStatus.WAITING and victim.block_table == []
    assert victim.num_computed_tokens == 0 and victim.num_preemptions == 1
    assert s.num_preemptions == 1 and s.waiting[0] is victim
    generated = list(victim.output_token_ids)
    assert generated  # it keeps what it generated: it is recomputed, not restarted
    while "old" in s.requests:
        sched, _ = step(s)
    # Resumed as a new request for the runner, with its prompt and outputs so far.
    while not any(n.req_id == "new" for n in sched.scheduled_new_reqs):
        sched, _ = step(s)
    resumed = next(n for n in sched.scheduled_new_reqs if n.req_id == "new")
    assert resumed.output_token_ids[: len(generated)] == generated
    while s.requests:
        step(s)
    assert_all_free(s)


def test_prefix_hits_share_blocks_and_skip_compute():
    s = make_scheduler()
    prompt = list(range(100, 113))  # 13 tokens: 3 full blocks
    s.add_request(make_request("a", prompt))
    step(s)
    s.add_request(make_request("b", prompt[:12] + [999, 998]))
    sched = s.schedule()
    (new,) = sched.scheduled_new_reqs
    assert new.num_computed_tokens == 12 and sched.num_scheduled_tokens == {"a": 1, "b": 2}
    a, b = s.requests["a"], s.requests["b"]
    assert b.block_table[:3] == a.block_table[:3]
    assert all(s.block_manager.blocks[i].ref_count == 2 for i in a.block_table[:3])
    assert b.num_cached_tokens == 12
    assert s.block_manager.prefix_hits == 12
    s.finish_requests(["a", "b"], "abort")
    assert_all_free(s)


def test_the_last_prompt_token_is_never_a_cache_hit():
    s = make_scheduler()
    s.add_request(make_request("a", 8))
    step(s)
    s.add_request(make_request("b", 8))  # the same 8 tokens: 2 full blocks
    sched = s.schedule()
    assert sched.scheduled_new_reqs[0].num_computed_tokens == 4  # its logits are needed
    assert sched.num_scheduled_tokens["b"] == 4


def test_aborts_of_waiting_and_running_requests_free_everything():
    s = make_scheduler(max_num_seqs=1)
    s.add_request(make_request("running", 10))
    s.add_request(make_request("waiting", 10))
    sched, _ = step(s)
    assert list(sched.num_scheduled_tokens) == ["running"]
    s.finish_requests("waiting", "abort")
    s.finish_requests("running", "abort")
    s.finish_requests("unknown", "abort")  # ignored
    assert s.schedule().finished_req_ids == {"running", "waiting"}
    assert_all_free(s)


def test_n_children_share_the_prompt_within_one_step():
    s = make_scheduler()
    prompt = list(range(100, 117))  # 17 tokens: 4 full blocks
    for i in range(3):
        s.add_request(make_request(f"r#{i}", prompt, temperature=1.0, seed=1))
    sched, outs = step(s)
    # The first child computes the prompt; its blocks are registered as soon as they are
    # scheduled, so its siblings hit them in the same step.
    assert sched.num_scheduled_tokens == {"r#0": 17, "r#1": 1, "r#2": 1}
    tables = [s.requests[f"r#{i}"].block_table for i in range(3)]
    assert tables[0][:4] == tables[1][:4] == tables[2][:4]
    assert len({t[4] for t in tables}) == 3  # the last, partial block is each one's own
    assert sorted(o.req_id for o in outs) == ["r#0", "r#1", "r#2"]
    s.finish_requests([f"r#{i}" for i in range(3)], "abort")
    assert_all_free(s)


def test_stop_rules_eos_stop_ids_min_and_max_tokens():
    s = make_scheduler()
    s.add_request(make_request("eos", 3))
    s.add_request(make_request("stop_id", 3, stop_token_ids=[9]))
    s.add_request(make_request("min", 3, min_tokens=2))
    s.add_request(make_request("max", 3, max_tokens=2))
    s.add_request(make_request("ignored", 3, max_tokens=2))
    _, outs = step(s, tokens={"eos": EOS, "stop_id": 9, "min": EOS, "max": 5, "ignored": 9})
    by_id = {o.req_id: o for o in outs}
    assert (by_id["eos"].finish_reason, by_id["eos"].stop_reason) == ("stop", None)
    assert (by_id["stop_id"].finish_reason, by_id["stop_id"].stop_reason) == ("stop", 9)
    assert by_id["min"].finish_reason is None  # EOS before min_tokens does not stop
    assert by_id["max"].finish_reason is None and by_id["ignored"].finish_reason is None
    assert by_id["eos"].new_token_ids == [EOS] and by_id["eos"].new_logprobs == [-0.5]
    sched, outs = step(s, tokens={"min": EOS, "max": 5, "ignored": 5})
    by_id = {o.req_id: o for o in outs}
    assert by_id["min"].finish_reason == "stop"
    assert by_id["max"].finish_reason == "length"
    assert sched.finished_req_ids == {"eos", "stop_id"}
    assert s.schedule().finished_req_ids == {"min", "max", "ignored"}
    assert_all_free(s)


def test_logprobs_are_cut_to_what_each_request_asked():
    s = make_scheduler()
    s.add_request(make_request("k2", 3, logprobs=2))
    s.add_request(make_request("k0", 3, logprobs=0))
    s.add_request(make_request("none", 3))
    sched = s.schedule()
    ids = list(sched.num_scheduled_tokens)
    out = ModelRunnerOutput(ids, [[5]] * 3, LogprobsLists(
        [-0.1, -0.2, -0.3], [[5, 6, 7]] * 3, [[-0.1, -1.0, -2.0]] * 3))
    by_id = {o.req_id: o for o in s.update_from_output(sched, out)}
    assert by_id["k2"].new_top_logprobs == [([5, 6], [-0.1, -1.0])]
    assert by_id["k0"].new_top_logprobs == [([], [])]
    assert by_id["none"].new_top_logprobs is None
    assert by_id["k0"].new_logprobs == [-0.2]


# ---- the block manager -------------------------------------------------------------------
def test_failed_allocation_changes_nothing():
    bm = BlockManager(4, BLOCK, True)
    a = make_request("a", 12)
    assert bm.allocate(a, 12)
    b = make_request("b", 8)
    assert not bm.allocate(b, 8)
    assert b.block_table == [] and bm.num_free_blocks == 1


def test_freed_cached_blocks_are_evicted_least_recently_freed_first():
    bm = BlockManager(4, BLOCK, True)
    a = make_request("a", list(range(100, 109)))  # 2 full blocks + 1 token
    assert bm.allocate(a, 9)
    bm.free_request(a)
    # Still cached after the free: a new request with the same prefix finds both blocks.
    again = make_request("again", list(range(100, 109)))
    assert len(bm.find_cached_prefix(again)) == 2
    # A request that needs every block evicts them (tail block first: the prefix last).
    c = make_request("c", list(range(500, 516)))
    assert bm.allocate(c, 16)
    assert bm.find_cached_prefix(make_request("x", list(range(100, 109)))) == []


def test_blocks_with_colliding_python_hashes_are_not_shared(monkeypatch):
    """Two different blocks whose Python hashes collide (as a client sending token ids could
    arrange) must not share a cached block: the keys are SHA-256 digests of the tokens."""
    monkeypatch.setattr(block_manager_module, "hash", lambda _: 0, raising=False)
    bm = BlockManager(8, BLOCK, True)
    victim = make_request("victim", [11, 12, 13, 14, 15])
    assert bm.allocate(victim, 5)
    attacker = make_request("attacker", [21, 22, 23, 24, 25])
    assert bm.find_cached_prefix(attacker) == []
    assert bm.allocate(attacker, 5)
    assert not set(attacker.block_table) & set(victim.block_table)


# ---- speculative decoding ------------------------------------------------------------------
# Then 3: the suffix [1, 3] occurred at the start, n-gram lookup drafts 4 5 6 8.
REPEATING = [1, 3, 4, 5, 6, 8, 9, 10, 1]


def spec_scheduler(num_blocks: int = 64, **spec) -> Scheduler:
    config = EngineConfig(block_size=BLOCK, max_num_batched_tokens=64, speculative_config={
        "method": "ngram", "num_speculative_tokens": 4, **spec})
    return Scheduler(config, BlockManager(num_blocks, BLOCK, True))


def prefilled(s: Scheduler, req_id: str = "a", max_tokens: int = 20) -> Request:
    """A request of REPEATING whose prompt is computed and whose first token is 3."""
    s.add_request(make_request(req_id, list(REPEATING), max_tokens=max_tokens))
    step(s, tokens={req_id: 3})
    return s.requests[req_id]


def verify(s: Scheduler, sampled: dict[str, list[int]]):
    sched = s.schedule()
    ids = list(sampled)
    out = ModelRunnerOutput(ids, [sampled[r] for r in ids],
                            LogprobsLists([-0.5] * sum(len(v) for v in sampled.values())))
    return sched, s.update_from_output(sched, out)


def test_verify_step_schedules_drafts_and_rolls_back_the_rejected():
    s = spec_scheduler()
    req = prefilled(s)
    sched, (out,) = verify(s, {"a": [4, 5, 11]})  # two drafts accepted, then the target's 11
    assert sched.scheduled_spec_decode_tokens == {"a": [4, 5, 6, 8]}
    assert sched.num_scheduled_tokens == {"a": 5}
    assert out.new_token_ids == [4, 5, 11]
    assert req.output_token_ids == [3, 4, 5, 11]
    assert req.num_computed_tokens == 12  # the last token and the two accepted drafts
    assert s.spec_stats.num_drafts == 1 and s.spec_stats.num_draft_tokens == 4
    assert s.spec_stats.num_accepted_tokens_per_pos == [1, 1, 0, 0]

    s.finish_requests("a", "abort")
    assert_all_free(s)

    # One accepted: the block that held only rejected drafts goes back to the pool.
    s = spec_scheduler()
    req2 = prefilled(s, "b")
    sched, (out,) = verify(s, {"b": [4, 12]})
    assert sched.scheduled_spec_decode_tokens["b"] == [4, 5, 6, 8]
    assert out.new_token_ids == [4, 12] and req2.num_computed_tokens == 11
    assert len(req2.block_table) == 3  # 12 tokens; the 4th block (drafts only) was freed
    # The prefix cache holds accepted tokens only: b's block 2 is 1 3 4 12, never 1 3 4 5.
    s.schedule()
    bm = s.block_manager
    assert bm.cached.get(chain_hash(req2.block_hashes[1], [1, 3, 4, 12])) == req2.block_table[2]
    assert chain_hash(req2.block_hashes[1], [1, 3, 4, 5]) not in bm.cached
    s.finish_requests("b", "abort")
    assert_all_free(s)


def test_eos_inside_an_accepted_run_ends_it_there():
    s = spec_scheduler()
    prefilled(s)
    sched, (out,) = verify(s, {"a": [4, EOS]})  # the target rejects 5 for EOS
    assert out.new_token_ids == [4, EOS] and out.finish_reason == "stop"
    assert_all_free(s)


def test_drafts_stop_short_of_max_tokens_and_the_batch_size_limit():
    s = spec_scheduler()
    prefilled(s, max_tokens=3)
    sched, _ = verify(s, {"a": [4, 5]})
    assert sched.scheduled_spec_decode_tokens == {"a": [4]}  # 1 generated + 1 + the bonus = 3

    s = spec_scheduler(disable_by_batch_size=1)
    for req_id in ("a", "b"):
        s.add_request(make_request(req_id, list(REPEATING), max_tokens=20))
    step(s, token=3)
    sched, _ = verify(s, {"a": [9], "b": [9]})
    assert sched.scheduled_spec_decode_tokens == {}  # two decoding sequences > 1


def test_drafts_never_preempt():
    s = spec_scheduler(num_blocks=3)  # 12 slots: the prompt and its first token fit, drafts not
    req = prefilled(s)
    sched, (out,) = verify(s, {"a": [9]})
    assert sched.scheduled_spec_decode_tokens == {} and not sched.preempted_req_ids
    assert sched.num_scheduled_tokens == {"a": 1} and req.output_token_ids == [3, 9]
