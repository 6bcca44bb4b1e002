"""SamplingParams validation, and the vectorised sampler against plain per-row references."""

from __future__ import annotations

import math

import pytest
import torch

from ember.errors import InvalidRequestError
from ember.layers.sampler import (
    Sampler,
    SamplingMetadata,
    SamplingRow,
    apply_penalties,
    exponential_noise,
    process_logits,
)
from ember.sampling_params import SamplingParams, SamplingType

V = 64


# ---- SamplingParams -------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n": 0}, "n"),
        ({"n": 1.5}, "n"),
        ({"n": True}, "n"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": 1e39}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.1}, "min_p"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": 1e39}, "repetition_penalty"),
        ({"repetition_penalty": 5e-324}, "repetition_penalty"),  # 0 in float32
        ({"seed": "x"}, "seed"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": 3}, "stop"),
        ({"stop": ["x" * 1025]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": ["a"]}, "stop_token_ids"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
    ],
)
def test_sampling_params_rejects(kwargs, field):
    with pytest.raises(InvalidRequestError, match=field) as info:
        SamplingParams(**kwargs)
    assert "got" in str(info.value)


def test_sampling_params_messages_and_normalisation():
    with pytest.raises(InvalidRequestError, match=r"temperature must be in \[0, 100\], got -1.0"):
        SamplingParams(temperature=-1)
    with pytest.raises(InvalidRequestError, match=r"top_p must be in \(0, 1\], got 0"):
        SamplingParams(top_p=0)
    p = SamplingParams(top_k=-1, stop="END", temperature=1, max_tokens=None)
    assert p.top_k == 0 and p.stop == ["END"] and p.stop_token_ids == []
    assert isinstance(p.temperature, float) and p.max_tokens is None
    assert p.sampling_type is SamplingType.RANDOM and not p.is_greedy
    assert SamplingParams(seed=3).sampling_type is SamplingType.RANDOM_SEED
    g = SamplingParams(temperature=0, top_k=5, top_p=0.5, min_p=0.1)
    assert g.is_greedy and g.sampling_type is SamplingType.GREEDY
    assert (g.top_k, g.top_p, g.min_p) == (0, 1.0, 0.0)
    assert SamplingParams(logprobs=SamplingParams.MAX_LOGPROBS).logprobs == 20


# ---- helpers ----------------------------------------------------------------------------
def row(
    seed: int = 0,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    banned: list[int] | None = None,
    **params,
) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), seed, prompt or [1, 2], output or [], banned or [])


def meta_of(rows: list[SamplingRow], vocab: int = V) -> SamplingMetadata:
    return SamplingMetadata.build(rows, vocab, "cpu")


def sample(logits: torch.Tensor, rows: list[SamplingRow]):
    return Sampler()(logits, meta_of(rows, logits.shape[1]))


def random_logits(b: int, v: int = V, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


# ---- greedy, penalties, banned ids ----------------------------------------------------------
def test_greedy_is_argmax():
    logits = random_logits(5)
    out = sample(logits, [row(temperature=0) for _ in range(5)])
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))


def test_penalties_match_loop_reference():
    logits = random_logits(4)
    rows = [
        row(prompt=[1, 2, 3], output=[3, 3, 5], repetition_penalty=1.3),
        row(prompt=[7], output=[4, 4, 4, 9], frequency_penalty=0.7),
        row(prompt=[7, 8], output=[10, 10, 11], presence_penalty=-1.5),
        row(prompt=[20, 21, 22, 23], output=[20, 30, 30], repetition_penalty=0.8,
            frequency_penalty=-0.4, presence_penalty=1.1),
    ]
    got = apply_penalties(logits, meta_of(rows))
    ref = logits.clone()
    for b, r in enumerate(rows):
        p = r.params
        for t in set(r.prompt_token_ids + r.output_token_ids):
            x = ref[b, t].item()
            ref[b, t] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        for t in set(r.output_token_ids):
            count = r.output_token_ids.count(t)
            ref[b, t] -= p.frequency_penalty * count + p.presence_penalty
    torch.testing.assert_close(got, ref)


def test_banned_ids_are_never_sampled():
    logits = random_logits(3)
    top = logits.argmax(-1).tolist()
    rows = [row(banned=[top[0]], temperature=0), row(banned=[top[1], 5], seed=1), row(seed=2)]
    processed = apply_penalties(logits, meta_of(rows))
    assert processed[0, top[0]] == -math.inf and processed[1, 5] == -math.inf
    assert torch.isfinite(processed[2]).all()
    for seed in range(50):
        rows[1].seed = seed
        ids = sample(logits, rows).sampled_token_ids.tolist()
        assert ids[0] != top[0] and ids[1] not in (top[1], 5)


# ---- filters: allowed sets and distributions ---------------------------------------------------
def reference_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row's sampling distribution, computed token by token."""
    probs = (logits / p.temperature).softmax(-1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    top = order[: p.top_k] if p.top_k else order
    top_mass = sum(probs[i] for i in top)  # top-p acts on the renormalised top-k distribution
    mass, nucleus = 0.0, set()
    for i in top:
        if mass < p.top_p:
            nucleus.add(i)
            mass += probs[i] / top_mass
    kept = [probs[i] if i in nucleus else 0.0 for i in range(len(probs))]
    peak = max(kept) / sum(kept)
    kept = [q if q / sum(kept) >= p.min_p * peak else 0.0 for q in kept]
    total = sum(kept)
    return torch.tensor([q / total for q in kept])


FILTERS = [
    {"temperature": 0.7},
    {"temperature": 1.0, "top_k": 3},
    {"temperature": 1.2, "top_p": 0.6},
    {"temperature": 0.9, "min_p": 0.2},
    {"temperature": 1.0, "top_k": 6, "top_p": 0.95, "min_p": 0.15},  # each one bites
]


@pytest.mark.parametrize("params", FILTERS)
def test_filters_allowed_set_and_distribution(params):
    v = 12
    logits = random_logits(1, v, seed=3)[0]
    ref = reference_probs(logits, SamplingParams(**params))
    allowed = set(torch.nonzero(ref).flatten().tolist())

    rows = [row(seed=s, **params) for s in range(4000)]
    batch = logits.expand(len(rows), v).contiguous()
    processed = process_logits(batch, meta_of(rows, v))
    assert set(torch.isfinite(processed[0]).nonzero().flatten().tolist()) == allowed
    torch.testing.assert_close(processed[0].softmax(-1), ref, atol=1e-5, rtol=1e-4)

    ids = sample(batch, rows).sampled_token_ids
    assert set(ids.tolist()) <= allowed
    counts = torch.bincount(ids, minlength=v).double()
    expected = ref.double() * len(rows)
    support = expected > 0
    chi2 = ((counts[support] - expected[support]) ** 2 / expected[support]).sum().item()
    # df <= 11: the 0.1% critical value is 31.3; the seeds are fixed, so this is deterministic.
    assert chi2 < 31.3, (chi2, counts.tolist(), expected.tolist())


# ---- reproducibility --------------------------------------------------------------------------
def test_row_is_batch_invariant():
    logits = random_logits(8, seed=5)
    others = [
        row(seed=11, output=[1, 2, 2], temperature=0),
        row(seed=12, output=[3] * 7, top_k=4, repetition_penalty=1.2),
        row(seed=13, output=[5], top_p=0.5, frequency_penalty=0.5),
        row(seed=14, output=[], min_p=0.3, banned=[0, 1]),
        row(seed=15, output=[9] * 20, temperature=0.3),
        row(seed=16, output=[4, 4], presence_penalty=1.0),
        row(seed=17, output=[8] * 3, logprobs=5),
    ]
    for seed in range(20):
        target = row(seed=seed, output=[6] * 5, temperature=0.8)
        alone = sample(logits[3:4], [target])
        rows = others[:3] + [target] + others[3:]
        batched = sample(logits, rows)
        assert batched.sampled_token_ids[3] == alone.sampled_token_ids[0]
        assert batched.logprobs[3] == alone.logprobs[0]


def test_seed_and_position_determine_the_sample():
    logits = torch.zeros(1, 1000)  # uniform: every noise draw shows
    same = {sample(logits, [row(seed=42, output=[0] * 3)]).sampled_token_ids.item()
            for _ in range(3)}
    assert len(same) == 1
    by_seed = {sample(logits, [row(seed=s, output=[0] * 3)]).sampled_token_ids.item()
               for s in range(50)}
    by_position = {sample(logits, [row(seed=42, output=[0] * n)]).sampled_token_ids.item()
                   for n in range(50)}
    assert len(by_seed) > 40 and len(by_position) > 40
    # Seeds differing only in their high 32 bits must differ too.
    high = {sample(logits, [row(seed=s << 40)]).sampled_token_ids.item() for s in range(1, 51)}
    assert len(high) > 40


def test_noise_is_exponential_and_per_row():
    seeds = torch.tensor([1, 2, 3, 2**62 + 7])
    positions = torch.tensor([0, 5, 9, 1])
    noise = exponential_noise(seeds, positions, 20000)
    assert torch.isfinite(noise).all() and (noise > 0).all()
    assert abs(noise.mean().item() - 1.0) < 0.02 and abs(noise.var().item() - 1.0) < 0.05
    perm = torch.tensor([3, 0, 2, 1])
    assert torch.equal(exponential_noise(seeds[perm], positions[perm], 20000), noise[perm])


# ---- logprobs -------------------------------------------------------------------------------
def test_logprobs_come_from_raw_logits():
    logits = random_logits(4).to(torch.bfloat16)
    rows = [
        row(seed=1, temperature=0.5, top_k=3, logprobs=2),
        row(seed=2, output=[3, 3], repetition_penalty=2.0, frequency_penalty=1.0, logprobs=5),
        row(seed=3, temperature=0, banned=[7]),
        row(seed=4, min_p=0.5),
    ]
    out = sample(logits, rows)
    raw = logits.float().log_softmax(-1)
    assert out.sampled_token_ids.dtype == torch.long and out.logprobs.dtype == torch.float32
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.sampled_token_ids[:, None])[:, 0])
    top_lp, top_ids = raw.topk(5, dim=-1)
    assert out.topk_token_ids is not None and out.topk_logprobs is not None
    assert torch.equal(out.topk_token_ids, top_ids)
    torch.testing.assert_close(out.topk_logprobs, top_lp)
    none = sample(logits, [row(seed=1) for _ in range(4)])
    assert none.topk_token_ids is None and none.topk_logprobs is None


def test_metadata_flags():
    plain = meta_of([row(temperature=0), row(seed=1)])
    assert not plain.all_greedy and plain.no_penalties and plain.no_top_p_top_k_min_p
    assert plain.prompt_token_ids is None and plain.output_token_ids is None
    assert plain.banned_token_ids is None and plain.max_num_logprobs == 0
    greedy_filters = meta_of([row(temperature=0, top_k=3), row(temperature=0)])
    assert greedy_filters.all_greedy and greedy_filters.no_top_p_top_k_min_p
    busy = meta_of([row(output=[1, 2, 3], repetition_penalty=1.1, top_p=0.9, logprobs=3),
                    row(banned=[4], logprobs=1)])
    assert not busy.no_penalties and not busy.no_top_p_top_k_min_p
    assert busy.max_num_logprobs == 3 and busy.positions.tolist() == [3, 0]
    assert busy.output_token_ids is not None and busy.output_token_ids.tolist() == [
        [1, 2, 3], [V, V, V]]
    assert busy.banned_token_ids is not None and busy.banned_token_ids.tolist() == [[V], [4]]


def test_cpu_argmax_agrees_with_torch_on_ties_and_nan():
    from ember.layers.sampler import _argmax

    x = torch.tensor([[1.0, 3.0, 3.0, -1.0], [0.0, float("nan"), 5.0, float("nan")],
                      [-float("inf"), -2.0, -2.0, -float("inf")]])
    assert torch.equal(_argmax(x), x.argmax(dim=-1))  # first maximum; NaN wins
    with torch.inference_mode():
        big = torch.randn(3, 49152, generator=torch.Generator().manual_seed(0))
        assert torch.equal(_argmax(big), big.argmax(dim=-1))
        assert torch.equal(_argmax(big[:, ::2]), big[:, ::2].argmax(dim=-1))  # a strided view


@pytest.mark.parametrize("vocab", [64, 1003, 49152])
def test_plain_greedy_kernel_matches_the_general_path(monkeypatch, vocab):
    """Plain greedy rows (no penalties, bans or logprobs) take ember's `greedy_sample` kernel:
    the same ids as torch's argmax (first maximum; NaN wins) and log_softmax at them."""
    from ember import kernels
    from ember.layers import sampler

    assert kernels.load()
    logits = random_logits(6, vocab, seed=vocab) * 2
    logits[1, 3] = logits[1, 5] = logits[1].max() + 1  # a tie: the first wins
    logits[2, vocab - 1] = float("nan")
    logits[3] = float("-inf")
    logits[4, 0] = float("inf")
    rows = [row(temperature=0) for _ in range(6)]
    calls = []
    real = sampler.ops.greedy_sample
    monkeypatch.setattr(sampler.ops, "greedy_sample", lambda x: calls.append(1) or real(x))
    fast = sample(logits, rows)
    assert calls == [1]
    # Anything else (here: a logprobs request) takes the general path.
    sample(logits, [row(temperature=0, logprobs=1)] + rows[1:])
    assert calls == [1]
    monkeypatch.setattr(sampler.kernels, "available", lambda device: False)
    general = sample(logits, rows)
    assert calls == [1]
    assert torch.equal(fast.sampled_token_ids, logits.argmax(-1))
    assert torch.equal(fast.sampled_token_ids, general.sampled_token_ids)
    torch.testing.assert_close(fast.logprobs, general.logprobs, equal_nan=True)
    assert fast.topk_token_ids is None and fast.topk_logprobs is None
