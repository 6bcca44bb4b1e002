"""A step's token bitmasks: started before the forward pass, applied in the sampler."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ember.engine.request import Request

_BITS = torch.arange(32, dtype=torch.int32)


def start_step_masks(requests: list["Request"], num_scheduled_tokens: list[int]) -> None:
    """For every constrained sequence that samples this step (it reaches the end of its
    known tokens), start its mask on the worker thread: it is computed while the model runs."""
    for req, n in zip(requests, num_scheduled_tokens):
        if req.grammar is not None and req.num_computed_tokens + n == req.num_tokens:
            req.grammar.prefetch_mask()


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: -inf at the tokens each listed row's bitmask forbids. `rows`: [R] row indices
    of `logits` [B, V]; `bitmask`: [R, W] int32, W * 32 >= V."""
    vocab = logits.shape[1]
    bits = (bitmask.to(logits.device)[:, :, None] >> _BITS.to(logits.device)) & 1
    forbidden = (bits == 0).reshape(bitmask.shape[0], -1)[:, :vocab]
    logits[rows] = logits[rows].masked_fill(forbidden, float("-inf"))
