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
#include <tuple>

namespace ember {
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

TORCH_LIBRARY_FRAGMENT(ember_cpu, m) {
  m.def("greedy_sample(Tensor logits) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ember_cpu, CPU, m) { m.impl("greedy_sample", ember::greedy_sample); }
