// decode_attention: one new query per sequence against its paged KV cache, read in place
// through the block table (no gather into a padded grid, no mask), the query heads of one KV
// head together (GQA: each key is loaded once for the group), softmax in float32. A
// sliding-window layer's (window > 0) queries read only their last `window` keys.
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include "common.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
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
// 16 keys: nearer ahead arrives late at long contexts, further gains little
// (docs/benchmarks.md).
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

}  // namespace ember

TORCH_LIBRARY_FRAGMENT(ember_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, int block_size, float scale, int window=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(ember_cpu, CPU, m) { m.impl("decode_attention", ember::decode_attention); }
