"""A batched, vectorised sampler with per-request reproducible noise.

Order of processing (vLLM's): logit bias and grammar masks (structured outputs; before the
fused greedy path too) -> banned ids -> repetition penalty -> frequency/presence penalties
-> (greedy rows: argmax) -> temperature -> top-k -> top-p -> min-p -> sample.

Sampling uses the exponential race `argmax(probs / E)`, E ~ Exp(1), which picks token i with
probability probs[i]. E comes from a counter-based hash of (seed, position, token id), so a row's
sample depends only on its own logits, seed and position: never on the batch around it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ember import kernels
from ember.kernels import ops
from ember.sampling_params import SamplingParams
from ember.structured_output.bitmask import apply_token_bitmask

if TYPE_CHECKING:
    from ember.structured_output.matcher import RequestMatcher

_SAMPLING_EPS = 1e-5
_MASK32 = 0xFFFFFFFF


@dataclass
class SamplingRow:
    params: SamplingParams
    seed: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    banned_token_ids: list[int]  # masked this step (EOS + stop_token_ids while < min_tokens)
    grammar: "RequestMatcher | None" = None  # structured outputs: the sequence's matcher
    # Or the row's mask given (a verify row's, after the drafts before it).
    grammar_mask: Tensor | None = None


@dataclass
class SamplingMetadata:
    temperature: Tensor  # [B] float32, 0 => greedy row
    top_p: Tensor  # [B] float32
    top_k: Tensor  # [B] int64, 0 = off
    min_p: Tensor  # [B] float32
    repetition_penalty: Tensor  # [B] float32
    frequency_penalty: Tensor  # [B] float32
    presence_penalty: Tensor  # [B] float32
    seeds: Tensor  # [B] int64
    positions: Tensor  # [B] int64: index of the sampled token in the request's output
    prompt_token_ids: Tensor | None  # [B, P] int64 padded with vocab_size
    output_token_ids: Tensor | None  # [B, O] int64 padded with vocab_size
    banned_token_ids: Tensor | None  # [B, K] int64 padded with vocab_size
    max_num_logprobs: int  # 0 = no top-k logprobs requested
    all_greedy: bool
    no_penalties: bool
    no_top_p_top_k_min_p: bool
    # Every row greedy without penalties, bans or logprobs, on a device with ember's greedy
    # kernel: the sampler needs none of the tensors above, and they are left empty.
    plain_greedy: bool = False
    # Applied to the raw logits before anything else (the greedy kernel included):
    logit_bias: Tensor | None = None  # [B, V] float32, where some row has a logit_bias
    grammar_rows: Tensor | None = None  # [R] int64: the constrained rows
    grammar_bitmask: Tensor | None = None  # [R, ceil(V / 32)] int32: their allowed tokens

    @classmethod
    def build(
        cls, rows: list[SamplingRow], vocab_size: int, device: torch.device | str
    ) -> "SamplingMetadata":
        params = [r.params for r in rows]

        def floats(values: list[float]) -> Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        def ints(values: list[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        def padded(lists: list[list[int]]) -> Tensor:
            width = max(1, max(len(ids) for ids in lists))
            return ints([ids + [vocab_size] * (width - len(ids)) for ids in lists])

        constraints = _constraints(rows, vocab_size, device)
        random_params = [p for p in params if not p.is_greedy]
        any_repetition = any(p.repetition_penalty != 1.0 for p in params)
        no_penalties = not any_repetition and all(
            p.frequency_penalty == 0.0 and p.presence_penalty == 0.0 for p in params
        )
        max_num_logprobs = max((p.logprobs or 0 for p in params), default=0)
        if (not random_params and no_penalties and max_num_logprobs == 0
                and not any(r.banned_token_ids for r in rows)
                and kernels.available(torch.device(device))):
            # A decode step's usual case: ~10 small tensors not worth building.
            empty = torch.empty(0, device=device)
            return cls(
                **{f: empty for f in ("temperature", "top_p", "top_k", "min_p",
                                      "repetition_penalty", "frequency_penalty",
                                      "presence_penalty", "seeds", "positions")},
                prompt_token_ids=None, output_token_ids=None, banned_token_ids=None,
                max_num_logprobs=0, all_greedy=True, no_penalties=True,
                no_top_p_top_k_min_p=True, plain_greedy=True, **constraints)
        return cls(
            temperature=floats([0.0 if p.is_greedy else p.temperature for p in params]),
            top_p=floats([p.top_p for p in params]),
            top_k=ints([min(p.top_k, vocab_size) for p in params]),  # any k >= V is off
            min_p=floats([p.min_p for p in params]),
            repetition_penalty=floats([p.repetition_penalty for p in params]),
            frequency_penalty=floats([p.frequency_penalty for p in params]),
            presence_penalty=floats([p.presence_penalty for p in params]),
            seeds=ints([r.seed for r in rows]),
            positions=ints([len(r.output_token_ids) for r in rows]),
            # Only the repetition penalty looks at the prompt.
            prompt_token_ids=padded([r.prompt_token_ids for r in rows]) if any_repetition else None,
            output_token_ids=None if no_penalties else padded([r.output_token_ids for r in rows]),
            banned_token_ids=(
                padded([r.banned_token_ids for r in rows])
                if any(r.banned_token_ids for r in rows) else None
            ),
            max_num_logprobs=max_num_logprobs,
            all_greedy=not random_params,
            no_penalties=no_penalties,
            no_top_p_top_k_min_p=all(
                p.top_p == 1.0 and (p.top_k == 0 or p.top_k >= vocab_size) and p.min_p == 0.0
                for p in random_params
            ),
            **constraints,
        )


def _constraints(rows: list[SamplingRow], vocab_size: int,
                 device: torch.device | str) -> dict[str, Tensor | None]:
    """The logit bias and grammar fields of SamplingMetadata. Waiting for the constrained
    rows' masks happens here: they were started before the forward pass."""
    out: dict[str, Tensor | None] = {}
    biased = [(i, r.params.logit_bias) for i, r in enumerate(rows) if r.params.logit_bias]
    if biased:
        bias = torch.zeros(len(rows), vocab_size, dtype=torch.float32)
        for i, entries in biased:
            ids = torch.tensor([t for t in entries if t < vocab_size], dtype=torch.long)
            vals = torch.tensor([v for t, v in entries.items() if t < vocab_size])
            bias[i, ids] = vals
        out["logit_bias"] = bias.to(device)
    constrained = [i for i, r in enumerate(rows)
                   if r.grammar is not None or r.grammar_mask is not None]
    if constrained:
        out["grammar_rows"] = torch.tensor(constrained, dtype=torch.long, device=device)
        out["grammar_bitmask"] = torch.stack(
            [rows[i].grammar_mask if rows[i].grammar_mask is not None
             else rows[i].grammar.mask() for i in constrained])  # type: ignore[union-attr]
    return out


@dataclass
class SamplerOutput:
    sampled_token_ids: Tensor  # [B] int64
    logprobs: Tensor  # [B] float32: log_softmax of the raw logits at the sampled id
    topk_token_ids: Tensor | None  # [B, max_num_logprobs] int64
    topk_logprobs: Tensor | None  # [B, max_num_logprobs] float32


# ---- logits processing ------------------------------------------------------------------
def _token_mask(ids: Tensor, vocab_size: int) -> Tensor:
    """[B, V] bool: which ids occur in each row (padding = vocab_size lands in a dropped column)."""
    mask = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.bool, device=ids.device)
    return mask.scatter_(1, ids, True)[:, :vocab_size]


def _token_counts(ids: Tensor, vocab_size: int) -> Tensor:
    counts = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.float32, device=ids.device)
    return counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))[:, :vocab_size]


def apply_penalties(logits: Tensor, meta: SamplingMetadata) -> Tensor:
    """Banned ids, then repetition, frequency and presence penalties; returns new float32 logits."""
    logits = logits.to(torch.float32, copy=True)
    vocab_size = logits.shape[1]
    if meta.banned_token_ids is not None:
        logits.masked_fill_(_token_mask(meta.banned_token_ids, vocab_size), float("-inf"))
    if meta.no_penalties:
        return logits
    assert meta.output_token_ids is not None
    counts = _token_counts(meta.output_token_ids, vocab_size)
    in_output = counts > 0
    if meta.prompt_token_ids is not None:
        seen = in_output | _token_mask(meta.prompt_token_ids, vocab_size)
        rp = torch.where(seen, meta.repetition_penalty[:, None], 1.0)
        logits = torch.where(logits > 0, logits / rp, logits * rp)
    logits -= meta.frequency_penalty[:, None] * counts
    logits -= meta.presence_penalty[:, None] * in_output
    return logits


def apply_top_k_top_p(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Mask to -inf all but each row's top_k logits (0 = off), then all but the smallest set
    whose probability reaches top_p. One ascending sort serves both."""
    vocab_size = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1)
    k = torch.where((top_k <= 0) | (top_k > vocab_size), vocab_size, top_k)
    kth = sorted_logits.gather(1, (vocab_size - k)[:, None])
    sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
    # Ascending cumulative mass: a token goes if the tokens below it (and itself) hold
    # <= 1 - top_p, i.e. if the tokens above it already reach top_p.
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= 1 - top_p[:, None]
    drop[:, -1] = False  # the most likely token always stays
    sorted_logits.masked_fill_(drop, float("-inf"))
    return sorted_logits.scatter(1, order, sorted_logits)


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    probs = logits.softmax(dim=-1)
    threshold = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(logits: Tensor, meta: SamplingMetadata) -> Tensor:
    """The float32 logits each non-greedy row samples from (greedy rows: temperature 1)."""
    logits = apply_penalties(logits, meta)
    temperature = torch.where(meta.temperature < _SAMPLING_EPS, 1.0, meta.temperature)
    logits = logits / temperature[:, None]
    if not meta.no_top_p_top_k_min_p:
        logits = apply_min_p(apply_top_k_top_p(logits, meta.top_k, meta.top_p), meta.min_p)
    return logits


# ---- counter-based noise ------------------------------------------------------------------
# 32-bit hashing held in int64, written so that no product overflows int64 (whose wrap-around
# is not something to rely on across backends).
def _mul32(x: Tensor, c: int) -> Tensor:
    """x * c mod 2**32 for 0 <= x < 2**32, in place. A constant >= 2**31 is used as c - 2**32
    (same residue), so |product| < 2**63; `& mask` then gives the residue even when negative."""
    x.mul_(c - (1 << 32) if c >= 1 << 31 else c)
    return x.bitwise_and_(_MASK32)


def _mix32(x: Tensor) -> Tensor:
    """Wellons' lowbias32: a bijective 32-bit finaliser with near-ideal avalanche."""
    x = x ^ (x >> 16)  # a new tensor: the in-place steps below never touch the caller's x
    _mul32(x, 0x7FEB352D)
    x ^= x >> 15
    _mul32(x, 0x846CA68B)
    x ^= x >> 16
    return x


def exponential_noise(seeds: Tensor, positions: Tensor, vocab_size: int) -> Tensor:
    """[B, V] float32 Exp(1) samples, a pure function of (seed, position, token id)."""
    # Per-row key from the 64-bit seed and the position, and a per-token hash: [B] and [V] work.
    key = _mix32((seeds & _MASK32) ^ 0x243F6A88)
    key = _mix32(key ^ ((seeds >> 32) & _MASK32))
    key = _mix32(key ^ (positions & _MASK32))
    token = _mix32(torch.arange(vocab_size, dtype=torch.long, device=seeds.device))
    # One keyed round per element: the only [B, V] hashing.
    h = _mix32(token[None, :] ^ key[:, None])
    # 23 bits -> u in (0, 1), exactly representable in float32, so -log(u) is finite and > 0.
    u = (h >> 9).float().add_(0.5).mul_(2.0**-23)
    return u.log_().neg_()


def _argmax(x: Tensor) -> Tensor:
    """Row-wise argmax (the first maximum; NaN counts as the maximum, as in torch). On CPU
    through NumPy: ATen's CPU argmax over a large vocabulary is many times slower."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return torch.from_numpy(x.contiguous().numpy().argmax(axis=-1))
    return x.argmax(dim=-1)


# ---- the sampler --------------------------------------------------------------------------
def apply_logit_constraints(logits: Tensor, meta: SamplingMetadata) -> Tensor:
    """Logit bias, then the grammar masks of the constrained rows (unconstrained rows are
    untouched, so they sample as they would alone)."""
    if meta.logit_bias is not None:
        logits = logits.float() + meta.logit_bias
    if meta.grammar_rows is not None:
        assert meta.grammar_bitmask is not None
        apply_token_bitmask(logits, meta.grammar_rows, meta.grammar_bitmask)
    return logits


class Sampler(nn.Module):
    def forward(self, logits: Tensor, meta: SamplingMetadata) -> SamplerOutput:
        # ---- structured outputs: the step's grammar masks are applied here --------------
        logits = apply_logit_constraints(logits, meta)
        if meta.plain_greedy:
            # Plain greedy (a benchmark's, a deterministic client's): the argmax and its
            # logprob in one kernel, two passes over the logits, without the general path's
            # [B, V] log_softmax (docs/benchmarks.md).
            ids, logprobs = ops.greedy_sample(logits.float().contiguous())
            return SamplerOutput(ids, logprobs, None, None)
        raw_logprobs = logits.float().log_softmax(dim=-1)
        processed = process_logits(logits, meta)
        # Greedy rows: argmax of the penalised logits. Temperature 1 is used for them, and the
        # filters always keep the most likely token, so the argmax is unchanged.
        sampled = _argmax(processed)
        if not meta.all_greedy:
            noise = exponential_noise(meta.seeds, meta.positions, logits.shape[1])
            random = _argmax(processed.softmax(dim=-1) / noise)
            sampled = torch.where(meta.temperature < _SAMPLING_EPS, sampled, random)
        topk_ids = topk_logprobs = None
        if meta.max_num_logprobs > 0:
            topk_logprobs, topk_ids = raw_logprobs.topk(meta.max_num_logprobs, dim=-1)
        return SamplerOutput(
            sampled_token_ids=sampled,
            logprobs=raw_logprobs.gather(1, sampled[:, None]).squeeze(1),
            topk_token_ids=topk_ids,
            topk_logprobs=topk_logprobs,
        )
