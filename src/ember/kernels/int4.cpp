// int4_linear: y = x @ W.T with W group-wise int4 in ATen's CPU packing (what
// aten._convert_weight_to_int4pack_for_cpu makes), w = (q - 8) * scale + zero. Few rows of x:
// ATen's int4 kernel; from dense_min_rows rows on (compute-bound): W dequantized to x's
// dtype in one vectorized pass, then ATen's GEMM. One op for every row count, so a compiled
// graph does not split on it.
// int4_tiled_linear: the same with W in ember's own layout (`tile_codes`) and a bf16
// dot-product GEMV for few rows, where the CPU has AVX512-BF16 (int4_tiles_supported).
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include "common.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace ember {
namespace {

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

}  // namespace ember

TORCH_LIBRARY_FRAGMENT(ember_cpu, m) {
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scales, Tensor zeros, "
        "Tensor scales_and_zeros, int group_size, int dense_min_rows) -> Tensor");
  m.def("int4_tiled_linear(Tensor x, Tensor codes, Tensor scales, Tensor zeros, int group_size, "
        "int dense_min_rows) -> Tensor");
  m.def("int4_tiles_supported() -> bool", &ember::int4_tiles_supported);
}

TORCH_LIBRARY_IMPL(ember_cpu, CPU, m) {
  m.impl("int4_linear", ember::int4_linear);
  m.impl("int4_tiled_linear", ember::int4_tiled_linear);
}
