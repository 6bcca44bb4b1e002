// int4_tiled_linear: y = x @ W.T with W group-wise int4 in ember's bf16 tiles (`tile_codes`)
// and bf16 activations, by bf16 dot-product instructions, where the CPU has AVX512-BF16
// (int4_tiles_supported; elsewhere int4 layers take the column tiles of matmul.cpp). Every row
// of y is computed the same way whatever the number of rows (rows four at a time, each with
// its own sums), so that a token's result does not depend on what shares its step.
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include "common.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace ember {
namespace {

#if defined(__AVX512BF16__)
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
      // The scales and zeros: streams of their own, 16 groups (512 bytes) ahead.
      const int64_t at = (t * groups + g) * 16;
      _mm_prefetch((const char*)(scales + at + 256), _MM_HINT_T0);
      _mm_prefetch((const char*)(zeros + at + 256), _MM_HINT_T0);
      const __m512 sc = widen(scales + at);
      const __m512 c = _mm512_fnmadd_ps(_mm512_set1_ps(136.f), sc, widen(zeros + at));
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

}  // namespace

bool int4_tiles_supported() { return true; }

at::Tensor int4_tiled_linear(const at::Tensor& x_in, const at::Tensor& codes,
                             const at::Tensor& scales, const at::Tensor& zeros, int64_t G) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kBFloat16, "x: bfloat16 [M, K]");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = codes.size(0) * 16;
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == at::kByte && codes.is_contiguous() &&
                  codes.size(1) * 8 == K && codes.size(2) == 64 && K % G == 0 && G % 8 == 0,
              "codes: the GEMV's tiles [N / 16, K / 8, 64] of an [N, K] weight");
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && zeros.scalar_type() == at::kBFloat16 &&
                  scales.is_contiguous() && zeros.is_contiguous() &&
                  scales.numel() == N * (K / G) && zeros.numel() == N * (K / G),
              "scales, zeros: contiguous bfloat16, [N / 16, K / G, 16]: per tile, group by group");
  const at::Tensor x = x_in.contiguous();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<c10::BFloat16>());
  const uint16_t* zp = reinterpret_cast<const uint16_t*>(zeros.data_ptr<c10::BFloat16>());
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const int64_t groups = K / G;
  const c10::BFloat16* xb = x.data_ptr<c10::BFloat16>();
  std::vector<float> xf(M * K), xsum(M * groups);  // x's group sums in group_sums' fixed order
  for (int64_t i = 0; i < M * K; ++i) xf[i] = to_float(xb[i]);
  group_sums(xf.data(), M, K, G, xsum.data());
  auto y = at::empty({M, N}, x.options());
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xb);
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<c10::BFloat16>());
  // Per tile, rows of x four at a time (the tile, 16 rows of W, stays in L1 between them),
  // for every row count: each row's sums do not depend on its neighbours.
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
                             const at::Tensor&, int64_t) {
  TORCH_CHECK(false, "int4_tiled_linear needs AVX512-BF16 (ember.kernels.int4_tiles)");
}
#endif

}  // namespace ember

TORCH_LIBRARY_FRAGMENT(ember_cpu, m) {
  m.def("int4_tiled_linear(Tensor x, Tensor codes, Tensor scales, Tensor zeros, int group_size) "
        "-> Tensor");
  m.def("int4_tiles_supported() -> bool", &ember::int4_tiles_supported);
}

TORCH_LIBRARY_IMPL(ember_cpu, CPU, m) {
  m.impl("int4_tiled_linear", ember::int4_tiled_linear);
}
