// decode_layers: a Llama-family model's step (decodes, prompt chunks, speculative verify rows:
// each sequence's query rows, `query_start`), from the token ids to the final norm, in one
// call from Python. Named for the decode steps it was made for; on CPU it runs every step, so
// that a token takes the same arithmetic whatever step it is in (with the matmul and
// attention kernels' fixed reduction orders: bitwise the same result).
//
// A decode step of a small model is a few hundred small kernels; entered one at a time from
// Python (or one compiled layer at a time), their launch and guard costs add up to a fifth of
// the step. Here the layer loop runs in C++: RMSNorm, rotary embedding, the KV write and SiLU *
// up are loops over the batch's rows, each row on its own, the projections go to the matmul
// kernels (ember's int4 / K-quant, ATen's int8 or dense), the attention to `paged_attention`;
// the embedding lookup (a dense table or a K-quant's tiles), the rotary tables' rows and the
// final norm come along, so that nothing but the head is left to Python.
// The arithmetic is the model's (`models/llama.py`): the residual stream in float32, the norms'
// outputs rounded to the activation dtype before and after the weight, rotary and SiLU * up
// computed in float32 from activation-dtype inputs and rounded once, as the compiled graph
// does. Each layer's tensors come in one list, in the order of the layer schema
// (decode_schema.h), checked against it on every call. The families' choices (`config.Family`)
// are entries of that schema where they are tensors (QKV bias, QK-norm, Gemma's norms after
// attention and MLP), the rest come as `FamilyArgs`: Gemma's (1 + w) weights, GELU-tanh, the
// embedding scale, per-layer sliding windows and the sliding layers' own rotary tables.
#include "common.h"

#include <torch/library.h>

#include <cmath>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace ember {
namespace {

// Tensors per entry of the layer schema (decode_schema.h), by kind.
constexpr int64_t kWidthNORM = 1, kWidthPROJ = 4, kWidthEXTRA = 1;

// Each layer's tensors, at these offsets in `params` (kPerLayer a layer): the schema's entries
// in order, a projection's 4 from k_<name> on.
enum LayerSlot : int64_t {
#define EMBER_LAYER_TENSOR(name, kind, rows, cols) \
  k_##name, k_##name##_last = k_##name + kWidth##kind - 1,
#include "decode_schema.h"
#undef EMBER_LAYER_TENSOR
  kPerLayer
};

// A projection's 4 tensors: int4 in ember's bf16 tiles ([N / 16, K / 8, 64], scales, zeros,
// -: see int4_tiled_linear) or column tiles (int32 [N / 16, K / 8, 16], scales, offsets, -:
// see int4_linear); int8 in column tiles (int8 [N / 16, K, 16], scales [K / G, N], -, -: see
// int8_linear); dense in column tiles ([N / 16, K, 16] weight, -, -, -: see dense_linear) or
// as it is ([N, K] weight, -, -, -: ATen's matmul, whose rows depend on the row count); GGUF
// K-quant / Q5 (see kquant_linear): the first segment's tiles, the segments' kinds (int64
// [1..3]), the second and third segments' tiles (or empty).
at::Tensor project(const at::Tensor& x, const at::Tensor* p, int64_t group_size) {
  switch (p[0].scalar_type()) {
    case at::kByte:
      if (p[1].scalar_type() == at::kLong) {
        const int64_t segments = p[1].numel();
        std::vector<at::Tensor> tiles{p[0]};
        for (int64_t i = 1; i < segments; ++i) tiles.push_back(p[1 + i]);
        return kquant_linear(x, tiles, at::IntArrayRef(p[1].data_ptr<int64_t>(), segments),
                             x.size(1), false);
      }
      return int4_tiled_linear(x, p[0], p[1], p[2], group_size);
    case at::kInt: return int4_linear(x, p[0], p[1], p[2], group_size);
    case at::kChar: return int8_linear(x, p[0], p[1]).to(x.scalar_type());
    default: return p[0].dim() == 3 ? dense_linear(x, p[0]) : at::mm(x, p[0].t());
  }
}

// The [rows, cols] of the weight a projection's 4 tensors hold, read from its layout as
// `project` reads it; {-1, -1} for no layout it knows.
std::pair<int64_t, int64_t> projection_shape(const at::Tensor* p) {
  switch (p[0].scalar_type()) {
    case at::kByte:
      if (p[1].scalar_type() == at::kLong) {  // K-quant segments
        if (p[0].dim() != 3 || p[1].numel() < 1 || p[1].numel() > 3) break;
        int64_t rows = 0;
        for (int64_t i = 0; i < p[1].numel(); ++i) {
          const at::Tensor& t = i == 0 ? p[0] : p[1 + i];
          if (t.dim() != 3) return {-1, -1};
          rows += t.size(0) * 16;
        }
        return {rows, p[0].size(1) * kquant_block(p[1].data_ptr<int64_t>()[0])};
      }
      if (p[0].dim() == 3) return {p[0].size(0) * 16, p[0].size(1) * 8};  // bf16 tiles
      break;
    case at::kInt:  // column tiles
      if (p[0].dim() == 3) return {p[0].size(0) * 16, p[0].size(1) * 8};
      break;
    case at::kChar:  // column tiles
      if (p[0].dim() == 3) return {p[0].size(0) * 16, p[0].size(1)};
      break;
    case at::kFloat:
    case at::kBFloat16:
      if (p[0].dim() == 3) return {p[0].size(0) * 16, p[0].size(1)};  // column tiles
      if (p[0].dim() == 2) return {p[0].size(0), p[0].size(1)};
      break;
    default:
      break;
  }
  return {-1, -1};
}

// The model's dims the schema's shapes are written in (decode_schema.h).
struct Dims {
  int64_t hidden, head_dim, q_size, kv_size, inter;
};

// Layer `l`'s tensors p[0, kPerLayer) against the schema: each entry's dtype, shape and
// layout, the error naming the entry.
void check_layer(int64_t l, const at::Tensor* p, const Dims& dims, at::ScalarType dtype) {
  const auto [hidden, head_dim, q_size, kv_size, inter] = dims;
  auto vector_ok = [&](const at::Tensor& t, int64_t n) {
    return t.scalar_type() == dtype && t.dim() == 1 && t.numel() == n && t.is_contiguous();
  };
#define EMBER_CHECK_NORM(name, rows, cols)                                                     \
  TORCH_CHECK(vector_ok(p[k_##name], rows), "decode_layers: layer ", l, "'s " #name            \
              " must be a contiguous [" #rows " = ", rows, "] vector of ", dtype, ", got ",   \
              p[k_##name].scalar_type(), " ", p[k_##name].sizes());
#define EMBER_CHECK_EXTRA(name, rows, cols)                                                    \
  TORCH_CHECK(p[k_##name].numel() == 0 || vector_ok(p[k_##name], rows), "decode_layers: layer ", \
              l, "'s " #name " must be empty or a contiguous [" #rows " = ", rows,            \
              "] vector of ", dtype, ", got ", p[k_##name].scalar_type(), " ",                \
              p[k_##name].sizes());
#define EMBER_CHECK_PROJ(name, rows, cols)                                                     \
  {                                                                                            \
    const at::Tensor* q = p + k_##name;                                                        \
    const auto [n, k] = projection_shape(q);                                                   \
    TORCH_CHECK(n == (rows) && k == (cols), "decode_layers: layer ", l, "'s " #name            \
                " must be a [" #rows ", " #cols "] = [", rows, ", ", cols, "] projection, got ", \
                n < 0 ? std::string("no layout decode_layers runs") :                          \
                        "a [" + std::to_string(n) + ", " + std::to_string(k) + "] one",        \
                " (first tensor ", q[0].scalar_type(), " ", q[0].sizes(), ")");               \
    TORCH_CHECK(!c10::isFloatingType(q[0].scalar_type()) || q[0].scalar_type() == dtype,        \
                "decode_layers: layer ", l, "'s " #name " is dense in ", q[0].scalar_type(),    \
                ", the activations in ", dtype);                                              \
    for (int i = 0; i < kWidthPROJ; ++i)                                                       \
      TORCH_CHECK(q[i].is_contiguous(), "decode_layers: layer ", l, "'s " #name " tensor ", i,  \
                  " must be contiguous");                                                      \
  }
#define EMBER_LAYER_TENSOR(name, kind, rows, cols) EMBER_CHECK_##kind(name, rows, cols)
#include "decode_schema.h"
#undef EMBER_LAYER_TENSOR
#undef EMBER_CHECK_NORM
#undef EMBER_CHECK_EXTRA
#undef EMBER_CHECK_PROJ
}

// x * rsqrt(mean(x^2) + eps), rounded to AT, times the weight, rounded: RMSNorm's two casts.
// With an offset (Gemma's (1 + w)): x * rsqrt(...) * (offset + w) in float32, rounded once.
template <typename AT>
void rms_norm(const float* x, const AT* w, int64_t n, float eps, AT* out, float offset = 0.f) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += x[i] * x[i];
  const float r = 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
  if (offset != 0.f) {
    for (int64_t i = 0; i < n; ++i) out[i] = from_float<AT>(x[i] * r * (offset + to_float(w[i])));
    return;
  }
  for (int64_t i = 0; i < n; ++i)
    out[i] = from_float<AT>(to_float(w[i]) * to_float(from_float<AT>(x[i] * r)));
}

// rms_norm of an activation-dtype row (a head's q or k, a block's output), in place or not.
template <typename AT>
void rms_norm_row(const AT* x, const AT* w, int64_t n, float eps, float offset, AT* out) {
  float buf[8192];
  for (int64_t i = 0; i < n; ++i) buf[i] = to_float(x[i]);
  rms_norm(buf, w, n, eps, out, offset);
}

// GELU with the tanh approximation (Gemma's gelu_pytorch_tanh).
inline float gelu_tanh(float x) {
  return 0.5f * x * (1.f + std::tanh(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

// Rotate-half rotary embedding of one head: out = x * cos + rotate_half(x) * sin.
template <typename AT, typename OT>
void rotate(const AT* x, const AT* cos, const AT* sin, int64_t dim, OT* out) {
  const int64_t half = dim / 2;
  for (int64_t d = 0; d < half; ++d) {
    const float a = to_float(x[d]), b = to_float(x[d + half]);
    out[d] = from_float<OT>(a * to_float(cos[d]) - b * to_float(sin[d]));
    out[d + half] = from_float<OT>(b * to_float(cos[d + half]) + a * to_float(sin[d + half]));
  }
}

// What a family does differently from Llama (see `config.Family`).
struct FamilyArgs {
  c10::ArrayRef<int64_t> windows;         // per layer: sliding window (0: global)
  const at::Tensor &local_cos, &local_sin;  // the sliding layers' rotary tables (or empty)
  float norm_offset;                      // RMSNorm weights are (offset + w)
  int64_t activation;                     // 0: SiLU, 1: GELU-tanh
  float embed_scale;                      // embeddings times this (rounded to the dtype)
};

// The op's arguments, once checked (see decode_layers).
struct StepArgs {
  const at::Tensor &ids, &positions, &embedding, &cos_table, &sin_table;
  at::TensorList params;
  const at::Tensor& final_norm;
  at::TensorList k_caches, v_caches;
  const at::Tensor &slots, &block_tables, &query_start, &seq_lens;
  int64_t block_size, heads, kv_heads, group_size;
  float eps, scale;
  int64_t embedding_kind;
};

// AT: the activations' type; CT: the KV cache's (AT, or bfloat16 under float32 activations).
template <typename AT, typename CT>
at::Tensor run_layers(const StepArgs& args, const FamilyArgs& fam) {
  const auto& [ids, positions, embedding, cos_table, sin_table, params, final_norm, k_caches,
               v_caches, slots, block_tables, query_start, seq_lens, block_size, heads, kv_heads,
               group_size, eps, scale, embedding_kind] = args;
  const int64_t T = ids.size(0), D = final_norm.numel(), dim = cos_table.size(1);
  const int64_t q_size = heads * dim, kv_size = kv_heads * dim;
  const auto act = final_norm.options();
  const float offset = fam.norm_offset;
  const bool local_rope = fam.local_cos.numel() > 0;
  // The residual stream (float32) from the embedding rows (scaled in the activation dtype,
  // as the model does); each token's rotary cos and sin rounded to the activation dtype, as
  // the layers get them: the global tables' rows, then the sliding layers' own.
  at::Tensor x = at::empty({T, D}, act.dtype(at::kFloat));
  float* xp = x.data_ptr<float>();
  at::Tensor rope = at::empty({local_rope ? 4 : 2, T, dim}, act);
  const int64_t* idp = ids.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  if (embedding_kind >= 0)  // a K-quant embedding: its rows, rounded as the layers get them
    kquant_rows_into(embedding, idp, T, embedding_kind, D, xp);
  const AT* ep = embedding_kind >= 0 ? nullptr : embedding.data_ptr<AT>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < D; ++i) {
      const float e = embedding_kind >= 0 ? to_float(from_float<AT>(xp[t * D + i]))
                                          : to_float(ep[idp[t] * D + i]);
      xp[t * D + i] = fam.embed_scale == 1.f ? e : to_float(from_float<AT>(e * fam.embed_scale));
    }
  for (int64_t table = 0; table < (local_rope ? 2 : 1); ++table) {
    const float* ctp = (table ? fam.local_cos : cos_table).data_ptr<float>();
    const float* stp = (table ? fam.local_sin : sin_table).data_ptr<float>();
    AT* c = rope.data_ptr<AT>() + 2 * table * T * dim;
    AT* sn = c + T * dim;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t d = 0; d < dim; ++d) {
        c[t * dim + d] = from_float<AT>(ctp[pp[t] * dim + d]);
        sn[t * dim + d] = from_float<AT>(stp[pp[t] * dim + d]);
      }
  }
  at::Tensor h = at::empty({T, D}, act);
  at::Tensor q = at::empty({T, heads, dim}, act);
  AT* hp = h.data_ptr<AT>();
  AT* qp = q.data_ptr<AT>();
  const int64_t* sl = slots.data_ptr<int64_t>();
  const int64_t layers = static_cast<int64_t>(k_caches.size());
  std::vector<AT> k_rounded(dim);  // a rotated key head, before it goes to a CT cache
  // x += norm(y) row by row (a norm after a block, Gemma's) or x += y.
  auto add_block = [&](const at::Tensor& y, const at::Tensor& post_norm) {
    const AT* yp = y.data_ptr<AT>();
    if (post_norm.numel() == 0) {
#pragma omp simd
      for (int64_t i = 0; i < T * D; ++i) xp[i] += to_float(yp[i]);
      return;
    }
    for (int64_t t = 0; t < T; ++t) {
      rms_norm_row(yp + t * D, post_norm.data_ptr<AT>(), D, eps, offset, hp + t * D);
      for (int64_t i = 0; i < D; ++i) xp[t * D + i] += to_float(hp[t * D + i]);
    }
  };
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* p = params.data() + l * kPerLayer;
    const AT* norm1 = p[k_input_norm].data_ptr<AT>();
    const AT* norm2 = p[k_mlp_norm].data_ptr<AT>();
    const at::Tensor& bias = p[k_qkv_bias];
    CT* kc = k_caches[l].data_ptr<CT>();
    CT* vc = v_caches[l].data_ptr<CT>();
    const int64_t window = fam.windows[l];
    const AT* cp = rope.data_ptr<AT>() + (local_rope && window > 0 ? 2 * T * dim : 0);
    const AT* sp = cp + T * dim;

    for (int64_t t = 0; t < T; ++t) rms_norm(xp + t * D, norm1, D, eps, hp + t * D, offset);
    at::Tensor qkv;
    if (bias.numel() > 0 && p[k_qkv_proj].dim() == 2 &&
        c10::isFloatingType(p[k_qkv_proj].scalar_type())) {
      // a dense [N, K] biased projection, as nn.Linear runs it
      qkv = at::addmm(bias, h, p[k_qkv_proj].t());
    } else {
      qkv = project(h, p + k_qkv_proj, group_size);
      if (bias.numel() > 0) qkv.add_(bias);
    }
    AT* qkvp = qkv.data_ptr<AT>();
    const int64_t row = qkv.size(1);
    if (p[k_q_norm].numel() > 0)  // QK-norm: each head of q and k, before rotary
      for (int64_t t = 0; t < T; ++t)
        for (int64_t hd = 0; hd < heads + kv_heads; ++hd) {
          AT* r = qkvp + t * row + hd * dim;
          rms_norm_row(r, p[hd < heads ? k_q_norm : k_k_norm].data_ptr<AT>(), dim, eps, offset,
                       r);
        }
    for (int64_t t = 0; t < T; ++t) {  // rotate q; rotate k and write it and v to their slot
      const AT* r = qkvp + t * row;
      const AT* c = cp + t * dim;
      const AT* s = sp + t * dim;
      for (int64_t hd = 0; hd < heads; ++hd)
        rotate(r + hd * dim, c, s, dim, qp + (t * heads + hd) * dim);
      for (int64_t hd = 0; hd < kv_heads; ++hd) {
        CT* kd = kc + (sl[t] * kv_heads + hd) * dim;
        CT* vd = vc + (sl[t] * kv_heads + hd) * dim;
        const AT* v = r + q_size + kv_size + hd * dim;
        if constexpr (std::is_same_v<AT, CT>) {
          rotate(r + q_size + hd * dim, c, s, dim, kd);
          std::memcpy(vd, v, dim * sizeof(AT));
        } else {  // k rounded to the activations' type first, as the layers compute it
          AT* k = k_rounded.data();
          rotate(r + q_size + hd * dim, c, s, dim, k);
          for (int64_t d = 0; d < dim; ++d) {
            kd[d] = from_float<CT>(to_float(k[d]));
            vd[d] = from_float<CT>(to_float(v[d]));
          }
        }
      }
    }
    const at::Tensor o = paged_attention(q, k_caches[l], v_caches[l], block_tables,
                                         query_start, seq_lens, block_size, scale, window);
    add_block(project(o.view({T, q_size}), p + k_o_proj, group_size),
              p[k_post_attention_norm]);

    for (int64_t t = 0; t < T; ++t) rms_norm(xp + t * D, norm2, D, eps, hp + t * D, offset);
    const at::Tensor gate_up = project(h, p + k_gate_up_proj, group_size);
    const int64_t inter = gate_up.size(1) / 2;
    const AT* gp = gate_up.data_ptr<AT>();
    at::Tensor act = at::empty({T, inter}, h.options());
    AT* actp = act.data_ptr<AT>();
    for (int64_t t = 0; t < T; ++t) {  // act(gate) * up
      const AT* g = gp + t * 2 * inter;
      if (fam.activation == 1) {
        for (int64_t i = 0; i < inter; ++i)
          actp[t * inter + i] = from_float<AT>(gelu_tanh(to_float(g[i])) * to_float(g[inter + i]));
        continue;
      }
#pragma omp simd
      for (int64_t i = 0; i < inter; ++i) {
        const float a = to_float(g[i]);
        actp[t * inter + i] = from_float<AT>(a * sigmoid(a) * to_float(g[inter + i]));
      }
    }
    add_block(project(act, p + k_down_proj, group_size),
              p[k_post_feedforward_norm]);
  }
  at::Tensor out = at::empty({T, D}, act);
  for (int64_t t = 0; t < T; ++t)
    rms_norm(xp + t * D, final_norm.data_ptr<AT>(), D, eps, out.data_ptr<AT>() + t * D, offset);
  return out;
}

at::Tensor decode_layers(const at::Tensor& ids, const at::Tensor& positions,
                         const at::Tensor& embedding, const at::Tensor& cos_table,
                         const at::Tensor& sin_table, at::TensorList params,
                         const at::Tensor& final_norm, at::TensorList k_caches,
                         at::TensorList v_caches, const at::Tensor& slots,
                         const at::Tensor& block_tables, const at::Tensor& query_start,
                         const at::Tensor& seq_lens, int64_t block_size, int64_t heads,
                         int64_t kv_heads, int64_t group_size, double eps, double scale,
                         int64_t embedding_kind, int64_t intermediate_size,
                         at::IntArrayRef windows, const at::Tensor& local_cos,
                         const at::Tensor& local_sin, double norm_offset, int64_t activation,
                         double embed_scale) {
  const int64_t layers = static_cast<int64_t>(k_caches.size());
  const int64_t T = ids.numel();
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong && ids.is_contiguous() &&
                  positions.sizes() == ids.sizes() && positions.scalar_type() == at::kLong &&
                  positions.is_contiguous(),
              "ids, positions: [T] int64");
  TORCH_CHECK(layers > 0 && v_caches.size() == k_caches.size(),
              "decode_layers: one K and one V cache per layer");
  TORCH_CHECK(static_cast<int64_t>(params.size()) == layers * kPerLayer, "decode_layers: ",
              params.size(), " params for ", layers, " layers, where the schema "
              "(decode_schema.h) has ", kPerLayer, " tensors a layer");
  const auto dtype = params[k_input_norm].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "activations: float32 or bfloat16");
  const auto cache_dtype = k_caches[0].scalar_type();
  TORCH_CHECK(cache_dtype == dtype || (dtype == at::kFloat && cache_dtype == at::kBFloat16),
              "KV caches: the activation dtype, or bfloat16 under float32 activations");
  TORCH_CHECK(final_norm.scalar_type() == dtype && final_norm.is_contiguous() &&
                  embedding.is_contiguous() &&
                  (embedding_kind >= 0 ? embedding.dim() == 3 && embedding.scalar_type() == at::kByte
                                       : embedding.dim() == 2 && embedding.scalar_type() == dtype &&
                                             final_norm.numel() == embedding.size(1)),
              "embedding [vocab, hidden] in the activation dtype (or a K-quant's tiles), "
              "final norm [hidden]: contiguous");
  const int64_t vocab = embedding_kind >= 0 ? embedding.size(0) * 16 : embedding.size(0);
  TORCH_CHECK(cos_table.dim() == 2 && cos_table.sizes() == sin_table.sizes() &&
                  cos_table.scalar_type() == at::kFloat && sin_table.scalar_type() == at::kFloat &&
                  cos_table.is_contiguous() && sin_table.is_contiguous() &&
                  cos_table.size(1) % 2 == 0,
              "cos, sin tables: contiguous float32 [max_position, head_dim]");
  for (int64_t t = 0; t < T; ++t) {
    const int64_t id = ids.data_ptr<int64_t>()[t], pos = positions.data_ptr<int64_t>()[t];
    TORCH_CHECK(id >= 0 && id < vocab, "token id ", id, " out of range");
    TORCH_CHECK(pos >= 0 && pos < cos_table.size(0), "position ", pos,
                " beyond the rotary tables");
  }
  for (int64_t l = 0; l < layers; ++l)
    TORCH_CHECK(k_caches[l].scalar_type() == cache_dtype &&
                    v_caches[l].scalar_type() == cache_dtype &&
                    k_caches[l].is_contiguous() && v_caches[l].is_contiguous() &&
                    k_caches[l].size(1) == kv_heads && k_caches[l].size(2) == cos_table.size(1),
                "caches: contiguous [slots, kv_heads, head_dim], one dtype: the activations' "
                "or (float32 activations) bfloat16");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == T,
              "slots: [T] int64");
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(slots.data_ptr<int64_t>()[t] >= 0 && slots.data_ptr<int64_t>()[t] < k_caches[0].size(0),
                "slot ", slots.data_ptr<int64_t>()[t], " is outside the cache");
  const int64_t D = final_norm.numel(), head_dim = cos_table.size(1);
  TORCH_CHECK(static_cast<int64_t>(windows.size()) == layers, "windows: one per layer");
  const Dims dims{D, head_dim, heads * head_dim, kv_heads * head_dim, intermediate_size};
  for (int64_t l = 0; l < layers; ++l) {
    TORCH_CHECK(windows[l] >= 0, "windows: >= 0");
    check_layer(l, params.data() + l * kPerLayer, dims, dtype);
  }
  TORCH_CHECK(local_cos.numel() == 0 || (local_cos.sizes() == cos_table.sizes() &&
                                         local_sin.sizes() == cos_table.sizes() &&
                                         local_cos.scalar_type() == at::kFloat &&
                                         local_sin.scalar_type() == at::kFloat &&
                                         local_cos.is_contiguous() && local_sin.is_contiguous()),
              "local rotary tables: empty or like the global ones");
  TORCH_CHECK(activation == 0 || activation == 1, "activation: 0 (SiLU) or 1 (GELU-tanh)");
  TORCH_CHECK(D <= 8192 && cos_table.size(1) <= 8192, "hidden size up to 8192");
  TORCH_CHECK(query_start.dim() == 1 && query_start.scalar_type() == at::kLong &&
                  query_start.is_contiguous() && query_start.numel() == seq_lens.numel() + 1 &&
                  query_start.data_ptr<int64_t>()[0] == 0 &&
                  query_start.data_ptr<int64_t>()[seq_lens.numel()] == T,
              "query_start: [sequences + 1] int64, each sequence's first row, then T");
  const StepArgs args{ids, positions, embedding, cos_table, sin_table, params, final_norm,
                      k_caches, v_caches, slots, block_tables, query_start, seq_lens,
                      block_size, heads, kv_heads, group_size, static_cast<float>(eps),
                      static_cast<float>(scale), embedding_kind};
  const FamilyArgs fam{windows, local_cos, local_sin, static_cast<float>(norm_offset),
                       activation, static_cast<float>(embed_scale)};
  if (dtype == at::kBFloat16) return run_layers<c10::BFloat16, c10::BFloat16>(args, fam);
  return cache_dtype == at::kBFloat16 ? run_layers<float, c10::BFloat16>(args, fam)
                                      : run_layers<float, float>(args, fam);
}

}  // namespace
}  // namespace ember

TORCH_LIBRARY_FRAGMENT(ember_cpu, m) {
  m.def("decode_layers(Tensor ids, Tensor positions, Tensor embedding, Tensor cos_table, "
        "Tensor sin_table, Tensor[] params, Tensor final_norm, Tensor(a!)[] k_caches, "
        "Tensor(b!)[] v_caches, Tensor slots, Tensor block_tables, Tensor query_start, "
        "Tensor seq_lens, int block_size, int heads, int kv_heads, int group_size, "
        "float eps, float scale, int embedding_kind, int intermediate_size, int[] windows, "
        "Tensor local_cos, Tensor local_sin, float norm_offset, int activation, "
        "float embed_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(ember_cpu, CPU, m) { m.impl("decode_layers", ember::decode_layers); }
