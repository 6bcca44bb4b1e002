"""The fused decode step (`models.fused_decode`, ember_cpu.decode_layers) computes what the
decoder layers compute, on the real model in its default mode (int4, in the activation dtype
`resolve_precision` picks for the CPU) and in the exactness mode (dense float32), and steps
aside where it cannot serve the model."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import EXACT
from ember import LLM, SamplingParams, kernels
from ember.kernels.decode_schema import (LAYER_SCHEMA, PER_LAYER, LayerTensors, ModelDims,
                                         SchemaError)
from ember.layers.attention import AttentionMetadata
from ember.loading.loader import resolve_precision
from ember.models.fused_decode import _projection
from ember.quantization.int4 import Int4Linear

BLOCK = 16
CPU = torch.device("cpu")
# Three sequences at different context lengths (a block edge among them), blocks apart.
CONTEXTS = (5, 16, 40)


@torch.inference_mode()
def _decode_twice(model, caches, text):
    """One decode step for three sequences, through the fused call and through the layers
    (from the same cache: the step's K/V slots are rewritten by the second): hidden states,
    and the K/V each wrote for layer 0 and the last layer."""
    text = text * 4
    tables = torch.stack([torch.arange(4) + 1 + 4 * i for i in range(len(CONTEXTS))])
    ids, positions, slots = [], [], []
    for i, n in enumerate(CONTEXTS):  # the prompts, through the layers
        pos = torch.arange(n)
        ids += text[7 * i : 7 * i + n]
        positions.append(pos)
        slots.append(tables[i, pos // BLOCK] * BLOCK + pos % BLOCK)
    model(torch.tensor(ids), torch.cat(positions), caches,
          AttentionMetadata.build(torch.cat(slots), CONTEXTS, CONTEXTS, tables.tolist(), BLOCK))
    pos = torch.tensor(CONTEXTS)
    step = (torch.tensor([text[7 * i + n] for i, n in enumerate(CONTEXTS)]), pos)
    step_slots = tables[torch.arange(len(CONTEXTS)), pos // BLOCK] * BLOCK + pos % BLOCK
    meta = AttentionMetadata.build(step_slots, [1] * len(CONTEXTS), (pos + 1).tolist(),
                                   tables.tolist(), BLOCK)
    fused = model.fused_decode
    results = []
    for use in (fused, None):
        model.fused_decode = use
        hidden = model(*step, caches, meta)
        kv = [c[step_slots].clone() for layer in (0, -1) for c in caches[layer]]
        results.append((hidden, kv))
    model.fused_decode = fused
    return results


@torch.inference_mode()
def _check(llm, atol):
    model, caches = llm.llm_engine.model, llm.llm_engine.runner.kv_caches
    assert model.fused_decode is not None
    text = llm.get_tokenizer().encode(
        "The old lighthouse keeper climbed the stairs every evening, counting the steps as his "
        "father had taught him, and at the top he lit the lamp.")
    (h_fused, kv_fused), (h_layers, kv_layers) = _decode_twice(model, caches, text)
    for a, b in zip(kv_fused, kv_layers):
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=atol)
    torch.testing.assert_close(h_fused, h_layers, atol=atol, rtol=atol)
    logits_fused, logits_layers = model.compute_logits(h_fused), model.compute_logits(h_layers)
    assert torch.equal(logits_fused.argmax(-1), logits_layers.argmax(-1))
    return logits_fused, logits_layers


TEXT = ("The old lighthouse keeper climbed the stairs every evening, counting the steps as "
        "his father had taught him. At the top he lit the lamp, wound the clockwork that turned "
        "the lens, and wrote the weather in a small leather book: wind from the west, a light "
        "rain, three ships passing before midnight, and no sign of the storm the radio had "
        "promised.")


@torch.inference_mode()
def _teacher_forced_decode(llm, ids: list[int], fused: bool) -> torch.Tensor:
    """Feed `ids` one decode step at a time (one sequence, blocks 1, 2, ...): the logits."""
    model, caches = llm.llm_engine.model, llm.llm_engine.runner.kv_caches
    saved = model.fused_decode
    model.fused_decode = saved if fused else None
    tables = (torch.arange(-(-len(ids) // BLOCK)) + 1)[None]
    logits = []
    try:
        for pos, token in enumerate(ids):
            slot = torch.tensor([int(tables[0, pos // BLOCK]) * BLOCK + pos % BLOCK])
            meta = AttentionMetadata.build(slot, [1], [pos + 1], tables.tolist(), BLOCK)
            hidden = model(torch.tensor([token]), torch.tensor([pos]), caches, meta)
            logits.append(model.compute_logits(hidden)[0])
    finally:
        model.fused_decode = saved
    return torch.stack(logits)


@pytest.fixture(scope="module")
def exact():
    """The exactness mode (float32): the step's logits fused and through the layers, and
    the text's decode logits through the layers (the reference). An engine of its own: these
    tests write its KV blocks behind the block manager's back (the shared `default_llm`'s
    prefix cache would then serve corrupted blocks)."""
    llm = LLM(**EXACT, max_model_len=256, enforce_eager=True)
    ids = llm.get_tokenizer().encode(TEXT)
    return _check(llm, atol=2e-4), _teacher_forced_decode(llm, ids, False)


def test_fused_decode_matches_the_layers_exactness_mode(exact):
    fused, layers = exact[0]
    torch.testing.assert_close(fused, layers, atol=1e-3, rtol=1e-4)


def test_fused_decode_matches_the_layers_default_mode(exact):
    llm = LLM(max_model_len=256, enforce_eager=True)
    down = llm.llm_engine.model.layers[0].mlp.down_proj
    assert isinstance(down, Int4Linear)
    # bf16 activations and ember's bf16 tiles where the CPU has AVX512-BF16; float32 and the
    # column tiles elsewhere: the fused step serves either.
    dtype, _ = resolve_precision(llm.llm_engine.config, CPU)
    assert llm.llm_engine.model.embed_tokens.weight.dtype == dtype
    assert down.tiled == (dtype == torch.bfloat16 and kernels.int4_tiles(CPU))
    assert down.tiled or down.columns
    # bf16: the eager layers round after every op, the fused step (like the compiled graph)
    # once per fused computation: 1-ulp flips spread a little.
    fused, layers = _check(llm, atol=0.1)
    assert (fused - layers).abs().max() < 0.1 * layers.std()
    # Over a text fed one decode step at a time, against the float32 logits of the same
    # weights: the fused step is as accurate as the layers (bf16 noise moves both).
    ids = llm.get_tokenizer().encode(TEXT)
    reference = exact[1]
    top1 = reference.argmax(-1)
    stats = {}
    for name, use in (("fused", True), ("layers", False)):
        logits = _teacher_forced_decode(llm, ids, use)
        stats[name] = ((logits.argmax(-1) == top1).float().mean().item(),
                       (logits - reference).abs().mean().item())
    print(f"decode of {len(ids)} tokens vs float32 (top-1 agreement, mean |logit error|): "
          f"{stats}")
    assert stats["fused"][0] >= 0.9 and stats["fused"][0] >= stats["layers"][0] - 0.05
    assert stats["fused"][1] <= 1.5 * stats["layers"][1]
    # Through the engine: every step goes through the fused call, and greedy text agrees with
    # the layers' (its first tokens at least: later, near-ties may part them).
    model = llm.llm_engine.model
    fused_decode, calls = model.fused_decode, []
    model.fused_decode = lambda *args: calls.append(1) or fused_decode(*args)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    try:
        with_fused = [o.outputs[0].token_ids for o in llm.generate(prompts, params,
                                                                    use_tqdm=False)]
        assert len(calls) == 24  # every step: the prompts', then 23 of decodes
        model.fused_decode = None
        alone = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        model.fused_decode = fused_decode
    assert [t[:8] for t in with_fused] == [t[:8] for t in alone]


def test_fused_decode_steps_aside_where_it_cannot_serve(tiny_llama_dir):
    llm = LLM(model=str(tiny_llama_dir), max_model_len=128, enforce_eager=True)
    model = llm.llm_engine.model
    assert model.fuse_decode()  # dense float32 layers: served
    # Its C++ call checks what it indexes with: a bad id or position is an error, not a read
    # out of bounds.
    caches = llm.llm_engine.runner.kv_caches
    meta = AttentionMetadata.build([16], [1], [1], [[1]], BLOCK)
    vocab = model.embed_tokens.weight.shape[0]
    with torch.inference_mode():
        model(torch.tensor([3]), torch.tensor([0]), caches, meta)  # in range: fine
        with pytest.raises(RuntimeError, match="out of range"):
            model(torch.tensor([vocab]), torch.tensor([0]), caches, meta)
        with pytest.raises(RuntimeError, match="beyond the rotary tables"):
            model(torch.tensor([3]), torch.tensor([10**6]), caches, meta)
    handle = model.layers[1].mlp.down_proj.register_forward_hook(lambda *a: None)
    assert not model.fuse_decode()  # a hook (tensor parallelism's all-reduce) must run
    handle.remove()
    model.layers[0].self_attn.qkv_proj.bias = torch.nn.Parameter(
        torch.zeros(model.layers[0].self_attn.qkv_proj.out_features), requires_grad=False)
    assert model.fuse_decode()  # a Q/K/V bias (Qwen2's) travels in the layer's extras
    model.layers[0].self_attn.o_proj.bias = torch.nn.Parameter(
        torch.zeros(model.layers[0].self_attn.o_proj.out_features), requires_grad=False)
    assert not model.fuse_decode()  # no family has an output projection bias
    assert model.fused_decode is None


def test_the_layer_schema_names_a_misaligned_tensor(tiny_llama_dir):
    """decode_schema.h describes each layer's tensors for both sides: a wrong dtype, a wrong
    shape, swapped entries or a wrong count fail with the tensor's name, in Python when the
    list is built and in C++ when it is called (hidden 64, q_size 64, kv_size 32, inter 128;
    layer 1 is the one broken)."""
    llm = LLM(model=str(tiny_llama_dir), max_model_len=128, enforce_eager=True)
    model = llm.llm_engine.model
    fused = model.fused_decode
    assert fused is not None
    assert len(fused.params) == len(model.layers) * PER_LAYER
    assert [e.name for e in LAYER_SCHEMA][:6] == [
        "input_norm", "qkv_proj", "o_proj", "mlp_norm", "gate_up_proj", "down_proj"]
    dims = ModelDims(hidden=64, heads=4, kv_heads=2, head_dim=16, inter=128)
    layer = model.layers[1]

    def parts(**changes):
        attn, mlp = layer.self_attn, layer.mlp
        base = {"input_norm": layer.input_layernorm.weight,
                "qkv_proj": _projection(attn.qkv_proj, torch.float32),
                "o_proj": _projection(attn.o_proj, torch.float32),
                "mlp_norm": layer.post_attention_layernorm.weight,
                "gate_up_proj": _projection(mlp.gate_up_proj, torch.float32),
                "down_proj": _projection(mlp.down_proj, torch.float32),
                **{name: torch.empty(0) for name in (
                    "qkv_bias", "q_norm", "k_norm", "post_attention_norm",
                    "post_feedforward_norm")}}
        return LayerTensors({**base, **changes})

    assert len(parts().flat(1, dims, torch.float32)) == PER_LAYER
    # Python, building the list:
    with pytest.raises(SchemaError, match="layer 1's input_norm must be a contiguous "
                                          r"\[hidden\] = \[64\] vector of torch.float32, got "
                                          "torch.bfloat16"):
        parts(input_norm=layer.input_layernorm.weight.bfloat16()).flat(1, dims, torch.float32)
    with pytest.raises(SchemaError, match=r"layer 1's o_proj must be a \[hidden, q_size\] = "
                                          r"\[64, 64\] projection, got \[64, 128\]"):
        parts(o_proj=parts().parts["down_proj"], down_proj=parts().parts["o_proj"]).flat(
            1, dims, torch.float32)
    with pytest.raises(SchemaError, match="layer 1's q_norm must be empty or a contiguous "
                                          r"\[head_dim\] = \[16\] vector"):
        parts(q_norm=torch.ones(64)).flat(1, dims, torch.float32)
    with pytest.raises(SchemaError, match="layer 1's k_norm is missing"):
        LayerTensors({k: v for k, v in parts().parts.items() if k != "k_norm"}).flat(
            1, dims, torch.float32)

    # C++, on each call (a list that bypassed the Python side):
    caches = llm.llm_engine.runner.kv_caches
    meta = AttentionMetadata.build([16], [1], [1], [[1]], BLOCK)
    step = (torch.tensor([3]), torch.tensor([0]), caches, meta)

    def call(params):
        broken = copy.copy(fused)
        broken.params = params
        with torch.inference_mode():
            return broken(*step)

    p, base = list(fused.params), PER_LAYER  # layer 1's tensors start at `base`
    with torch.inference_mode():
        torch.testing.assert_close(call(p), fused(*step))  # the list as built: fine
    wrong_dtype = p[:base] + [p[base].bfloat16()] + p[base + 1:]
    with pytest.raises(RuntimeError, match="layer 1's input_norm must be a contiguous "
                                           r"\[hidden = 64\] vector of Float, got BFloat16"):
        call(wrong_dtype)
    qkv, gate_up = base + 1, base + 1 + 4 + 4 + 1  # the first tensor of each projection
    swapped = list(p)
    swapped[qkv], swapped[gate_up] = p[gate_up], p[qkv]
    with pytest.raises(RuntimeError, match=r"layer 1's qkv_proj must be a "
                                           r"\[q_size \+ 2 \* kv_size, hidden\] = \[128, 64\] "
                                           r"projection, got a \[256, 64\] one"):
        call(swapped)
    wrong_shape = list(p)
    wrong_shape[base + PER_LAYER - 4] = torch.ones(64)  # layer 1's q_norm, hidden-sized
    with pytest.raises(RuntimeError, match=r"layer 1's q_norm must be empty or a contiguous "
                                           r"\[head_dim = 16\] vector"):
        call(wrong_shape)
    with pytest.raises(RuntimeError, match=f"{len(p) - 1} params for {len(model.layers)} "
                                           "layers, where the "
                                           f"schema \\(decode_schema.h\\) has {PER_LAYER}"):
        call(p[:-1])
