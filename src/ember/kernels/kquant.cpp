// GGUF's K-quants (Q4_K, Q5_K, Q6_K) and 5-bit types (Q5_0, Q5_1) from the file's own codes and
// block fields, in the layout `quantization/kquant.py:pack_tiles` makes: per tile of 16 output
// rows and (super-)block, the block fields of the 16 rows (d float16, dmin / m float16, then per
// sub-block 16 scales and 16 mins, a byte each), then per 2 inputs a record: 16 bytes, byte r
// holding row r's low 4 bits at the first input (low nibble) and the second (high nibble), and
// per bit above the 4th two 16-bit masks (the rows' bit at each input).
//
// kquant_linear: y = x @ W.T, W's output rows in segments of one type each (a fused Q/K/V
// of Q4_K and Q6_K parts, as llama.cpp's Q4_K_M mixes them): over the tiles, 16 rows in two
// AVX2 registers (a portable loop without AVX2), float32 sums per sub-block, then
// y += s * sum(x q) + o * sum(x) with s, o the sub-block's scale and offset (value = q * s + o)
// computed from the block fields in float32 as ggml does; bfloat16 activations on a CPU with
// AVX512-BF16 take bf16 dot products over the same tiles (codes_bf16). Each row of y is computed the same
// way whatever the number of rows (few rows decode the codes as they stream by, many read a
// tile decoded once), so that a token's result does not depend on what shares its step.
// kquant_rows: rows of W (an embedding lookup of a matrix kept so), float32.
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
#include "common.h"

#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace ember {
namespace {

enum Kind : int64_t { kQ4K = 0, kQ5K = 1, kQ6K = 2, kQ5_0 = 3, kQ5_1 = 4 };

template <int64_t KIND>
struct Format {
  static constexpr int64_t block = KIND == kQ5_0 || KIND == kQ5_1 ? 32 : 256;
  static constexpr int64_t group = KIND == kQ6K ? 16 : 32;
  static constexpr int64_t bits = KIND == kQ4K ? 4 : KIND == kQ6K ? 6 : 5;
  static constexpr bool has_min = KIND == kQ4K || KIND == kQ5K || KIND == kQ5_1;
  static constexpr bool has_sc = KIND == kQ4K || KIND == kQ5K || KIND == kQ6K;
  static constexpr bool has_m = KIND == kQ4K || KIND == kQ5K;
  static constexpr int64_t groups = block / group;  // sub-blocks a block
  static constexpr int64_t sc_at = 32 * (1 + has_min);
  static constexpr int64_t m_at = sc_at + (has_sc ? 16 * groups : 0);
  static constexpr int64_t meta = m_at + (has_m ? 16 * groups : 0);
  static constexpr int64_t record = 16 + 4 * (bits - 4);  // bytes per 2 inputs of a tile
  static constexpr int64_t bytes = meta + block / 2 * record;  // per tile and block
};

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof h);
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

inline uint32_t u16_at(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// 16 float16 at p -> float32.
inline void halves16(const uint8_t* p, float* out) {
#if defined(__F16C__)
  _mm256_storeu_ps(out, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)));
  _mm256_storeu_ps(out + 8, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + 16))));
#else
  for (int r = 0; r < 16; ++r) out[r] = half_at(p + 2 * r);
#endif
}

// The 16 rows' scale s and offset o of sub-block g of the block at p (value = q * s + o),
// in float32 as ggml computes them (d * sc and dmin * m are exact).
// d and dmin: the block's float16 fields as float32 (`block_halves`).
template <int64_t KIND>
inline void block_halves(const uint8_t* p, float* d, float* dmin) {
  halves16(p, d);
  if constexpr (Format<KIND>::has_min) halves16(p + 32, dmin);
}

template <int64_t KIND>
inline void scales16(const uint8_t* p, int64_t g, const float* d, const float* dmin, float* s,
                     float* o) {
  using F = Format<KIND>;
  const uint8_t* sc = p + F::sc_at + 16 * g;
  const uint8_t* m = p + F::m_at + 16 * g;
#pragma omp simd
  for (int r = 0; r < 16; ++r) {
    if constexpr (KIND == kQ6K) {
      s[r] = d[r] * static_cast<float>(static_cast<int8_t>(sc[r]));
      o[r] = -32.f * s[r];
    } else if constexpr (F::has_sc) {
      s[r] = d[r] * static_cast<float>(sc[r]);
      o[r] = -(dmin[r] * static_cast<float>(m[r]));
    } else {
      s[r] = d[r];
      o[r] = KIND == kQ5_1 ? dmin[r] : -16.f * d[r];
    }
  }
}

#if defined(__AVX2__)
// A 16-bit mask of the rows (bit r: row r) -> byte r = `value` where the bit is set, else 0.
inline __m128i expand_mask(uint32_t mask, char value) {
  const __m128i select = _mm_setr_epi8(1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128);
  const __m128i spread = _mm_shuffle_epi8(
      _mm_cvtsi32_si128(static_cast<int>(mask)),
      _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1));
  const __m128i set = _mm_cmpeq_epi8(_mm_and_si128(spread, select), select);
  return _mm_and_si128(set, _mm_set1_epi8(value));
}

// Record c's codes as float32: q[0], q[1] rows 0-7, 8-15 at the first input; q[2], q[3] at
// the second.
template <int64_t KIND>
inline void codes16(const uint8_t* c, __m256* q) {
  using F = Format<KIND>;
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m128i b = _mm_loadu_si128((const __m128i*)c);
  __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
  if constexpr (F::bits >= 5) {
    lo = _mm_or_si128(lo, expand_mask(u16_at(c + 16), 16));
    hi = _mm_or_si128(hi, expand_mask(u16_at(c + 18), 16));
  }
  if constexpr (F::bits >= 6) {
    lo = _mm_or_si128(lo, expand_mask(u16_at(c + 20), 32));
    hi = _mm_or_si128(hi, expand_mask(u16_at(c + 22), 32));
  }
  q[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
  q[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
  q[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
  q[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}
#endif

// The 16 rows' codes at inputs 2i, 2i + 1 of a block (record i at c): q0, q1 as float32.
template <int64_t KIND>
inline void codes16(const uint8_t* c, float* q0, float* q1) {
  using F = Format<KIND>;
#if defined(__AVX2__)
  __m256 q[4];
  codes16<KIND>(c, q);
  _mm256_storeu_ps(q0, q[0]);
  _mm256_storeu_ps(q0 + 8, q[1]);
  _mm256_storeu_ps(q1, q[2]);
  _mm256_storeu_ps(q1 + 8, q[3]);
#else
  uint32_t h[4] = {0, 0, 0, 0};
  for (int64_t i = 0; i < 2 * (F::bits - 4); ++i) h[i] = u16_at(c + 16 + 2 * i);
  for (int r = 0; r < 16; ++r) {
    uint32_t a = c[r] & 15u, b = c[r] >> 4;
    if constexpr (F::bits >= 5) {
      a |= ((h[0] >> r) & 1u) << 4;
      b |= ((h[1] >> r) & 1u) << 4;
    }
    if constexpr (F::bits >= 6) {
      a |= ((h[2] >> r) & 1u) << 5;
      b |= ((h[3] >> r) & 1u) << 5;
    }
    q0[r] = static_cast<float>(a);
    q1[r] = static_cast<float>(b);
  }
#endif
}

// fn(s, o, c, k0, gi) for each sub-block of a tile, in order: its 16 rows' scales and offsets,
// its first record, its first input and its index among a row's sub-blocks.
template <int64_t KIND, typename Fn>
inline void for_each_subblock(const uint8_t* tile, int64_t K, Fn&& fn) {
  using F = Format<KIND>;
  for (int64_t b = 0; b < K / F::block; ++b) {
    const uint8_t* p = tile + b * F::bytes;
    __builtin_prefetch(p + kPrefetchBytes, 0, 3);
    float d[16], dmin[16];
    block_halves<KIND>(p, d, dmin);
    for (int64_t g = 0; g < F::groups; ++g) {
      float s[16], o[16];
      scales16<KIND>(p, g, d, dmin, s, o);
      fn(s, o, p + F::meta + g * (F::group / 2) * F::record, b * F::block + g * F::group,
         b * F::groups + g);
    }
  }
}

#if defined(__AVX512BF16__)
// bfloat16 activations where the CPU has AVX512-BF16: the same tiles read by bf16 dot products.
// A step is 8 inputs, 4 records: record i goes to 128-bit lane i, its rows' codes as bfloat16
// 0x43qq = 128 + q (exact), rows 4j..4j+3 in register j, dword d holding row 4j + d at inputs
// (2i, 2i + 1); x's pair at 2i is spread over lane i. The bits above the 4th are added to the
// bytes under 64-bit masks built from the records' 16-bit row masks.
template <int64_t KIND>
inline void codes_bf16(const uint8_t* c, __m512bh* w) {
  using F = Format<KIND>;
  constexpr int64_t R = F::record;
  __m512i raw;
  if constexpr (R == 16) {
    raw = _mm512_loadu_si512(c);
  } else {
    raw = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i*)c));
    raw = _mm512_inserti32x4(raw, _mm_loadu_si128((const __m128i*)(c + R)), 1);
    raw = _mm512_inserti32x4(raw, _mm_loadu_si128((const __m128i*)(c + 2 * R)), 2);
    raw = _mm512_inserti32x4(raw, _mm_loadu_si128((const __m128i*)(c + 3 * R)), 3);
  }
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512i lo = _mm512_and_si512(raw, low4);
  __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
  if constexpr (F::bits >= 5) {
    // The 4 records' row masks at offset `at`, lane by lane (scalar: the vector shuffle port
    // is the kernel's busiest).
    auto plane = [c](int64_t at) {
      return _cvtu64_mask64(static_cast<uint64_t>(u16_at(c + at)) |
                            static_cast<uint64_t>(u16_at(c + R + at)) << 16 |
                            static_cast<uint64_t>(u16_at(c + 2 * R + at)) << 32 |
                            static_cast<uint64_t>(u16_at(c + 3 * R + at)) << 48);
    };
    const __m512i b16 = _mm512_set1_epi8(16);
    lo = _mm512_mask_add_epi8(lo, plane(16), lo, b16);
    hi = _mm512_mask_add_epi8(hi, plane(18), hi, b16);
    if constexpr (F::bits >= 6) {
      const __m512i b32 = _mm512_set1_epi8(32);
      lo = _mm512_mask_add_epi8(lo, plane(20), lo, b32);
      hi = _mm512_mask_add_epi8(hi, plane(22), hi, b32);
    }
  }
  const __m512i c43 = _mm512_set1_epi8(0x43);
  const __m512i t0 = _mm512_unpacklo_epi8(lo, hi), t1 = _mm512_unpackhi_epi8(lo, hi);
  w[0] = (__m512bh)_mm512_unpacklo_epi8(t0, c43);
  w[1] = (__m512bh)_mm512_unpackhi_epi8(t0, c43);
  w[2] = (__m512bh)_mm512_unpacklo_epi8(t1, c43);
  w[3] = (__m512bh)_mm512_unpackhi_epi8(t1, c43);
}

// Lane q of the result: the sum of a_q's four lanes, i.e. rows 4q..4q+3 over the step's inputs.
inline __m512 sum_lanes(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, 0x44),
                                   _mm512_shuffle_f32x4(a0, a1, 0xEE));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, 0x44),
                                   _mm512_shuffle_f32x4(a2, a3, 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
}

// y[m, 16 t .. 16 t + 16) for MC rows of bfloat16 x: per sub-block the rows' sums of
// x (128 + q), then y += s * sum + (o - 128 s) * sum(x). With `panel`: the tile's codes_bf16
// registers decoded once for many rows (the same values, so a row's result does not depend
// on the path).
template <int64_t KIND, int MC, typename OT>
void gemv_tile_bf16(const uint16_t* x, int64_t K, const uint8_t* tile, const float* xsum, OT* y,
                    int64_t ldy, const __m512bh* panel) {
  using F = Format<KIND>;
  const int64_t groups = K / F::group;
  const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  __m512 acc[MC];
  for (int m = 0; m < MC; ++m) acc[m] = _mm512_setzero_ps();
  for_each_subblock<KIND>(tile, K, [&](const float* s, const float* o, const uint8_t* c,
                                       int64_t k0, int64_t gi) {
      __m512 p0[MC], p1[MC], p2[MC], p3[MC];
      for (int m = 0; m < MC; ++m) p0[m] = p1[m] = p2[m] = p3[m] = _mm512_setzero_ps();
      for (int64_t i = 0; i < F::group / 8; ++i) {
        __m512bh w[4];
        if (panel != nullptr) {
          for (int j = 0; j < 4; ++j) w[j] = (__m512bh)_mm512_loadu_si512(panel + (k0 / 8 + i) * 4 + j);
        } else {
          __builtin_prefetch(c + 4 * i * F::record + kPrefetchBytes, 0, 3);
          codes_bf16<KIND>(c + 4 * i * F::record, w);
        }
        for (int m = 0; m < MC; ++m) {
          const __m512bh xv = (__m512bh)_mm512_permutexvar_epi32(
              spread, _mm512_castsi128_si512(_mm_loadu_si128((const __m128i*)(x + m * K + k0 + 8 * i))));
          p0[m] = _mm512_dpbf16_ps(p0[m], w[0], xv);
          p1[m] = _mm512_dpbf16_ps(p1[m], w[1], xv);
          p2[m] = _mm512_dpbf16_ps(p2[m], w[2], xv);
          p3[m] = _mm512_dpbf16_ps(p3[m], w[3], xv);
        }
      }
      const __m512 sv = _mm512_loadu_ps(s);
      const __m512 ov = _mm512_fnmadd_ps(_mm512_set1_ps(128.f), sv, _mm512_loadu_ps(o));
      for (int m = 0; m < MC; ++m)
        acc[m] = _mm512_fmadd_ps(sv, sum_lanes(p0[m], p1[m], p2[m], p3[m]),
                                 _mm512_fmadd_ps(ov, _mm512_set1_ps(xsum[m * groups + gi]), acc[m]));
  });
  for (int m = 0; m < MC; ++m) {
    float out[16];
    _mm512_storeu_ps(out, acc[m]);
    for (int r = 0; r < 16; ++r) y[m * ldy + r] = from_float<OT>(out[r]);
  }
}

// Rows of x four at a time (five: a verify step's rows share one decode of the codes); from
// kPanelMinRows rows on, each tile is decoded once per chunk of kChunkRows rows (a chunk's x
// stays in L2 while the tiles go by).
constexpr int64_t kPanelMinRowsBf16 = 8, kChunkRows = 40;

template <int64_t KIND, int MC, typename OT>
void rows_bf16(const uint16_t* x, int64_t K, const uint8_t* tile, const float* xsum,
               int64_t groups, OT* y, int64_t ldy, int64_t M, const __m512bh* panel) {
  for (int64_t m = 0; m < M; m += MC) {
    const uint16_t* xm = x + m * K;
    const float* sm = xsum + m * groups;
    OT* ym = y + m * ldy;
    switch (std::min<int64_t>(MC, M - m)) {
      case 1: gemv_tile_bf16<KIND, 1>(xm, K, tile, sm, ym, ldy, panel); break;
      case 2: gemv_tile_bf16<KIND, 2>(xm, K, tile, sm, ym, ldy, panel); break;
      case 3: gemv_tile_bf16<KIND, 3>(xm, K, tile, sm, ym, ldy, panel); break;
      case 4: gemv_tile_bf16<KIND, 4>(xm, K, tile, sm, ym, ldy, panel); break;
      default: gemv_tile_bf16<KIND, MC>(xm, K, tile, sm, ym, ldy, panel); break;
    }
  }
}

template <int64_t KIND, typename OT>
void gemv_bf16(const uint16_t* x, const float* xf, int64_t M, int64_t K, const uint8_t* tiles,
               int64_t N, OT* y, int64_t ldy) {
  using F = Format<KIND>;
  const int64_t groups = K / F::group, tile_bytes = K / F::block * F::bytes;
  std::vector<float> xsum(M * groups);
  group_sums(xf, M, K, F::group, xsum.data());
  if (M < kPanelMinRowsBf16) {
    at::parallel_for(0, N / 16, 4, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        rows_bf16<KIND, 5>(x, K, tiles + t * tile_bytes, xsum.data(), groups, y + 16 * t, ldy,
                           M, nullptr);
    });
    return;
  }
  for (int64_t m0 = 0; m0 < M; m0 += kChunkRows) {
    const int64_t rows = std::min(kChunkRows, M - m0);
    at::parallel_for(0, N / 16, 1, [&](int64_t t0, int64_t t1) {
      std::vector<__m512i> panel(K / 2);  // K / 8 steps of 4 registers
      for (int64_t t = t0; t < t1; ++t) {
        const uint8_t* tile = tiles + t * tile_bytes;
        for (int64_t b = 0; b < K / F::block; ++b)
          for (int64_t i = 0; i < F::block / 8; ++i) {
            __m512bh w[4];
            codes_bf16<KIND>(tile + b * F::bytes + F::meta + 4 * i * F::record, w);
            for (int j = 0; j < 4; ++j)
              panel[(b * F::block / 8 + i) * 4 + j] = (__m512i)w[j];
          }
        rows_bf16<KIND, 5>(x + m0 * K, K, tile, xsum.data() + m0 * groups, groups,
                           y + m0 * ldy + 16 * t, ldy, rows,
                           reinterpret_cast<const __m512bh*>(panel.data()));
      }
    });
  }
}
#endif

template <int64_t KIND>
void rows_kernel(const uint8_t* tiles, const int64_t* ids, int64_t T, int64_t K, float* out) {
  using F = Format<KIND>;
  const int64_t blocks = K / F::block;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t tile = ids[t] / 16, r = ids[t] % 16;
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* p = tiles + (tile * blocks + b) * F::bytes;
      for (int64_t g = 0; g < F::groups; ++g) {
        float s[16], o[16], q[2][16], d[16], dmin[16];
        block_halves<KIND>(p, d, dmin);
        scales16<KIND>(p, g, d, dmin, s, o);
        for (int64_t i = g * F::group / 2; i < (g + 1) * F::group / 2; ++i) {
          codes16<KIND>(p + F::meta + i * F::record, q[0], q[1]);
          for (int e = 0; e < 2; ++e) {
            const float v = q[e][r];
            // ggml's own order of operations (the same values: every step is exact but one)
            out[t * K + b * F::block + 2 * i + e] =
                KIND == kQ6K ? s[r] * (v - 32.f) : KIND == kQ5_0 ? s[r] * (v - 16.f) : s[r] * v + o[r];
          }
        }
      }
    }
  }
}

// y[m, 16 t .. 16 t + 16) for MC rows of x (float32 [MC, K], row stride K): per sub-block,
// the 16 rows' sums of x q in float32 (two inputs a step, 16 rows in two AVX2 registers),
// then y += s * sum(x q) + o * sum(x).
// With `panel` (AVX2 builds): the tile's codes as floats, decoded once for many rows of x
// ([K / 2][4][8] floats: per 2 inputs the four registers codes16 gives), read instead of
// decoding them again: the same values in the same operations, so a row's result does not
// depend on the path.
template <int64_t KIND, int MC, typename OT>
void gemv_tile(const float* x, int64_t K, const uint8_t* tile, const float* xsum, OT* y,
               int64_t ldy, const float* panel = nullptr) {
  using F = Format<KIND>;
  const int64_t groups = K / F::group;
  float acc[MC][16] = {};
#if defined(__AVX2__)
  __m256 a[MC][2];
  for (int m = 0; m < MC; ++m) a[m][0] = a[m][1] = _mm256_setzero_ps();
#endif
  for_each_subblock<KIND>(tile, K, [&](const float* s, const float* o, const uint8_t* c,
                                       int64_t k0, int64_t gi) {
#if defined(__AVX2__)
      // Four flat arrays, not one [MC][4]: GCC keeps these in registers across the loop.
      __m256 p0[MC], p1[MC], p2[MC], p3[MC];
      for (int m = 0; m < MC; ++m) p0[m] = p1[m] = p2[m] = p3[m] = _mm256_setzero_ps();
      for (int64_t i = 0; i < F::group / 2; ++i) {
        __m256 q[4];
        if (panel != nullptr) {
          const float* pq = panel + (k0 / 2 + i) * 32;
          for (int j = 0; j < 4; ++j) q[j] = _mm256_loadu_ps(pq + 8 * j);
        } else {
          if (i % 4 == 0) __builtin_prefetch(c + i * F::record + kPrefetchBytes, 0, 3);
          codes16<KIND>(c + i * F::record, q);
        }
        for (int m = 0; m < MC; ++m) {
          const __m256 x0 = _mm256_broadcast_ss(x + m * K + k0 + 2 * i);
          const __m256 x1 = _mm256_broadcast_ss(x + m * K + k0 + 2 * i + 1);
          p0[m] = _mm256_fmadd_ps(x0, q[0], p0[m]);
          p1[m] = _mm256_fmadd_ps(x0, q[1], p1[m]);
          p2[m] = _mm256_fmadd_ps(x1, q[2], p2[m]);
          p3[m] = _mm256_fmadd_ps(x1, q[3], p3[m]);
        }
      }
      for (int h = 0; h < 2; ++h) {
        const __m256 sv = _mm256_loadu_ps(s + 8 * h), ov = _mm256_loadu_ps(o + 8 * h);
        for (int m = 0; m < MC; ++m) {
          const __m256 sum = h == 0 ? _mm256_add_ps(p0[m], p2[m]) : _mm256_add_ps(p1[m], p3[m]);
          a[m][h] = _mm256_fmadd_ps(sv, sum, _mm256_fmadd_ps(ov, _mm256_set1_ps(xsum[m * groups + gi]),
                                                             a[m][h]));
        }
      }
#else
      float part[MC][16] = {};
      for (int64_t i = 0; i < F::group / 2; ++i) {
        float q0[16], q1[16];
        codes16<KIND>(c + i * F::record, q0, q1);
        for (int m = 0; m < MC; ++m) {
          const float x0 = x[m * K + k0 + 2 * i], x1 = x[m * K + k0 + 2 * i + 1];
          for (int r = 0; r < 16; ++r) part[m][r] += x0 * q0[r] + x1 * q1[r];
        }
      }
      for (int m = 0; m < MC; ++m)
        for (int r = 0; r < 16; ++r) acc[m][r] += s[r] * part[m][r] + o[r] * xsum[m * groups + gi];
#endif
  });
#if defined(__AVX2__)
  for (int m = 0; m < MC; ++m) {
    _mm256_storeu_ps(acc[m], a[m][0]);
    _mm256_storeu_ps(acc[m] + 8, a[m][1]);
  }
#endif
  for (int m = 0; m < MC; ++m)
    for (int r = 0; r < 16; ++r) y[m * ldy + r] = from_float<OT>(acc[m][r]);
}

// Every row of x the same way whatever M (a row's sums do not depend on its neighbours): few
// rows decode each tile's codes as they stream by (rows four at a time); from kPanelMinRows
// rows on (AVX2) each tile is decoded once into a float panel that row blocks of 3 read.
constexpr int64_t kPanelMinRows = 8;

template <int64_t KIND, typename OT>
void gemv(const float* x, int64_t M, int64_t K, const uint8_t* tiles, int64_t N, OT* y,
          int64_t ldy) {
  using F = Format<KIND>;
  const int64_t groups = K / F::group, tile_bytes = K / F::block * F::bytes;
  std::vector<float> xsum(M * groups);
  group_sums(x, M, K, F::group, xsum.data());
#if defined(__AVX2__)
  if (M >= kPanelMinRows) {
    at::parallel_for(0, N / 16, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> panel(K * 16);
      for (int64_t t = t0; t < t1; ++t) {
        const uint8_t* tile = tiles + t * tile_bytes;
        for (int64_t b = 0; b < K / F::block; ++b)
          for (int64_t i = 0; i < F::block / 2; ++i) {
            __m256 q[4];
            codes16<KIND>(tile + b * F::bytes + F::meta + i * F::record, q);
            for (int j = 0; j < 4; ++j)
              _mm256_storeu_ps(panel.data() + (b * F::block / 2 + i) * 32 + 8 * j, q[j]);
          }
        for (int64_t m = 0; m < M; m += 3) {
          const float* xm = x + m * K;
          const float* sm = xsum.data() + m * groups;
          OT* ym = y + m * ldy + 16 * t;
          switch (std::min<int64_t>(3, M - m)) {
            case 1: gemv_tile<KIND, 1>(xm, K, tile, sm, ym, ldy, panel.data()); break;
            case 2: gemv_tile<KIND, 2>(xm, K, tile, sm, ym, ldy, panel.data()); break;
            default: gemv_tile<KIND, 3>(xm, K, tile, sm, ym, ldy, panel.data()); break;
          }
        }
      }
    });
    return;
  }
#endif
  // Per tile, rows of x four at a time: the tile stays in L1 between them.
  at::parallel_for(0, N / 16, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t m = 0; m < M; m += 4) {
        const float* xm = x + m * K;
        const float* sm = xsum.data() + m * groups;
        const uint8_t* tile = tiles + t * tile_bytes;
        OT* ym = y + m * ldy + 16 * t;
        switch (std::min<int64_t>(4, M - m)) {
          case 1: gemv_tile<KIND, 1>(xm, K, tile, sm, ym, ldy); break;
          case 2: gemv_tile<KIND, 2>(xm, K, tile, sm, ym, ldy); break;
          case 3: gemv_tile<KIND, 3>(xm, K, tile, sm, ym, ldy); break;
          default: gemv_tile<KIND, 4>(xm, K, tile, sm, ym, ldy); break;
        }
      }
  });
}

template <typename Fn>
auto dispatch(int64_t kind, Fn&& fn) {
  switch (kind) {
    case kQ4K: return fn(std::integral_constant<int64_t, kQ4K>{});
    case kQ5K: return fn(std::integral_constant<int64_t, kQ5K>{});
    case kQ6K: return fn(std::integral_constant<int64_t, kQ6K>{});
    case kQ5_0: return fn(std::integral_constant<int64_t, kQ5_0>{});
    case kQ5_1: return fn(std::integral_constant<int64_t, kQ5_1>{});
  }
  TORCH_CHECK(false, "unknown K-quant kind ", kind);
}

// [N / 16, K / block, bytes] of kind: checked, with N.
int64_t check_tiles(const at::Tensor& tiles, int64_t kind, int64_t K) {
  TORCH_CHECK(tiles.dim() == 3 && tiles.scalar_type() == at::kByte && tiles.is_contiguous(),
              "tiles: contiguous uint8 [N / 16, K / block, bytes]");
  dispatch(kind, [&](auto tag) {
    using F = Format<decltype(tag)::value>;
    TORCH_CHECK(K % F::block == 0 && tiles.size(1) == K / F::block && tiles.size(2) == F::bytes,
                "tiles: not the layout of a [N, ", K, "] weight of kind ", kind);
    return 0;
  });
  return tiles.size(0) * 16;
}

}  // namespace

at::Tensor kquant_linear(const at::Tensor& x_in, at::TensorList tiles, at::IntArrayRef kinds,
                         int64_t K, bool float_out) {
  const auto xt = x_in.scalar_type();
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == K && (xt == at::kFloat || xt == at::kBFloat16),
              "x: float32 or bfloat16 [M, K]");
  TORCH_CHECK(!tiles.empty() && tiles.size() == kinds.size(), "one kind per segment of tiles");
  const int64_t M = x_in.size(0);
  std::vector<int64_t> first{0};  // each segment's first output row
  for (size_t i = 0; i < tiles.size(); ++i)
    first.push_back(first.back() + check_tiles(tiles[i], kinds[i], K));
  const int64_t N = first.back();
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const float* xp = x.data_ptr<float>();
  auto y = at::empty({M, N}, x_in.options().dtype(float_out ? at::kFloat : xt));
#if defined(__AVX512BF16__)
  const at::Tensor xb = x_in.contiguous();
  const uint16_t* xbp = reinterpret_cast<const uint16_t*>(xb.data_ptr());
#endif
  for (size_t i = 0; i < tiles.size(); ++i)
    dispatch(kinds[i], [&](auto tag) {
      constexpr int64_t kind = decltype(tag)::value;
      const uint8_t* tp = tiles[i].data_ptr<uint8_t>();
      const int64_t n = first[i + 1] - first[i];
#if defined(__AVX512BF16__)
      if (xt == at::kBFloat16) {
        if (y.scalar_type() == at::kBFloat16)
          gemv_bf16<kind>(xbp, xp, M, K, tp, n, y.data_ptr<c10::BFloat16>() + first[i], N);
        else
          gemv_bf16<kind>(xbp, xp, M, K, tp, n, y.data_ptr<float>() + first[i], N);
        return 0;
      }
#endif
      if (y.scalar_type() == at::kBFloat16)
        gemv<kind>(xp, M, K, tp, n, y.data_ptr<c10::BFloat16>() + first[i], N);
      else
        gemv<kind>(xp, M, K, tp, n, y.data_ptr<float>() + first[i], N);
      return 0;
    });
  return y;
}

at::Tensor kquant_rows(const at::Tensor& tiles, const at::Tensor& ids_in, int64_t kind, int64_t K) {
  const int64_t N = check_tiles(tiles, kind, K);
  TORCH_CHECK(ids_in.scalar_type() == at::kLong, "ids: int64");
  const at::Tensor ids = ids_in.contiguous();
  const int64_t T = ids.numel();
  const int64_t* ip = ids.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(ip[t] >= 0 && ip[t] < N, "row ", ip[t], " out of range");
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(K);
  auto out = at::empty(shape, ids.options().dtype(at::kFloat));
  kquant_rows_into(tiles, ip, T, kind, K, out.data_ptr<float>());
  return out;
}

void kquant_rows_into(const at::Tensor& tiles, const int64_t* ids, int64_t T, int64_t kind,
                      int64_t K, float* out) {
  check_tiles(tiles, kind, K);
  dispatch(kind, [&](auto tag) {
    rows_kernel<decltype(tag)::value>(tiles.data_ptr<uint8_t>(), ids, T, K, out);
    return 0;
  });
}

int64_t kquant_block(int64_t kind) {
  return dispatch(kind, [](auto tag) { return Format<decltype(tag)::value>::block; });
}

}  // namespace ember

TORCH_LIBRARY_FRAGMENT(ember_cpu, m) {
  m.def("kquant_linear(Tensor x, Tensor[] tiles, int[] kinds, int k, bool float_out) -> Tensor");
  m.def("kquant_rows(Tensor tiles, Tensor ids, int kind, int k) -> Tensor");
}

TORCH_LIBRARY_IMPL(ember_cpu, CPU, m) {
  m.impl("kquant_linear", ember::kquant_linear);
  m.impl("kquant_rows", ember::kquant_rows);
}
