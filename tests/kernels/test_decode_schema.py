"""The layer schema (kernels/decode_schema.h) as Python reads it: its entries, their widths and
shapes, and the parser's refusals (a shape over names the C++ does not define, an entry it
cannot read). Its agreement with the C++ side runs in tests/models/test_fused_decode.py."""

from __future__ import annotations

import pytest

from ember.kernels.decode_schema import (LAYER_SCHEMA, PER_LAYER, SCHEMA_FILE, ModelDims,
                                         SchemaError, _evaluate, parse_schema)


def test_the_schema_file_parses_into_the_layer_list():
    names = [e.name for e in LAYER_SCHEMA]
    assert names == ["input_norm", "qkv_proj", "o_proj", "mlp_norm", "gate_up_proj",
                     "down_proj", "qkv_bias", "q_norm", "k_norm", "post_attention_norm",
                     "post_feedforward_norm"]
    assert PER_LAYER == 2 + 4 * 4 + 5
    dims = ModelDims(hidden=960, heads=15, kv_heads=5, head_dim=64, inter=2560).names()
    shapes = {e.name: (_evaluate(e.rows, dims), _evaluate(e.cols, dims)) for e in LAYER_SCHEMA}
    assert shapes["qkv_proj"] == (960 + 2 * 320, 960)
    assert shapes["gate_up_proj"] == (5120, 960) and shapes["down_proj"] == (960, 2560)
    assert shapes["q_norm"] == (64, 0)


def test_the_parser_refuses_what_the_cpp_would_not_compile_alike():
    text = SCHEMA_FILE.read_text()
    with pytest.raises(SchemaError, match="not an expression over"):
        parse_schema(text + "EMBER_LAYER_TENSOR(extra_norm, NORM, hiden, 0)\n")
    with pytest.raises(SchemaError, match="not an expression over"):
        parse_schema(text + "EMBER_LAYER_TENSOR(extra_norm, NORM, __import__('os'), 0)\n")
    with pytest.raises(SchemaError, match="does not read"):
        parse_schema(text + "EMBER_LAYER_TENSOR(extra_norm, VECTOR, hidden, 0)\n")
    with pytest.raises(SchemaError, match="appears twice"):
        parse_schema(text + "EMBER_LAYER_TENSOR(q_norm, EXTRA, head_dim, 0)\n")
