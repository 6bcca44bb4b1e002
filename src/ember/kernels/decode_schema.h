// One decoder layer's tensors as `decode_layers` takes them (its `params`, layer after layer),
// in this order. Both sides read this list: decode.cpp expands it into the slots it indexes
// and the checks it runs on each call; ember/kernels/decode_schema.py parses it to build the
// list from a model's modules and to check it once, when the fused decode is built. A model
// change that misaligns the two fails on the tensor's name, not in the arithmetic.
//
// EMBER_LAYER_TENSOR(name, kind, rows, cols):
//   NORM   an RMSNorm weight [rows] in the activation dtype (cols: 0)
//   PROJ   a projection of an [rows, cols] weight: 4 tensors, by its layout (decode.cpp's
//          `project`)
//   EXTRA  what only some families have: empty, or [rows] in the activation dtype (cols: 0)
// rows and cols are expressions, in C++ and in Python alike, over the model's dims: hidden,
// head_dim, q_size (heads * head_dim), kv_size (kv_heads * head_dim), inter (the MLP's width).
EMBER_LAYER_TENSOR(input_norm, NORM, hidden, 0)
EMBER_LAYER_TENSOR(qkv_proj, PROJ, q_size + 2 * kv_size, hidden)
EMBER_LAYER_TENSOR(o_proj, PROJ, hidden, q_size)
EMBER_LAYER_TENSOR(mlp_norm, NORM, hidden, 0)
EMBER_LAYER_TENSOR(gate_up_proj, PROJ, 2 * inter, hidden)
EMBER_LAYER_TENSOR(down_proj, PROJ, hidden, inter)
EMBER_LAYER_TENSOR(qkv_bias, EXTRA, q_size + 2 * kv_size, 0)
EMBER_LAYER_TENSOR(q_norm, EXTRA, head_dim, 0)
EMBER_LAYER_TENSOR(k_norm, EXTRA, head_dim, 0)
EMBER_LAYER_TENSOR(post_attention_norm, EXTRA, hidden, 0)
EMBER_LAYER_TENSOR(post_feedforward_norm, EXTRA, hidden, 0)
