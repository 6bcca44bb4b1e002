"""Weight-only quantization: the kernels against their dequantized weights, GGUF's Q4 blocks
used as they are, and the accuracy each precision mode keeps on the real model."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT

from conftest import EXACT
from ember import LLM, SamplingParams
from ember.bench.accuracy import score, teacher_forced_logits
from ember.config import EngineConfig
from ember.errors import ConfigError
from ember.loading.gguf import dequantize, unpack_q4_0, unpack_q4_1
from ember.loading.loader import cpu_has_native_bf16, load_model_from_config
from ember.quantization import Int4Linear, Int4Weight, Int8Linear, Int8Weight

TEXT = (Path(__file__).parents[1] / "data" / "perplexity.txt").read_text()
CPU = torch.device("cpu")


def _weight(n: int = 64, k: int = 128) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_linear_computes_with_its_dequantized_weight(group):
    w = Int4Weight.quantize(_weight(), group)
    assert (w.dequantize() - _weight()).abs().max() < 0.6  # 16 levels over each group's range
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    y = Int4Linear(w, None, CPU, torch.bfloat16)(x)
    ref = F.linear(x.float(), w.dequantize())
    assert y.dtype == torch.bfloat16 and y.shape == (5, 64)
    torch.testing.assert_close(y.float(), ref, atol=0.15, rtol=0.02)  # bf16 activations


def test_int4_cpu_packing_blocks_follow_atens_cpu_capability():
    """ATen packs int4 weights in blocks of 64 output rows where it dispatches to AVX512, 32 to
    AVX2: `cpu_block_n` finds the one this process's ATen uses."""
    from ember.quantization.int4 import cpu_block_n

    capability = torch.backends.cpu.get_cpu_capability()
    assert cpu_block_n() == {"AVX512": 64, "AVX2": 32}.get(capability), capability


@pytest.mark.parametrize("group", [32, 128])
def test_int4_linear_many_rows_dequantize_from_the_packed_weight(group, monkeypatch):
    """Without ember's kernels, a prompt's many rows take the dequantize + dense GEMM path
    (eager and compiled): it reads ATen's packed layout correctly, and agrees with ATen's int4
    kernel's result."""
    from ember.quantization import int4
    from ember.quantization.int4 import DENSE_MIN_TOKENS_EAGER, cpu_layout_known

    monkeypatch.setattr(int4.kernels, "available", lambda device: False)
    assert cpu_layout_known()  # the layout check holds on this machine's ATen (AVX2, AVX512)
    w = Int4Weight.quantize(_weight(192, 256), group)
    lin = Int4Linear(w, None, CPU, torch.bfloat16)
    assert lin.dense_for_many_rows
    x = torch.randn(DENSE_MIN_TOKENS_EAGER, 256, dtype=torch.bfloat16)
    ref = F.linear(x.float(), w.dequantize())
    kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(x, lin.weight, group,
                                                        lin.scales_and_zeros)
    compiled = torch.compile(lin, dynamic=False)
    for y in (lin(x), compiled(x[:64])):
        n = y.shape[0]
        torch.testing.assert_close(y.float(), ref[:n], atol=0.3, rtol=0.02)  # bf16 weights
        torch.testing.assert_close(y.float(), kernel[:n].float(), atol=0.3, rtol=0.02)


def test_int8_linear_computes_with_its_dequantized_weight():
    w = Int8Weight.quantize(_weight())
    assert (w.dequantize() - _weight()).abs().max() <= w.scale.max() / 2 + 1e-6
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    y = Int8Linear(w, torch.ones(64), CPU, torch.bfloat16)(x)
    torch.testing.assert_close(y.float(), F.linear(x.float(), w.dequantize()) + 1,
                               atol=0.15, rtol=0.02)


def test_gguf_q4_blocks_map_onto_int4_without_requantization():
    data = np.random.default_rng(0).standard_normal((32, 96)).astype(np.float32)
    for qtype, unpack, convert in ((QT.Q4_1, unpack_q4_1, Int4Weight.from_q4_1),
                                   (QT.Q4_0, unpack_q4_0, Int4Weight.from_q4_0)):
        raw = torch.from_numpy(gguf.quants.quantize(data, qtype))
        w = convert(*unpack(raw, data.shape))
        # The same 4-bit codes, and the file's values to float32 rounding.
        assert torch.equal(w.q, unpack(raw, data.shape)[0])
        torch.testing.assert_close(w.dequantize(), dequantize(raw, qtype, data.shape),
                                   atol=1e-5, rtol=0)


def test_fused_shards_and_unsupported_shapes():
    a, b = Int4Weight.quantize(_weight(16), 32), Int4Weight.quantize(_weight(32), 32)
    fused = Int4Weight.cat([a, b])
    assert fused.out_features == 48
    assert torch.equal(fused.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    from ember.quantization import to_quantized_linear

    odd = Int4Weight.quantize(_weight(40), 32)  # the int4 kernel packs rows by 16
    dense = to_quantized_linear(odd, None, CPU, torch.float32)
    assert isinstance(dense, torch.nn.Linear)
    assert torch.equal(dense.weight, odd.dequantize())


def test_bad_quantization_options_are_refused():
    with pytest.raises(ConfigError, match="unsupported quantization 'fp4'; supported: auto"):
        LLM(model="/unused", quantization="fp4")
    with pytest.raises(ConfigError, match=r"int4 group size must be one of \(32, 64, 128\)"):
        LLM(model="/unused", quantization="int4", int4_group_size=48)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_hf_checkpoint_quantized_generates(tmp_path, hf_tokenizer_dir, method):
    from conftest import write_tiny_llama

    # Sizes the kernels take: rows in multiples of 16, columns in groups of 32.
    path = write_tiny_llama(tmp_path / "m", hf_tokenizer_dir, hidden_size=128,
                            intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    llm = LLM(model=str(path), quantization=method, max_model_len=256)
    layer = llm.llm_engine.model.layers[0]
    kind = Int4Linear if method == "int4" else Int8Linear
    assert isinstance(layer.mlp.gate_up_proj, kind) and isinstance(layer.self_attn.qkv_proj, kind)
    assert isinstance(llm.llm_engine.model.lm_head, Int8Linear)  # the head stays at int8
    assert llm.llm_engine.dtype == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    out = llm.generate(["Hello there"], SamplingParams(temperature=0, max_tokens=8,
                                                      ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 8


# ---- the accuracy guard on the real model -------------------------------------------------
# Tolerated loss against the float32 dense model (teacher-forced over tests/data/perplexity.txt,
# ~310 tokens). Measured (top-1 / perplexity change): gguf, the default, 0.978 / -0.4%;
# int4 (a GGUF's Q4 as they are, int8 head) 0.952 / +0.6%; int8 (re-quantized) 0.936 / +0.7%.
TOLERANCE = {  # mode -> (least top-1 agreement, most perplexity increase)
    "auto": (0.95, 0.02),
    "int4": (0.93, 0.03),
    "int8": (0.91, 0.03),
}


@pytest.fixture(scope="module")
def reference():
    ref = load_model_from_config(EngineConfig(**EXACT), CPU)
    ids = ref.checkpoint.tokenizer.encode(TEXT)
    logits = teacher_forced_logits(ref.model, ids)
    return ids, logits, score(logits, ids).perplexity


@pytest.mark.parametrize("mode", list(TOLERANCE))
def test_precision_modes_keep_accuracy(reference, mode):
    ids, ref_logits, ref_ppl = reference
    assert len(ids) > 250 and 10 < ref_ppl < 60  # a sane reference on real text
    loaded = load_model_from_config(EngineConfig(quantization=mode), CPU)
    assert loaded.quantization == ("gguf" if mode == "auto" else mode)
    assert loaded.dtype == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    # int4 of a GGUF file and its default mode alike use its Q4 tensors as they are.
    kind = Int8Linear if mode == "int8" else Int4Linear
    assert isinstance(loaded.model.layers[0].mlp.down_proj, kind)
    acc = score(teacher_forced_logits(loaded.model, ids), ids, ref_logits)
    least_top1, most_ppl = TOLERANCE[mode]
    assert acc.top1_agreement >= least_top1, acc
    assert acc.perplexity <= ref_ppl * (1 + most_ppl), (acc, ref_ppl)


def test_quantization_under_tensor_parallelism_is_refused_before_loading(tiny_llama_dir):
    with pytest.raises(ConfigError, match="quantization with tensor_parallel_size > 1 is not "
                                          "supported yet"):
        LLM(model=str(tiny_llama_dir), tensor_parallel_size=2, quantization="int8")
