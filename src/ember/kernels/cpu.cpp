// ember's CPU kernels, registered as torch ops (`torch.ops.ember_cpu.*`): built and loaded by
// `ember.kernels` on first use, with the CPU's own instruction set (-march=native).
//
// decode_attention: one new query per sequence against its paged KV cache, read in place
// through the block table (no gather into a padded grid, no mask), the query heads of one KV
// head together (GQA: each key is loaded once for the group), softmax in float32. A
// sliding-window layer's (window > 0) queries read only their last `window` keys.
// write_kv: the step's new keys and values into their cache slots.
// q8_0_linear: y = x @ W.T with W in GGUF's Q8_0 layout as it is (int8 codes, one scale per
// 32 inputs): reads 1.06 bytes per weight instead of bf16's 2, computes in float32.
// int4_linear: y = x @ W.T with W group-wise int4 in ATen's CPU packing (what
// aten._convert_weight_to_int4pack_for_cpu makes), w = (q - 8) * scale + zero. Few rows of x:
// ATen's int4 kernel; from dense_min_rows rows on (compute-bound): W dequantized to x's
// dtype in one vectorized pass, then ATen's GEMM. One op for every row count, so a compiled
// graph does not split on it.
// greedy_sample: each row's argmax and its log-probability (log_softmax at the argmax) in two
// passes over the logits, without the [B, V] log_softmax a general sampler writes.
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include "common.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

namespace ember {
namespace {

// f(j, slot) for keys [j0, j1) behind a block table, a block at a time (one lookup each).
template <typename F>
inline void for_each_slot(const int64_t* table, int64_t j0, int64_t j1, int64_t block_size,
                          F&& f) {
  for (int64_t j = j0; j < j1;) {
    const int64_t blk = j / block_size, base = (table[blk] - blk) * block_size;
    for (const int64_t stop = std::min(j1, (blk + 1) * block_size); j < stop; ++j) f(j, base + j);
  }
}

// Asks for the `bytes` (a multiple of 64) at `row + kAhead` rows on: a decode step reads
// the cache from memory (the weights streamed since evicted it), a key's rows one at a time,
// a head's rows apart: too sparse for the hardware prefetchers to run far enough ahead.
// 16 keys (A/B at 1500 tokens of context, ms/token: 8 keys 6.81, 16 6.64, 32 6.58).
constexpr int64_t kAhead = 16;
template <typename T>
inline void prefetch_ahead(const T* base, const int64_t* table, int64_t j, int64_t j1,
                           int64_t block_size, int64_t slot_stride, int64_t bytes) {
  const int64_t ahead = j + kAhead;
  if (ahead >= j1) return;
  const int64_t slot = table[ahead / block_size] * block_size + ahead % block_size;
  const char* p = reinterpret_cast<const char*>(base + slot * slot_stride);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, 3);
}

constexpr int64_t kMaxGroup = 16;  // query heads per KV head held in registers/stack
// Keys per task: a long context is split into chunks attended in parallel (flash-decoding),
// so that one sequence's few KV heads still keep every thread busy; their partial softmaxes
// are merged after.
constexpr int64_t kChunk = 128;

// The partial result of one chunk: per query head the running max m, the sum l of
// exp(score - m), and acc = sum of exp(score - m) * value (float32, not yet divided by l).
struct Partial {
  float* m;
  float* l;
  float* acc;  // [group, dim]
};

// Scores of keys [j0, j1) for `group` query heads (scaled), into s[g * n + j - j0].
template <int DIM, typename QT, typename KT>
void scores_generic(const QT* q, int64_t qs, const KT* k, int64_t slot_stride,
                    const int64_t* table, int64_t j0, int64_t j1, int64_t block_size,
                    int64_t group, int64_t dim, float scale, float* s) {
  const int64_t n = j1 - j0;
  float qf[kMaxGroup * 256], row[256];
  for (int64_t g = 0; g < group; ++g)
    for (int64_t d = 0; d < dim; ++d) qf[g * dim + d] = to_float(q[g * qs + d]) * scale;
  for_each_slot(table, j0, j1, block_size, [&](int64_t j, int64_t slot) {
    const KT* kr = k + slot * slot_stride;
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) row[d] = to_float(kr[d]);
    for (int64_t g = 0; g < group; ++g) {
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < dim; ++d) dot += qf[g * dim + d] * row[d];
      s[g * n + j - j0] = dot;
    }
  });
}

// acc[g] += p[g, j] * value_j over keys [j0, j1).
template <int DIM, typename KT>
void values_generic(const KT* v, int64_t slot_stride, const int64_t* table, int64_t j0,
                    int64_t j1, int64_t block_size, int64_t group, int64_t dim, const float* p,
                    float* acc) {
  const int64_t n = j1 - j0;
  float row[256];
  for_each_slot(table, j0, j1, block_size, [&](int64_t j, int64_t slot) {
    const KT* vr = v + slot * slot_stride;
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) row[d] = to_float(vr[d]);
    for (int64_t g = 0; g < group; ++g) {
      const float pj = p[g * n + j - j0];
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) acc[g * dim + d] += pj * row[d];
    }
  });
}

#if defined(__AVX512BF16__)
// bfloat16 query and cache: q . k by the bf16 dot-product instruction straight from the
// cache's bytes (products exact, float32 sums), one horizontal sum per key and head.
template <int DIM>
void scores_bf16(const c10::BFloat16* q, int64_t qs, const c10::BFloat16* k, int64_t slot_stride,
                 const int64_t* table, int64_t j0, int64_t j1, int64_t block_size, int64_t group,
                 float scale, float* s) {
  constexpr int P = DIM / 32;  // zmm registers of bf16 pairs per row
  const int64_t n = j1 - j0;
  __m512bh qv[kMaxGroup][P];
  for (int64_t g = 0; g < group; ++g)
    for (int i = 0; i < P; ++i) qv[g][i] = (__m512bh)_mm512_loadu_si512(q + g * qs + 32 * i);
  for_each_slot(table, j0, j1, block_size, [&](int64_t j, int64_t slot) {
    prefetch_ahead(k, table, j, j1, block_size, slot_stride, DIM * 2);
    const c10::BFloat16* kr = k + slot * slot_stride;
    __m512bh kv[P];
    for (int i = 0; i < P; ++i) kv[i] = (__m512bh)_mm512_loadu_si512(kr + 32 * i);
    for (int64_t g = 0; g < group; ++g) {
      __m512 dot = _mm512_dpbf16_ps(_mm512_setzero_ps(), qv[g][0], kv[0]);
      for (int i = 1; i < P; ++i) dot = _mm512_dpbf16_ps(dot, qv[g][i], kv[i]);
      s[g * n + j - j0] = _mm512_reduce_add_ps(dot) * scale;
    }
  });
}

template <int DIM>
void values_bf16(const c10::BFloat16* v, int64_t slot_stride, const int64_t* table, int64_t j0,
                 int64_t j1, int64_t block_size, int64_t group, const float* p, float* acc) {
  constexpr int R = DIM / 16;  // zmm registers of float32 per row
  const int64_t n = j1 - j0;
  for_each_slot(table, j0, j1, block_size, [&](int64_t j, int64_t slot) {
    prefetch_ahead(v, table, j, j1, block_size, slot_stride, DIM * 2);
    const c10::BFloat16* vr = v + slot * slot_stride;
    __m512 row[R];
    for (int i = 0; i < R; ++i)
      row[i] = _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(vr + 16 * i))), 16));
    for (int64_t g = 0; g < group; ++g) {
      const __m512 pj = _mm512_set1_ps(p[g * n + j - j0]);
      float* a = acc + g * DIM;
      for (int i = 0; i < R; ++i)
        _mm512_storeu_ps(a + 16 * i, _mm512_fmadd_ps(pj, row[i], _mm512_loadu_ps(a + 16 * i)));
    }
  });
}
#endif

// The largest of x[0..n), n >= 1. (GCC does not vectorize a float max reduction without
// -ffinite-math-only, and a scalar loop of dependent maxes costs 4 cycles a key.)
inline float max_of(const float* x, int64_t n) {
  float m = x[0];
  int64_t j = 0;
#if defined(__AVX512F__)
  if (n >= 16) {
    __m512 v = _mm512_loadu_ps(x);
    for (j = 16; j + 16 <= n; j += 16) v = _mm512_max_ps(v, _mm512_loadu_ps(x + j));
    m = _mm512_reduce_max_ps(v);
  }
#endif
  for (; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// One (sequence, KV head, chunk of keys [j0, j1)): its `group` query heads' partial softmax.
// DIM > 0 fixes the head size at compile time (fully unrolled rows); 0 reads it at run time.
template <int DIM, typename QT, typename KT>
void attend_chunk(const QT* q, int64_t qs, const KT* k, const KT* v, int64_t slot_stride,
                  const int64_t* table, int64_t j0, int64_t j1, int64_t block_size,
                  int64_t group, int64_t run_dim, float scale, Partial out,
                  std::vector<float>& scores) {
  const int64_t dim = DIM > 0 ? DIM : run_dim, n = j1 - j0;
  scores.resize(group * n);
  float* s = scores.data();
  constexpr bool kBf16 = std::is_same_v<QT, c10::BFloat16> && std::is_same_v<KT, c10::BFloat16>
                         && DIM > 0 && DIM % 32 == 0;
#if defined(__AVX512BF16__)
  if constexpr (kBf16)
    scores_bf16<DIM>(q, qs, k, slot_stride, table, j0, j1, block_size, group, scale, s);
  else
#endif
    scores_generic<DIM>(q, qs, k, slot_stride, table, j0, j1, block_size, group, dim, scale, s);
  for (int64_t g = 0; g < group; ++g) {
    float* sg = s + g * n;
    const float m = max_of(sg, n);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      sg[j] = exp_nonpositive(sg[j] - m);
      sum += sg[j];
    }
    out.m[g] = m;
    out.l[g] = sum;
  }
  std::fill(out.acc, out.acc + group * dim, 0.f);
#if defined(__AVX512BF16__)
  if constexpr (kBf16)
    values_bf16<DIM>(v, slot_stride, table, j0, j1, block_size, group, s, out.acc);
  else
#endif
    values_generic<DIM>(v, slot_stride, table, j0, j1, block_size, group, dim, s, out.acc);
}

template <typename QT, typename KT>
void decode_attention_kernel(const at::Tensor& q, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& block_tables,
                             const at::Tensor& context_lens, int64_t block_size, float scale,
                             int64_t window, at::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_cache.size(1), group = heads / kv_heads;
  const int64_t width = block_tables.size(1);
  const QT* qp = q.data_ptr<QT>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1);
  const KT* kp = k_cache.data_ptr<KT>();
  const KT* vp = v_cache.data_ptr<KT>();
  const int64_t cs0 = k_cache.stride(0), cs1 = k_cache.stride(1);
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  QT* op = out.data_ptr<QT>();

  // Tasks: (sequence, KV head, chunk), numbered sequence by sequence. A sliding-window
  // layer (window > 0) attends to keys [lens - window, lens) only: its chunks start there.
  std::vector<int64_t> first(batch + 1, 0);  // first chunk of each sequence
  std::vector<int64_t> start(batch, 0);      // its first key
  int64_t total = 0;
  for (int64_t b = 0; b < batch; ++b) {
    if (window > 0) start[b] = std::max<int64_t>(0, lens[b] - window);
    const int64_t n = lens[b] - start[b];
    first[b + 1] = first[b] + std::max<int64_t>(1, (n + kChunk - 1) / kChunk);
    total += n;
  }
  const int64_t chunks = first[batch], tasks = chunks * kv_heads;
  const int64_t stride = group * (dim + 2);  // floats of one task's Partial
  std::vector<float> partials(tasks * stride);
  auto partial = [&](int64_t task) {
    float* base = partials.data() + task * stride;
    return Partial{base, base + group, base + 2 * group};
  };
  // Threads pay off only for enough keys.
  const int64_t grain = total * kv_heads * group < 4096 ? tasks : 1;
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    int64_t b = 0;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t chunk = task / kv_heads, h = task % kv_heads;
      while (first[b + 1] <= chunk) ++b;
      const int64_t j0 = start[b] + (chunk - first[b]) * kChunk;
      const int64_t j1 = std::min(lens[b], j0 + kChunk);
      auto run = [&](auto dim_tag) {
        constexpr int D = decltype(dim_tag)::value;
        attend_chunk<D>(qp + b * qs0 + h * group * qs1, qs1, kp + h * cs1, vp + h * cs1, cs0,
                        tables + b * width, j0, j1, block_size, group, dim, scale,
                        partial(task), scores);
      };
      if (dim == 64) run(std::integral_constant<int, 64>{});
      else if (dim == 128) run(std::integral_constant<int, 128>{});
      else if (dim == 256) run(std::integral_constant<int, 256>{});
      else run(std::integral_constant<int, 0>{});
    }
  });
  // Merge each (sequence, KV head)'s chunks: rescale to the common max, divide by the sum.
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < kv_heads; ++h)
      for (int64_t g = 0; g < group; ++g) {
        float m = -INFINITY;
        for (int64_t c = first[b]; c < first[b + 1]; ++c)
          m = std::max(m, partial(c * kv_heads + h).m[g]);
        float l = 0.f, o[256] = {};
        for (int64_t c = first[b]; c < first[b + 1]; ++c) {
          const Partial pt = partial(c * kv_heads + h);
          const float w = exp_nonpositive(pt.m[g] - m);
          l += pt.l[g] * w;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) o[d] += w * pt.acc[g * dim + d];
        }
        QT* dst = op + (b * heads + h * group + g) * dim;
        for (int64_t d = 0; d < dim; ++d) dst[d] = from_float<QT>(o[d] / l);
      }
}

template <typename QT>
void dispatch_cache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& tables, const at::Tensor& lens, int64_t block_size,
                    float scale, int64_t window, at::Tensor& out) {
  if (k_cache.scalar_type() == at::kBFloat16)
    decode_attention_kernel<QT, c10::BFloat16>(q, k_cache, v_cache, tables, lens, block_size,
                                               scale, window, out);
  else
    decode_attention_kernel<QT, float>(q, k_cache, v_cache, tables, lens, block_size, scale,
                                       window, out);
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables,
                            const at::Tensor& context_lens, int64_t block_size, double scale,
                            int64_t window) {
  TORCH_CHECK(window >= 0, "window: >= 0 (0: no sliding window)");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q: [B, H, D] with contiguous rows");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes() &&
                  k_cache.scalar_type() == v_cache.scalar_type(),
              "caches: two contiguous [slots, Hkv, D] tensors of one dtype");
  TORCH_CHECK(k_cache.size(2) == q.size(2) && q.size(2) <= 256 &&
                  q.size(1) % k_cache.size(1) == 0 && q.size(1) / k_cache.size(1) <= kMaxGroup,
              "head size up to 256; up to 16 query heads per KV head");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong &&
                  block_tables.is_contiguous() && context_lens.is_contiguous() &&
                  block_tables.size(0) == q.size(0) && context_lens.numel() == q.size(0),
              "block_tables [B, W] and context_lens [B]: contiguous int64");
  // The table walk trusts every entry it reads: refuse a table that points outside the cache.
  TORCH_CHECK(block_size > 0, "block_size must be > 0");
  {
    const int64_t width = block_tables.size(1), num_blocks = k_cache.size(0) / block_size;
    const int64_t* tables = block_tables.data_ptr<int64_t>();
    const int64_t* lens = context_lens.data_ptr<int64_t>();
    for (int64_t b = 0; b < q.size(0); ++b) {
      TORCH_CHECK(lens[b] >= 0 && lens[b] <= width * block_size, "context length ", lens[b],
                  " of sequence ", b, " is beyond its block table");
      for (int64_t i = 0; i < (lens[b] + block_size - 1) / block_size; ++i)
        TORCH_CHECK(tables[b * width + i] >= 0 && tables[b * width + i] < num_blocks, "block id ",
                    tables[b * width + i], " of sequence ", b, " is outside the cache");
    }
  }
  const auto qt = q.scalar_type(), ct = k_cache.scalar_type();
  TORCH_CHECK((qt == at::kFloat || qt == at::kBFloat16) && (ct == at::kFloat || ct == at::kBFloat16),
              "float32 or bfloat16 only");
  auto out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  const float s = static_cast<float>(scale);
  if (qt == at::kBFloat16)
    dispatch_cache<c10::BFloat16>(q, k_cache, v_cache, block_tables, context_lens, block_size, s,
                                  window, out);
  else
    dispatch_cache<float>(q, k_cache, v_cache, block_tables, context_lens, block_size, s, window,
                          out);
  return out;
}

namespace {

template <typename ST, typename CT>
void write_rows(const at::Tensor& src, at::Tensor& cache, const int64_t* slots) {
  const int64_t t = src.size(0), heads = src.size(1), dim = src.size(2);
  const ST* sp = src.data_ptr<ST>();
  CT* cp = cache.data_ptr<CT>();
  for (int64_t i = 0; i < t; ++i)
    for (int64_t h = 0; h < heads; ++h) {
      const ST* s = sp + i * src.stride(0) + h * src.stride(1);
      CT* c = cp + (slots[i] * heads + h) * dim;
      for (int64_t d = 0; d < dim; ++d) c[d] = from_float<CT>(to_float(s[d]));
    }
}

template <typename CT>
void write_one(const at::Tensor& src, at::Tensor& cache, const int64_t* slots) {
  if (src.scalar_type() == at::kBFloat16) write_rows<c10::BFloat16, CT>(src, cache, slots);
  else write_rows<float, CT>(src, cache, slots);
}

}  // namespace

void write_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slots) {
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.stride(2) == 1 && v.stride(2) == 1 &&
                  k.sizes() == v.sizes() && k.scalar_type() == v.scalar_type(),
              "k, v: [T, Hkv, D] with contiguous rows");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.size(1) == k.size(1) && k_cache.size(2) == k.size(2),
              "caches: contiguous [slots, Hkv, D]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == k.size(0),
              "slots: [T] int64");
  const auto st = k.scalar_type(), ct = k_cache.scalar_type();
  TORCH_CHECK((st == at::kFloat || st == at::kBFloat16) && (ct == at::kFloat || ct == at::kBFloat16),
              "float32 or bfloat16 only");
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < slots.numel(); ++i)
    TORCH_CHECK(sl[i] >= 0 && sl[i] < k_cache.size(0), "slot ", sl[i], " is outside the cache");
  if (ct == at::kBFloat16) {
    write_one<c10::BFloat16>(k, k_cache, sl);
    write_one<c10::BFloat16>(v, v_cache, sl);
  } else {
    write_one<float>(k, k_cache, sl);
    write_one<float>(v, v_cache, sl);
  }
}

namespace {

// Software prefetch in the GEMVs that stream weights (the int4 tiles, the Q8_0 head): the
// hardware prefetchers stop at every 4 KiB page and ramp up again, which costs little while
// the weights sit in the (shared) L3 but much when the VM's neighbours have evicted them and
// every step streams from DRAM. Reading ~2 KiB ahead: in microbenchmarks over 400-500 MB of
// weights (DRAM) the int4 GEMV went 8.5 -> 12.4 GB/s and the Q8_0 head 16.2 -> 26.3 GB/s;
// L3-resident, +5-15% and no change.
constexpr int64_t kPrefetchBytes = 2048;  // int4 tiles: this far ahead in the codes
constexpr int64_t kPrefetchRows = 16;     // Q8_0: this many weight rows ahead (~9 KiB)

// ---- Q8_0 linear ---------------------------------------------------------------------------
constexpr int64_t kQ8Group = 32;

// Rows [n0, n1) of y for MC (1..4) rows of x (float32 [MC, K] at x, row stride K).
template <int MC>
void q8_0_rows(const float* x, int64_t K, const int8_t* q, const float* scales, int64_t n0,
               int64_t n1, float* y, int64_t ldy) {
  const int64_t groups = K / kQ8Group;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* qr = q + n * K;
    const float* sr = scales + n * groups;
#if defined(__AVX512F__)
    _mm_prefetch((const char*)(sr + kPrefetchRows * groups), _MM_HINT_T0);
    _mm_prefetch((const char*)(sr + kPrefetchRows * groups) + 64, _MM_HINT_T0);
    __m512 acc[MC];
    for (int m = 0; m < MC; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const __m512 s = _mm512_set1_ps(sr[g]);
      const int8_t* qg = qr + g * kQ8Group;
      if (g % 2 == 0) _mm_prefetch((const char*)(qg + kPrefetchRows * K), _MM_HINT_T0);
      const __m512 w0 = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)qg))), s);
      const __m512 w1 = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(qg + 16)))), s);
      for (int m = 0; m < MC; ++m) {
        const float* xg = x + m * K + g * kQ8Group;
        acc[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xg), acc[m]);
        acc[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xg + 16), acc[m]);
      }
    }
    for (int m = 0; m < MC; ++m) y[m * ldy + n] = _mm512_reduce_add_ps(acc[m]);
#else
    for (int m = 0; m < MC; ++m) {
      float total = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < kQ8Group; ++i)
          dot += static_cast<float>(qr[g * kQ8Group + i]) * x[m * K + g * kQ8Group + i];
        total += dot * sr[g];
      }
      y[m * ldy + n] = total;
    }
#endif
  }
}

// Rows [n0, n1) of W, dequantized to float32 [n1 - n0, K] at w.
void q8_0_dequantize(const int8_t* q, const float* scales, int64_t K, int64_t n0, int64_t n1,
                     float* w) {
  const int64_t groups = K / kQ8Group;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t g = 0; g < groups; ++g) {
      const float s = scales[n * groups + g];
      const int8_t* qg = q + n * K + g * kQ8Group;
      float* wg = w + (n - n0) * K + g * kQ8Group;
#pragma omp simd
      for (int64_t i = 0; i < kQ8Group; ++i) wg[i] = static_cast<float>(qg[i]) * s;
    }
}

// y[m, n] for MC rows of x against `rows` dense float32 weight rows w [rows, K] (K % 16 == 0).
// Two weight rows at a time: 2 * MC independent accumulators keep the FMA units busy.
template <int MC>
void dense_rows(const float* x, int64_t K, const float* w, int64_t rows, float* y, int64_t ldy) {
  int64_t r = 0;
#if defined(__AVX512F__)
  for (; r + 2 <= rows; r += 2) {
    const float* w0 = w + r * K;
    const float* w1 = w0 + K;
    __m512 a0[MC], a1[MC];
    for (int m = 0; m < MC; ++m) a0[m] = a1[m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __m512 v0 = _mm512_loadu_ps(w0 + k), v1 = _mm512_loadu_ps(w1 + k);
      for (int m = 0; m < MC; ++m) {
        const __m512 xm = _mm512_loadu_ps(x + m * K + k);
        a0[m] = _mm512_fmadd_ps(v0, xm, a0[m]);
        a1[m] = _mm512_fmadd_ps(v1, xm, a1[m]);
      }
    }
    for (int m = 0; m < MC; ++m) {
      y[m * ldy + r] = _mm512_reduce_add_ps(a0[m]);
      y[m * ldy + r + 1] = _mm512_reduce_add_ps(a1[m]);
    }
  }
#endif
  for (; r < rows; ++r)
    for (int m = 0; m < MC; ++m) {
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t k = 0; k < K; ++k) dot += w[r * K + k] * x[m * K + k];
      y[m * ldy + r] = dot;
    }
}

constexpr int64_t kQ8Tile = 16;  // weight rows per task: dequantized, they stay in L1/L2

at::Tensor q8_0_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && x.size(1) == q.size(1), "x [M, K], q [N, K]");
  TORCH_CHECK(q.scalar_type() == at::kChar && q.is_contiguous() && q.size(1) % kQ8Group == 0,
              "q: contiguous int8 [N, K], K a multiple of 32");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
                  scales.size(0) == q.size(0) && scales.size(1) == q.size(1) / kQ8Group,
              "scales: contiguous float32 [N, K / 32]");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = q.size(1), N = q.size(0);
  auto y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const float* xp = xf.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Threads split the weight rows: each row is read from memory once. Up to 4 rows of x: the
  // codes are converted in registers as they stream by. More: a tile of rows is dequantized
  // once, then every row of x runs over it.
  at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
    if (M <= 4) {
      switch (M) {
        case 1: q8_0_rows<1>(xp, K, qp, sp, n0, n1, yp, N); break;
        case 2: q8_0_rows<2>(xp, K, qp, sp, n0, n1, yp, N); break;
        case 3: q8_0_rows<3>(xp, K, qp, sp, n0, n1, yp, N); break;
        default: q8_0_rows<4>(xp, K, qp, sp, n0, n1, yp, N); break;
      }
      return;
    }
    std::vector<float> tile(kQ8Tile * K);
    for (int64_t t0 = n0; t0 < n1; t0 += kQ8Tile) {
      const int64_t rows = std::min(kQ8Tile, n1 - t0);
      q8_0_dequantize(qp, sp, K, t0, t0 + rows, tile.data());
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) dense_rows<4>(xp + m * K, K, tile.data(), rows, yp + m * N + t0, N);
      for (; m < M; ++m) dense_rows<1>(xp + m * K, K, tile.data(), rows, yp + m * N + t0, N);
    }
  });
  return y;
}

// ---- int4 linear ----------------------------------------------------------------------------
// ATen's CPU packing: output rows in blocks of BLOCK, 64 where ATen dispatches to AVX512, 32 to
// AVX2 (a run-time choice, `ember.quantization.int4.cpu_block_n`); per block, K-major,
// BLOCK / 2 bytes per input column, byte j holding row j (low nibble) and row j + BLOCK / 2
// (high nibble). The scales and zeros come in the same order: [K / G, N / BLOCK, 2, BLOCK / 2].
template <int64_t BLOCK, typename ST>
inline void load_block_params(const ST* p, float* out) {
  for (int64_t i = 0; i < BLOCK; ++i) out[i] = to_float(p[i]);
}

// W^T [K, N] in OT from the packed codes: BLOCK contiguous outputs per (block, input column).
template <int64_t BLOCK, typename ST, typename OT>
void int4_dequantize(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
                     int64_t K, int64_t N, int64_t G, at::Tensor& w) {
  constexpr int64_t HALF = BLOCK / 2;
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const ST* scp = scales.data_ptr<ST>();
  const ST* zp = zeros.data_ptr<ST>();
  OT* wp = w.data_ptr<OT>();
  at::parallel_for(0, N / BLOCK, 1, [&](int64_t b0, int64_t b1) {
    float s[BLOCK], c[BLOCK], row[BLOCK];
    for (int64_t nb = b0; nb < b1; ++nb)
      for (int64_t g = 0; g < K / G; ++g) {
        load_block_params<BLOCK>(scp + (g * N + nb * BLOCK), s);
        load_block_params<BLOCK>(zp + (g * N + nb * BLOCK), c);
        for (int64_t j = 0; j < BLOCK; ++j) c[j] -= 8.f * s[j];
#if defined(__AVX512F__)
        __m512 sv[4], cv[4];
        if constexpr (BLOCK == 64)
          for (int i = 0; i < 4; ++i) sv[i] = _mm512_loadu_ps(s + 16 * i), cv[i] = _mm512_loadu_ps(c + 16 * i);
        const __m256i low4 = _mm256_set1_epi8(0x0F);
#endif
        for (int64_t k = g * G; k < (g + 1) * G; ++k) {
          const uint8_t* b = pp + (nb * K + k) * HALF;
          OT* dst = wp + k * N + nb * BLOCK;
#if defined(__AVX512F__)
          if constexpr (BLOCK == 64) {
            const __m256i bytes = _mm256_loadu_si256((const __m256i*)b);
            const __m256i lo = _mm256_and_si256(bytes, low4);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
            const __m128i parts[4] = {_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1),
                                      _mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1)};
            for (int i = 0; i < 4; ++i) {
              const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(parts[i])),
                                               sv[i], cv[i]);
              if constexpr (std::is_same_v<OT, float>) {
                _mm512_storeu_ps(dst + 16 * i, v);
              } else {  // round to nearest even, as c10::BFloat16 does (no NaNs here)
                __m512i u = _mm512_castps_si512(v);
                u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                     _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
                _mm256_storeu_si256((__m256i*)(dst + 16 * i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
              }
            }
            continue;
          }
#endif
#pragma omp simd
          for (int j = 0; j < HALF; ++j) {
            row[j] = static_cast<float>(b[j] & 15) * s[j] + c[j];
            row[j + HALF] = static_cast<float>(b[j] >> 4) * s[j + HALF] + c[j + HALF];
          }
          for (int j = 0; j < BLOCK; ++j) dst[j] = from_float<OT>(row[j]);
        }
      }
  });
}

template <typename ST, typename OT>
void int4_dequantize(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
                     int64_t K, int64_t N, int64_t G, int64_t block, at::Tensor& w) {
  if (block == 64) int4_dequantize<64, ST, OT>(packed, scales, zeros, K, N, G, w);
  else int4_dequantize<32, ST, OT>(packed, scales, zeros, K, N, G, w);
}

#if defined(__AVX512BF16__)
#define EMBER_INT4_TILES 1

// The GEMV's own layout of the codes (`tile_codes`): tiles of 16 output rows; per tile and
// 8 input columns k0..k0+7, 64 bytes: in 128-bit lane i, byte 2d + e (d < 4, e < 2) holds row
// 4i + d at k0 + e (low nibble) and k0 + 4 + e (high nibble), byte 8 + 2d + e the same row at
// k0 + 2 + e and k0 + 6 + e. Then two masks and four byte-interleaves with 0x43 (the
// bfloat16 0x43qq is 128 + q, exactly) give four registers of (k, k + 1) bf16 pairs for the
// 16 rows, for x's pairs at k0, k0 + 2, k0 + 4, k0 + 6: 11 vector instructions per 128
// weights, where ATen's packing needs a byte permute and widening moves (18).
template <int MC>
void int4_gemv_tiles(const uint16_t* x, int64_t K, const uint8_t* codes, const uint16_t* scales,
                     const uint16_t* zeros, const float* xsum, int64_t N, int64_t G, int64_t t0,
                     int64_t t1, uint16_t* y) {
  const __m512i low4 = _mm512_set1_epi8(0x0F), c43 = _mm512_set1_epi8(0x43);
  const int64_t groups = K / G;
  auto widen = [](const uint16_t* p) {  // 16 bfloat16 -> float32
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
  };
  auto pair = [](const uint16_t* p) {
    int32_t v;
    std::memcpy(&v, p, sizeof v);
    return (__m512bh)_mm512_set1_epi32(v);
  };
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* pt = codes + t * K * 8;
    __m512 acc[MC];
    for (int m = 0; m < MC; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m512 part[MC][4];
      for (int m = 0; m < MC; ++m)
        for (int i = 0; i < 4; ++i) part[m][i] = _mm512_setzero_ps();
      for (int64_t k = g * G; k < (g + 1) * G; k += 8) {
        _mm_prefetch((const char*)(pt + k * 8 + kPrefetchBytes), _MM_HINT_T0);
        const __m512i raw = _mm512_loadu_si512(pt + k * 8);
        const __m512i lo = _mm512_and_si512(raw, low4);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
        const __m512bh w0 = (__m512bh)_mm512_unpacklo_epi8(lo, c43);
        const __m512bh w1 = (__m512bh)_mm512_unpackhi_epi8(lo, c43);
        const __m512bh w2 = (__m512bh)_mm512_unpacklo_epi8(hi, c43);
        const __m512bh w3 = (__m512bh)_mm512_unpackhi_epi8(hi, c43);
        for (int m = 0; m < MC; ++m) {
          const uint16_t* xm = x + m * K + k;
          part[m][0] = _mm512_dpbf16_ps(part[m][0], w0, pair(xm));
          part[m][1] = _mm512_dpbf16_ps(part[m][1], w1, pair(xm + 2));
          part[m][2] = _mm512_dpbf16_ps(part[m][2], w2, pair(xm + 4));
          part[m][3] = _mm512_dpbf16_ps(part[m][3], w3, pair(xm + 6));
        }
      }
      if (t + 1 < N / 16) {  // the next tile's scales and zeros (a stream of their own)
        _mm_prefetch((const char*)(scales + g * N + 16 * (t + 1)), _MM_HINT_T0);
        _mm_prefetch((const char*)(zeros + g * N + 16 * (t + 1)), _MM_HINT_T0);
      }
      const __m512 sc = widen(scales + g * N + 16 * t);
      const __m512 c = _mm512_fnmadd_ps(_mm512_set1_ps(136.f), sc, widen(zeros + g * N + 16 * t));
      for (int m = 0; m < MC; ++m) {
        const __m512 sum = _mm512_add_ps(_mm512_add_ps(part[m][0], part[m][1]),
                                         _mm512_add_ps(part[m][2], part[m][3]));
        acc[m] = _mm512_fmadd_ps(c, _mm512_set1_ps(xsum[m * groups + g]),
                                 _mm512_fmadd_ps(sum, sc, acc[m]));
      }
    }
    for (int m = 0; m < MC; ++m)
      _mm256_storeu_si256((__m256i*)(y + m * N + 16 * t), (__m256i)_mm512_cvtneps_pbh(acc[m]));
  }
}

// W^T [K, N] in bfloat16 from the tiles: each pair register (16 rows at k, k + 1) is split by
// one word permute into the 16 rows' values at k and at k + 1, which are W^T's rows k and
// k + 1 for this tile's 16 columns: (128 + q) * scale + (zero - 136 scale) in float32 with the
// group's 16 scales as they are, rounded once.
void int4_dequantize_tiles(const uint8_t* codes, const uint16_t* scales, const uint16_t* zeros,
                           int64_t K, int64_t N, int64_t G, uint16_t* wt) {
  alignas(64) static const uint16_t kSplit[32] = {0,  2,  4,  6,  8,  10, 12, 14, 16, 18, 20,
                                                  22, 24, 26, 28, 30, 1,  3,  5,  7,  9,  11,
                                                  13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
  const __m512i split = _mm512_load_si512(kSplit);
  const __m512i low4 = _mm512_set1_epi8(0x0F), c43 = _mm512_set1_epi8(0x43);
  auto widen = [](__m256i v) {  // 16 bfloat16 -> float32
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
  };
  // Four tiles side by side (64 columns): each row of W^T is written in whole cache lines.
  constexpr int64_t kSide = 4;
  const int64_t tiles = N / 16;
  at::parallel_for(0, (tiles + kSide - 1) / kSide, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t first = q * kSide, count = std::min(kSide, tiles - first);
      for (int64_t g = 0; g < K / G; ++g) {
        __m512 sc[kSide], c[kSide];
        for (int64_t j = 0; j < count; ++j) {
          const int64_t col = g * N + 16 * (first + j);
          sc[j] = widen(_mm256_loadu_si256((const __m256i*)(scales + col)));
          c[j] = _mm512_fnmadd_ps(_mm512_set1_ps(136.f), sc[j],
                                  widen(_mm256_loadu_si256((const __m256i*)(zeros + col))));
        }
        for (int64_t k = g * G; k < (g + 1) * G; k += 8)
          for (int64_t j = 0; j < count; ++j) {
            const int64_t t = first + j;
            const __m512i raw = _mm512_loadu_si512(codes + t * K * 8 + k * 8);
            const __m512i lo = _mm512_and_si512(raw, low4);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
            const __m512i pairs[4] = {_mm512_unpacklo_epi8(lo, c43), _mm512_unpackhi_epi8(lo, c43),
                                      _mm512_unpacklo_epi8(hi, c43), _mm512_unpackhi_epi8(hi, c43)};
            for (int i = 0; i < 4; ++i) {  // columns k + 2i, k + 2i + 1
              const __m512i both = _mm512_permutexvar_epi16(split, pairs[i]);
              const __m512 a = _mm512_fmadd_ps(widen(_mm512_castsi512_si256(both)), sc[j], c[j]);
              const __m512 b = _mm512_fmadd_ps(widen(_mm512_extracti64x4_epi64(both, 1)), sc[j], c[j]);
              const __m512i out = (__m512i)_mm512_cvtne2ps_pbh(b, a);  // [a | b]
              _mm256_storeu_si256((__m256i*)(wt + (k + 2 * i) * N + 16 * t),
                                  _mm512_castsi512_si256(out));
              _mm256_storeu_si256((__m256i*)(wt + (k + 2 * i + 1) * N + 16 * t),
                                  _mm512_extracti64x4_epi64(out, 1));
            }
          }
      }
    }
  });
}

}  // namespace

bool int4_tiles_supported() { return true; }

at::Tensor int4_tiled_linear(const at::Tensor& x_in, const at::Tensor& codes,
                             const at::Tensor& scales, const at::Tensor& zeros, int64_t G,
                             int64_t dense_min_rows) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kBFloat16, "x: bfloat16 [M, K]");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = codes.size(0) * 16;
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == at::kByte && codes.is_contiguous() &&
                  codes.size(1) * 8 == K && codes.size(2) == 64 && K % G == 0 && G % 8 == 0,
              "codes: the GEMV's tiles [N / 16, K / 8, 64] of an [N, K] weight");
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && zeros.scalar_type() == at::kBFloat16 &&
                  scales.is_contiguous() && zeros.is_contiguous() &&
                  scales.numel() == N * (K / G) && zeros.numel() == N * (K / G),
              "scales, zeros: contiguous bfloat16, [K / G, N] in row order");
  const at::Tensor x = x_in.contiguous();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<c10::BFloat16>());
  const uint16_t* zp = reinterpret_cast<const uint16_t*>(zeros.data_ptr<c10::BFloat16>());
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  if (M >= dense_min_rows) {  // compute-bound: dequantize once, then a bf16 GEMM
    auto wt = at::empty({K, N}, x.options());
    int4_dequantize_tiles(cp, sp, zp, K, N, G,
                          reinterpret_cast<uint16_t*>(wt.data_ptr<c10::BFloat16>()));
    return at::mm(x, wt);
  }
  const int64_t groups = K / G;
  const c10::BFloat16* xb = x.data_ptr<c10::BFloat16>();
  std::vector<float> xsum(M * groups);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = g * G; k < (g + 1) * G; ++k) sum += to_float(xb[m * K + k]);
      xsum[m * groups + g] = sum;
    }
  auto y = at::empty({M, N}, x.options());
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xb);
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<c10::BFloat16>());
  // Per tile, rows of x four at a time: the tile (16 rows of W) stays in L1 between them.
  at::parallel_for(0, N / 16, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t m = 0; m < M; m += 4) {
        const uint16_t* xm = xp + m * K;
        const float* sm = xsum.data() + m * groups;
        uint16_t* ym = yp + m * N;
        switch (std::min<int64_t>(4, M - m)) {
          case 1: int4_gemv_tiles<1>(xm, K, cp, sp, zp, sm, N, G, t, t + 1, ym); break;
          case 2: int4_gemv_tiles<2>(xm, K, cp, sp, zp, sm, N, G, t, t + 1, ym); break;
          case 3: int4_gemv_tiles<3>(xm, K, cp, sp, zp, sm, N, G, t, t + 1, ym); break;
          default: int4_gemv_tiles<4>(xm, K, cp, sp, zp, sm, N, G, t, t + 1, ym); break;
        }
      }
  });
  return y;
}
#else
}  // namespace

bool int4_tiles_supported() { return false; }

at::Tensor int4_tiled_linear(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, int64_t, int64_t) {
  TORCH_CHECK(false, "int4_tiled_linear needs AVX512-BF16 (ember.kernels.int4_tiles)");
}
#endif

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                       const at::Tensor& zeros, const at::Tensor& scales_and_zeros,
                       int64_t group_size, int64_t dense_min_rows) {
  TORCH_CHECK(x.dim() == 2, "x: [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = scales.numel() / (K / group_size);
  if (M < dense_min_rows) {  // ATen's kernel in its scales' dtype (on CPU bf16: its float32
    // path is not vectorized), float32 activations rounded for it
    const auto dtype = scales_and_zeros.scalar_type();
    if (x.scalar_type() == dtype)
      return at::_weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros);
    return at::_weight_int4pack_mm_for_cpu(x.to(dtype), packed, group_size, scales_and_zeros)
        .to(x.scalar_type());
  }
  TORCH_CHECK(scales.dim() == 5 && scales.is_contiguous() && zeros.is_contiguous() &&
                  scales.sizes() == zeros.sizes() && scales.scalar_type() == zeros.scalar_type() &&
                  (scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kBFloat16),
              "scales, zeros: contiguous [K / G, 1, N / block, 2, block / 2], float32 or bfloat16");
  const int64_t block = 2 * scales.size(4);
  TORCH_CHECK(block == 64 || block == 32, "ATen's CPU int4 packing has blocks of 64 or 32 rows");
  TORCH_CHECK(K % group_size == 0 && N % block == 0 && packed.numel() == N * K / 2 &&
                  packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "packed: ATen's CPU int4 packing of an [N, K] weight, N a multiple of the block");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x: float32 or bfloat16");
  const bool bf16_params = scales.scalar_type() == at::kBFloat16;
  auto w = at::empty({K, N}, x.options());
  if (x.scalar_type() == at::kBFloat16) {
    if (bf16_params) int4_dequantize<c10::BFloat16, c10::BFloat16>(packed, scales, zeros, K, N, group_size, block, w);
    else int4_dequantize<float, c10::BFloat16>(packed, scales, zeros, K, N, group_size, block, w);
  } else {
    if (bf16_params) int4_dequantize<c10::BFloat16, float>(packed, scales, zeros, K, N, group_size, block, w);
    else int4_dequantize<float, float>(packed, scales, zeros, K, N, group_size, block, w);
  }
  return at::mm(x, w);
}

namespace {
// sum(e^(x[i] - m)) for m >= every x[i]: exp_nonpositive's polynomial, 64 lanes at a time.
float sum_exp_shifted(const float* x, int64_t n, float m) {
  int64_t i = 0;
  float sum = 0.f;
#if defined(__AVX512F__)
  const __m512 vm = _mm512_set1_ps(m), lo = _mm512_set1_ps(-87.f),
               log2e = _mm512_set1_ps(1.4426950409f);
  auto exp = [&](__m512 v) {
    // max(lo, d), not max(d, lo): a NaN d (a NaN logit, or -inf - -inf) must reach the sum.
    const __m512 t = _mm512_mul_ps(_mm512_max_ps(lo, _mm512_sub_ps(v, vm)), log2e);
    const __m512 k = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, k);
    __m512 p = _mm512_set1_ps(1.8775767e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.9893397e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5826318e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4015361e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9315308e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.9999994e-1f));
    return _mm512_scalef_ps(p, k);
  };
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                   _mm512_setzero_ps()};
  for (; i + 64 <= n; i += 64)
    for (int a = 0; a < 4; ++a) acc[a] = _mm512_add_ps(acc[a], exp(_mm512_loadu_ps(x + i + 16 * a)));
  sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]),
                                           _mm512_add_ps(acc[2], acc[3])));
#endif
  for (; i < n; ++i) sum += exp_nonpositive(x[i] - m);
  return sum;
}

// The largest of x[0, n), n > 0; a NaN may or may not win (callers check the sum).
float max_wide(const float* x, int64_t n) {
  int64_t i = 0;
  float m = -INFINITY;
#if defined(__AVX512F__)
  __m512 acc[4];
  for (auto& a : acc) a = _mm512_set1_ps(-INFINITY);
  for (; i + 64 <= n; i += 64)
    for (int a = 0; a < 4; ++a) acc[a] = _mm512_max_ps(acc[a], _mm512_loadu_ps(x + i + 16 * a));
  m = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(acc[0], acc[1]),
                                         _mm512_max_ps(acc[2], acc[3])));
#endif
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// The first i with x[i] == m (n if none).
int64_t first_equal(const float* x, int64_t n, float m) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 vm = _mm512_set1_ps(m);
  for (; i + 16 <= n; i += 16) {
    const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), vm, _CMP_EQ_OQ);
    if (hit) return i + __builtin_ctz(hit);
  }
#endif
  for (; i < n; ++i)
    if (x[i] == m) return i;
  return n;
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> greedy_sample(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "logits: contiguous float32 [B, V]");
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0, "logits: an empty vocabulary");
  auto ids = at::empty({B}, logits.options().dtype(at::kLong));
  auto logprobs = at::empty({B}, logits.options());
  const float* lp = logits.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  float* op = logprobs.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* x = lp + b * V;
      const float m = max_wide(x, V);
      const float sum = sum_exp_shifted(x, V, m);
      if (std::isnan(sum)) {  // a NaN (or an all -inf / +inf row): torch's argmax takes a NaN
        int64_t arg = 0;
        while (arg < V && !std::isnan(x[arg])) ++arg;
        ip[b] = arg < V ? arg : std::min(first_equal(x, V, m), V - 1);
        op[b] = NAN;
        continue;
      }
      const int64_t arg = first_equal(x, V, m);  // the first maximum
      ip[b] = arg;
      op[b] = std::min(0.f, -std::log(sum));  // x[arg] - m - log(sum)
    }
  });
  return {ids, logprobs};
}

}  // namespace ember

TORCH_LIBRARY(ember_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, int block_size, float scale, int window=0) -> Tensor");
  m.def("write_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots) -> ()");
  m.def("q8_0_linear(Tensor x, Tensor q, Tensor scales) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scales, Tensor zeros, "
        "Tensor scales_and_zeros, int group_size, int dense_min_rows) -> Tensor");
  m.def("int4_tiled_linear(Tensor x, Tensor codes, Tensor scales, Tensor zeros, int group_size, "
        "int dense_min_rows) -> Tensor");
  m.def("int4_tiles_supported() -> bool", &ember::int4_tiles_supported);
  m.def("greedy_sample(Tensor logits) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ember_cpu, CPU, m) {
  m.impl("decode_attention", ember::decode_attention);
  m.impl("write_kv", ember::write_kv);
  m.impl("q8_0_linear", ember::q8_0_linear);
  m.impl("int4_linear", ember::int4_linear);
  m.impl("int4_tiled_linear", ember::int4_tiled_linear);
  m.impl("greedy_sample", ember::greedy_sample);
}
