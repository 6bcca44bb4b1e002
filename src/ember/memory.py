"""Weights and KV cache in transparent huge pages (Linux, CPU).

A decode step streams ~100 MB (the weights, then each sequence's KV blocks) through a 2-core
CPU once per token. In 4 KiB pages that is a TLB miss every 4 KiB and a page walk in the
middle of every stream; Linux serves 2 MiB pages to memory that asks for them
(`madvise(MADV_HUGEPAGE)`, honoured in the default THP mode "madvise"), but PyTorch's
allocator asks only when THP_MEM_ALLOC_ENABLE is set, and a model's tensors are mostly
smaller than a huge page anyway. So the tensors a decode step reads are packed into one
2 MiB-aligned block (`pack`), in the order the step reads them, and the KV cache is one
block (`empty`): the int4 GEMVs run faster over packed weights (docs/benchmarks.md).

On CUDA nothing moves; on other systems, or where the kernel refuses, the blocks are plain
allocations.
"""

from __future__ import annotations

import ctypes
import logging
import sys

import torch

logger = logging.getLogger("ember")

HUGE_PAGE = 2 << 20
ALIGN = 64  # each packed tensor starts on a cache line
_MADV_HUGEPAGE = 14


def transparent_huge_pages() -> str:
    """The system's THP mode (always / madvise / never), "unavailable" where there is none."""
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
        return text[text.index("[") + 1 : text.index("]")]
    except (OSError, ValueError):
        return "unavailable"


def _madvise_huge(t: torch.Tensor) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.madvise(ctypes.c_void_p(t.data_ptr()), ctypes.c_size_t(t.numel()),
                            _MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        return False


def empty(nbytes: int, device: torch.device) -> torch.Tensor:
    """`nbytes` uint8, untouched, in huge pages where the system gives them (CPU on Linux)."""
    if device.type != "cpu" or not sys.platform.startswith("linux") or nbytes < HUGE_PAGE:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    raw = torch.empty(size + HUGE_PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    block = raw[start : start + size]  # whole huge pages; the views keep `raw` alive
    if not _madvise_huge(block):
        logger.debug("madvise(MADV_HUGEPAGE) refused: 4 KiB pages")
    return block[:nbytes]


def pack(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """Move `tensors` (CPU, each once) into one block, in this order, each on its own cache
    line. Every tensor keeps its identity (its `.data` now lives in the block), so the modules
    that own them see the same values. Returns the block (None when there is nothing)."""
    unique = {id(t): t for t in tensors if t.numel() > 0}
    tensors = list(unique.values())
    if not tensors or tensors[0].device.type != "cpu":
        return None
    offsets, end = [], 0
    for t in tensors:
        offsets.append(end)
        end += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    block = empty(end, tensors[0].device)
    since_trim = 0
    for t, offset in zip(tensors, offsets):
        view = block[offset : offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        view.copy_(t)
        t.data = view  # the old storage goes (when nothing else holds it)
        since_trim += view.numel() * view.element_size()
        if since_trim >= _TRIM_EVERY:
            _trim()
            since_trim = 0
    _trim()
    return block


# The tensors moved out of malloc's heap leave free memory there that the allocator keeps
# resident; handed back to the system as the block fills (glibc's malloc_trim), so the
# process's peak memory does not count the weights twice.
_TRIM_EVERY = 8 << 20


def _trim() -> None:
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
