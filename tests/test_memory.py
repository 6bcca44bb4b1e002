"""Weights packed into one huge-page block in reading order (`ember.memory`)."""

from __future__ import annotations

import sys

import torch

from ember import memory


def test_pack_moves_tensors_in_order_and_keeps_them():
    tensors = [torch.randn(1000, 700), torch.arange(5, dtype=torch.int8),
               torch.nn.Parameter(torch.randn(33).bfloat16(), requires_grad=False),
               torch.empty(0), torch.randn(300, 1024)]
    tensors.append(tensors[0])  # listed twice: packed once
    before = [t.clone() for t in tensors]
    ids = [id(t) for t in tensors]
    block = memory.pack(tensors)
    assert block is not None and block.numel() >= memory.HUGE_PAGE
    assert [id(t) for t in tensors] == ids  # the same objects (the modules keep theirs)
    for t, b in zip(tensors, before):
        assert torch.equal(t, b) and t.dtype == b.dtype and t.shape == b.shape
    moved = [t for t in tensors[:-1] if t.numel()]
    starts = [t.data_ptr() for t in moved]
    assert starts == sorted(starts)  # in the order given
    assert all(p % memory.ALIGN == 0 for p in starts)
    base = block.data_ptr()
    assert all(base <= p < base + block.numel() for p in starts)
    if sys.platform.startswith("linux"):
        assert base % memory.HUGE_PAGE == 0
    assert isinstance(tensors[2], torch.nn.Parameter)
    tensors[0].add_(1)  # still writable and still the caller's
    assert torch.equal(tensors[0], before[0] + 1)


def test_pack_leaves_other_devices_alone():
    assert memory.pack([]) is None
    assert memory.pack([torch.empty(0)]) is None
    meta = torch.empty(10, device="meta")
    assert memory.pack([meta]) is None and meta.device.type == "meta"


def test_the_loaded_model_reads_one_block(default_llm):
    """What a decode step reads (the layers, the final norm, the head) lies in one block, in
    the order the step reads it."""
    model = default_llm.llm_engine.model
    modules = [*model.layers.modules(), model.norm, model.lm_head]
    tensors = [t for m in modules for t in (*m.parameters(recurse=False),
                                            *m.buffers(recurse=False)) if t.numel()]
    storages = {t.untyped_storage().data_ptr() for t in tensors}
    assert len(storages) == 1
    starts = [t.data_ptr() for t in tensors]
    assert starts == sorted(starts)
