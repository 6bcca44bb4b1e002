// decode_layers: a Llama-family model's decode step for a batch of decoding sequences (one new
// token each), from the token ids to the final norm, in one call from Python.
//
// A decode step of a small model is a few hundred small kernels; entered one at a time from
// Python (or one compiled layer at a time), their launch and guard costs add up to a fifth of
// the step. Here the layer loop runs in C++: RMSNorm, rotary embedding, the KV write and SiLU *
// up are short loops over the batch's rows (a few hundred floats each), the projections go to
// the matmul kernels (ember's int4, ATen's int8 or dense), the attention to `decode_attention`;
// the embedding lookup (a dense table or a K-quant's tiles), the rotary tables' rows and the
// final norm come along, so that
// nothing but the head is left to Python.
// The arithmetic is the model's (`models/llama.py`): the residual stream in float32, the norms'
// outputs rounded to the activation dtype before and after the weight, rotary and SiLU * up
// computed in float32 from activation-dtype inputs and rounded once, as the compiled graph
// does. The families' choices (`config.Family`) come as `FamilyArgs`: QKV bias, QK-norm,
// Gemma's norms after attention and MLP and its (1 + w) weights, GELU-tanh, the embedding
// scale, per-layer sliding windows and the sliding layers' own rotary tables.
#include "common.h"

#include <torch/library.h>

#include <cmath>
#include <vector>

namespace ember {
namespace {

// Per layer: input norm weight, 4 tensors per projection (qkv, o), post-attention norm
// weight, 4 per projection (gate_up, down). A projection's 4: int4 in ember's layout (the
// tiles [N / 16, K / 8, 64], scales, zeros, -: see int4_tiled_linear) or in ATen's CPU
// packing (codes, its scales_and_zeros, the dense path's scales and zeros: see int4_linear);
// int8 (int8 codes, per-row scales, -, -); dense ([N, K] weight, -, -, -); GGUF K-quant / Q5
// (see kquant_linear): the first segment's tiles, the segments' kinds (int64 [1..3]), the
// second and third segments' tiles (or empty).
constexpr int64_t kProjection = 4;
constexpr int64_t kPerLayer = 2 + 4 * kProjection;

at::Tensor project(const at::Tensor& x, const at::Tensor* p, int64_t group_size,
                   int64_t dense_min_rows) {
  switch (p[0].scalar_type()) {
    case at::kByte:
      if (p[1].scalar_type() == at::kLong) {
        const int64_t segments = p[1].numel();
        std::vector<at::Tensor> tiles{p[0]};
        for (int64_t i = 1; i < segments; ++i) tiles.push_back(p[1 + i]);
        return kquant_linear(x, tiles, at::IntArrayRef(p[1].data_ptr<int64_t>(), segments),
                             x.size(1), dense_min_rows, false);
      }
      if (p[0].dim() == 3) return int4_tiled_linear(x, p[0], p[1], p[2], group_size, dense_min_rows);
      return int4_linear(x, p[0], p[2], p[3], p[1], group_size, dense_min_rows);
    case at::kChar: return at::_weight_int8pack_mm(x, p[0], p[1]);
    default: return at::mm(x, p[0].t());
  }
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

// Per layer in `extras`: QKV bias, q norm, k norm, norm after attention, norm after the MLP
// (Gemma's); an empty tensor where the family has none.
constexpr int64_t kExtras = 5;

// What a family does differently from Llama (see `config.Family`).
struct FamilyArgs {
  at::TensorList extras;                  // kExtras per layer
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
  const at::Tensor &slots, &block_tables, &context_lens;
  int64_t block_size, heads, kv_heads, group_size, dense_min_rows;
  float eps, scale;
  int64_t embedding_kind;
};

template <typename AT>
at::Tensor run_layers(const StepArgs& args, const FamilyArgs& fam) {
  const auto& [ids, positions, embedding, cos_table, sin_table, params, final_norm, k_caches,
               v_caches, slots, block_tables, context_lens, block_size, heads, kv_heads,
               group_size, dense_min_rows, eps, scale, embedding_kind] = args;
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
    const at::Tensor* e = fam.extras.data() + l * kExtras;
    const AT* norm1 = p[0].data_ptr<AT>();
    const AT* norm2 = p[1 + 2 * kProjection].data_ptr<AT>();
    AT* kc = k_caches[l].data_ptr<AT>();
    AT* vc = v_caches[l].data_ptr<AT>();
    const int64_t window = fam.windows[l];
    const AT* cp = rope.data_ptr<AT>() + (local_rope && window > 0 ? 2 * T * dim : 0);
    const AT* sp = cp + T * dim;

    for (int64_t t = 0; t < T; ++t) rms_norm(xp + t * D, norm1, D, eps, hp + t * D, offset);
    at::Tensor qkv;
    if (e[0].numel() > 0 && (p[1].scalar_type() == at::kFloat ||
                             p[1].scalar_type() == at::kBFloat16)) {
      qkv = at::addmm(e[0], h, p[1].t());  // a dense biased projection, as nn.Linear runs it
    } else {
      qkv = project(h, p + 1, group_size, dense_min_rows);
      if (e[0].numel() > 0) qkv.add_(e[0]);
    }
    AT* qkvp = qkv.data_ptr<AT>();
    const int64_t row = qkv.size(1);
    if (e[1].numel() > 0)  // QK-norm: each head of q and k, before rotary
      for (int64_t t = 0; t < T; ++t)
        for (int64_t hd = 0; hd < heads + kv_heads; ++hd) {
          AT* r = qkvp + t * row + hd * dim;
          rms_norm_row(r, e[hd < heads ? 1 : 2].data_ptr<AT>(), dim, eps, offset, r);
        }
    for (int64_t t = 0; t < T; ++t) {  // rotate q; rotate k and write it and v to their slot
      const AT* r = qkvp + t * row;
      const AT* c = cp + t * dim;
      const AT* s = sp + t * dim;
      for (int64_t hd = 0; hd < heads; ++hd)
        rotate(r + hd * dim, c, s, dim, qp + (t * heads + hd) * dim);
      for (int64_t hd = 0; hd < kv_heads; ++hd) {
        rotate(r + q_size + hd * dim, c, s, dim, kc + (sl[t] * kv_heads + hd) * dim);
        std::memcpy(vc + (sl[t] * kv_heads + hd) * dim, r + q_size + kv_size + hd * dim,
                    dim * sizeof(AT));
      }
    }
    const at::Tensor o = decode_attention(q, k_caches[l], v_caches[l], block_tables,
                                          context_lens, block_size, scale, window);
    add_block(project(o.view({T, q_size}), p + 1 + kProjection, group_size, dense_min_rows),
              e[3]);

    for (int64_t t = 0; t < T; ++t) rms_norm(xp + t * D, norm2, D, eps, hp + t * D, offset);
    const at::Tensor gate_up = project(h, p + 2 + 2 * kProjection, group_size, dense_min_rows);
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
    add_block(project(act, p + 2 + 3 * kProjection, group_size, dense_min_rows), e[4]);
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
                         const at::Tensor& block_tables, const at::Tensor& context_lens,
                         int64_t block_size, int64_t heads, int64_t kv_heads, int64_t group_size,
                         int64_t dense_min_rows, double eps, double scale,
                         int64_t embedding_kind, at::TensorList extras,
                         at::IntArrayRef windows, const at::Tensor& local_cos,
                         const at::Tensor& local_sin, double norm_offset, int64_t activation,
                         double embed_scale) {
  const int64_t layers = static_cast<int64_t>(k_caches.size());
  const int64_t T = ids.numel();
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong && ids.is_contiguous() &&
                  positions.sizes() == ids.sizes() && positions.scalar_type() == at::kLong &&
                  positions.is_contiguous(),
              "ids, positions: [T] int64");
  TORCH_CHECK(layers > 0 && v_caches.size() == k_caches.size() &&
                  static_cast<int64_t>(params.size()) == layers * kPerLayer,
              "params: ", kPerLayer, " tensors per layer; one K and one V cache per layer");
  const auto dtype = params[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "activations: float32 or bfloat16");
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
    TORCH_CHECK(k_caches[l].scalar_type() == dtype && v_caches[l].scalar_type() == dtype &&
                    k_caches[l].is_contiguous() && v_caches[l].is_contiguous() &&
                    k_caches[l].size(1) == kv_heads && k_caches[l].size(2) == cos_table.size(1),
                "caches: contiguous [slots, kv_heads, head_dim] in the activation dtype");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == T,
              "slots: [T] int64");
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(slots.data_ptr<int64_t>()[t] >= 0 && slots.data_ptr<int64_t>()[t] < k_caches[0].size(0),
                "slot ", slots.data_ptr<int64_t>()[t], " is outside the cache");
  const int64_t D = final_norm.numel();
  TORCH_CHECK(static_cast<int64_t>(extras.size()) == layers * kExtras &&
                  static_cast<int64_t>(windows.size()) == layers,
              "extras: ", kExtras, " tensors per layer; windows: one per layer");
  for (int64_t l = 0; l < layers; ++l) {
    TORCH_CHECK(windows[l] >= 0, "windows: >= 0");
    const int64_t sizes[kExtras] = {heads * cos_table.size(1) + 2 * kv_heads * cos_table.size(1),
                                    cos_table.size(1), cos_table.size(1), D, D};
    for (int64_t i = 0; i < kExtras; ++i) {
      const at::Tensor& e = extras[l * kExtras + i];
      TORCH_CHECK(e.numel() == 0 || (e.scalar_type() == dtype && e.is_contiguous() &&
                                     e.numel() == sizes[i]),
                  "extras: empty, or contiguous activation-dtype vectors of their sizes");
    }
  }
  TORCH_CHECK(local_cos.numel() == 0 || (local_cos.sizes() == cos_table.sizes() &&
                                         local_sin.sizes() == cos_table.sizes() &&
                                         local_cos.scalar_type() == at::kFloat &&
                                         local_sin.scalar_type() == at::kFloat &&
                                         local_cos.is_contiguous() && local_sin.is_contiguous()),
              "local rotary tables: empty or like the global ones");
  TORCH_CHECK(activation == 0 || activation == 1, "activation: 0 (SiLU) or 1 (GELU-tanh)");
  TORCH_CHECK(D <= 8192 && cos_table.size(1) <= 8192, "hidden size up to 8192");
  const StepArgs args{ids, positions, embedding, cos_table, sin_table, params, final_norm,
                      k_caches, v_caches, slots, block_tables, context_lens, block_size, heads,
                      kv_heads, group_size, dense_min_rows, static_cast<float>(eps),
                      static_cast<float>(scale), embedding_kind};
  const FamilyArgs fam{extras, windows, local_cos, local_sin, static_cast<float>(norm_offset),
                       activation, static_cast<float>(embed_scale)};
  return dtype == at::kBFloat16 ? run_layers<c10::BFloat16>(args, fam)
                                : run_layers<float>(args, fam);
}

}  // namespace
}  // namespace ember

TORCH_LIBRARY_FRAGMENT(ember_cpu, m) {
  m.def("decode_layers(Tensor ids, Tensor positions, Tensor embedding, Tensor cos_table, "
        "Tensor sin_table, Tensor[] params, Tensor final_norm, Tensor(a!)[] k_caches, "
        "Tensor(b!)[] v_caches, Tensor slots, Tensor block_tables, Tensor context_lens, "
        "int block_size, int heads, int kv_heads, int group_size, int dense_min_rows, "
        "float eps, float scale, int embedding_kind, Tensor[] extras, int[] windows, "
        "Tensor local_cos, Tensor local_sin, float norm_offset, int activation, "
        "float embed_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(ember_cpu, CPU, m) { m.impl("decode_layers", ember::decode_layers); }
