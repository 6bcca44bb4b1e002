"""A step's token bitmasks: started before the forward pass, applied in the sampler."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ember.structured_output.matcher import prefetch_masks

if TYPE_CHECKING:
    from ember.engine.request import Request

# Byte value -> its 8 bits, least significant first: a bitmask's int32 words are little-endian,
# so byte k of word w holds tokens 32w + 8k .. 32w + 8k + 7.
_BYTE_BITS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool()


def start_step_masks(scheduled: list[tuple["Request", int]]) -> None:
    """For every constrained sequence that samples this step (its scheduled tokens reach the
    end of its known tokens), start its mask on the worker thread: it is computed while the
    model runs. `scheduled`: the step's requests and their numbers of scheduled tokens."""
    prefetch_masks([req.grammar for req, n in scheduled
                    if req.grammar is not None and req.num_computed_tokens + n == req.num_tokens])


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: -inf at the tokens each listed row's bitmask forbids. `rows`: [R] row indices
    of `logits` [B, V]; `bitmask`: [R, W] int32, W * 32 >= V."""
    vocab = logits.shape[1]
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous():
        # NumPy's unpackbits and a masked copy per row: a few times faster than the
        # equivalent torch ops on CPU, and nothing is copied but the mask.
        allowed = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
        out = logits.numpy()
        for r, row in enumerate(rows.tolist()):
            np.copyto(out[row], -np.inf, where=allowed[r, :vocab] == 0)
        return
    table = _BYTE_BITS.to(logits.device)
    allowed_t = table[bitmask.to(logits.device).view(torch.uint8).long()]
    allowed_t = allowed_t.reshape(bitmask.shape[0], -1)[:, :vocab]
    logits[rows] = logits[rows].masked_fill(~allowed_t, float("-inf"))
