"""The KV-cache block pool: allocation, reference counts and automatic prefix caching.

A full block is identified by a SHA-256 digest chained over its predecessor's digest and its
own token ids, so equal digests mean equal prefixes. (Python's `hash()` would let a client who
sends token ids craft a collision with another tenant's cached prefix and read its K/V.) Cached blocks are shared by reference count; when their
count drops to zero they stay in the free pool with their contents, in least-recently-freed
order, and are evicted only when a fresh block is needed.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from ember.engine.request import Request


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None


def chain_hash(prev: bytes | None, token_ids: list[int] | tuple[int, ...]) -> bytes:
    """The digest of a block: SHA-256 over the parent's digest and the block's token ids."""
    h = hashlib.sha256(prev or b"")
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks, oldest-freed first; popping from the front evicts the LRU cached block.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}  # digest -> block id
        # Blocks are first handed out in id order (freed ones queue behind the never-used), so
        # the blocks ever used are exactly [0, num_touched_blocks).
        self.num_touched_blocks = 0
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    # ---- queries ----------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _hashes(self, req: Request, num_full_blocks: int) -> list[bytes]:
        """Extend req.block_hashes to cover `num_full_blocks` full blocks of its tokens."""
        bs = self.block_size
        prompt, output = req.prompt_token_ids, req.output_token_ids
        n = len(prompt)
        while len(req.block_hashes) < num_full_blocks:
            i = len(req.block_hashes)
            start, end = i * bs, (i + 1) * bs
            # Slice prompt and output apart: concatenating them would cost O(length) per block.
            if end <= n:
                tokens = prompt[start:end]
            elif start >= n:
                tokens = output[start - n : end - n]
            else:
                tokens = prompt[start:] + output[: end - n]
            req.block_hashes.append(chain_hash(req.block_hashes[-1] if i else None, tokens))
        return req.block_hashes

    def find_cached_prefix(self, req: Request) -> list[int]:
        """Block ids holding the longest cached prefix of req's tokens.

        The last token is never served from the cache: its logits must be computed.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (req.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for h in self._hashes(req, max_blocks)[:max_blocks]:
            block_id = self.cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        self.prefix_queries += req.num_tokens
        self.prefix_hits += len(hits) * self.block_size
        return hits

    # ---- mutations --------------------------------------------------------------------
    def allocate(self, req: Request, num_new_tokens: int, cached: list[int] | None = None) -> bool:
        """Give req blocks for its computed tokens plus `num_new_tokens`.

        `cached` (only on first scheduling) are prefix-cache hits to take over.
        Returns False, changing nothing, when the pool cannot supply the blocks.
        """
        cached = cached or []
        total = req.num_computed_tokens + len(cached) * self.block_size + num_new_tokens
        need = self.blocks_needed(total) - len(req.block_table) - len(cached)
        # Cached blocks with no owner sit in the free pool: taking them shrinks it too.
        reclaimed = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        if need + reclaimed > len(self.free):
            return False
        for b in cached:
            block = self.blocks[b]
            if block.ref_count == 0:
                del self.free[b]
            block.ref_count += 1
            req.block_table.append(b)
        for _ in range(need):
            b, _ = self.free.popitem(last=False)
            block = self.blocks[b]
            if block.hash is not None:  # evict: its contents are about to be overwritten
                if self.cached.get(block.hash) == b:
                    del self.cached[block.hash]
                block.hash = None
            block.ref_count = 1
            req.block_table.append(b)
            self.num_touched_blocks = max(self.num_touched_blocks, b + 1)
        if self.enable_prefix_caching:
            self._cache_full_blocks(req, total)
        return True

    def _cache_full_blocks(self, req: Request, num_tokens: int) -> None:
        # Blocks are registered as soon as their tokens are scheduled: within one step every
        # layer writes the new K/V before it reads, so a later request in the same step can
        # already share them.
        full = min(num_tokens, req.num_tokens) // self.block_size
        hashes = self._hashes(req, full)
        for i in range(full):
            block = self.blocks[req.block_table[i]]
            if block.hash is None and hashes[i] not in self.cached:
                block.hash = hashes[i]
                self.cached[hashes[i]] = block.block_id

    def free_blocks_after(self, req: Request, num_tokens: int) -> None:
        """Free req's blocks beyond those its first `num_tokens` tokens fill (rejected draft
        tokens'; never cached: only blocks full of known tokens are)."""
        keep = self.blocks_needed(num_tokens)
        for b in reversed(req.block_table[keep:]):
            block = self.blocks[b]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[b] = None
        del req.block_table[keep:]

    def free_request(self, req: Request) -> None:
        # Tail blocks first, so that shared prefixes are the last to be evicted.
        for b in reversed(req.block_table):
            block = self.blocks[b]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[b] = None
        req.block_table = []
