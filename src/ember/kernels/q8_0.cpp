// q8_0_linear: y = x @ W.T with W in GGUF's Q8_0 layout as it is (int8 codes, one scale per
// 32 inputs): reads 1.06 bytes per weight instead of bf16's 2, computes in float32.
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include "common.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace ember {
namespace {

// Weight rows read ahead (~9 KiB; see kPrefetchBytes in common.h for why).
constexpr int64_t kPrefetchRows = 16;

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

}  // namespace
}  // namespace ember

TORCH_LIBRARY_FRAGMENT(ember_cpu, m) {
  m.def("q8_0_linear(Tensor x, Tensor q, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(ember_cpu, CPU, m) { m.impl("q8_0_linear", ember::q8_0_linear); }
