// ember's matmuls in column tiles: y = x @ W.T, every row of y computed the same way whatever
// the number of rows, the row block or the thread, so that a token's result does not depend on
// what shares its step (a prompt's rows, a decode row and a speculative verify row agree
// bitwise).
//
// Layout: tiles of 16 output rows of W (columns of y); per tile, the weights K-major:
//   int4_linear: per 8 inputs k0..k0 + 7, 16 int32 words, word i holding row i's code at
//     k0 + j in bits 4j..4j + 3 (one shift and one mask per 8 rows and input decode them, no
//     byte shuffles) (`quantization/int4.py:column_tiles`);
//   int8_linear: per input, 16 int8 codes, row i's at byte i (GGUF Q8_0, `quantization/q8_0.py`;
//     per-channel int8, `quantization/int8.py`);
//   dense_linear: per input, 16 float32 or bfloat16 weights (`quantization/dense.py`).
// Per group of G inputs and output row, float32 [N / 16, K / G, 16] (per tile, group by group:
// a sequential stream beside the codes'): the scale s and, for int4, the offset c, the weight
// being q * s (+ c). Dense weights are one group (G = K) and no scale.
//
// Each y[m, n] is one sequence of float32 operations: per group g, a = sum over k of
// x[m, k] * q[n, k] by FMAs in k order from 0, then y = fma(a, s, y) and, with an offset,
// y = fma(c, sum of x[m, k] over g, y) (dense: y = a). The vectorization is across n (8 outputs a register;
// x[m, k] broadcast), never across k. Few rows decode the codes in registers (several tiles at
// once where the rows alone give too few FMA chains; software prefetch kPrefetchBytes ahead in
// each tile's stream); many rows decode each tile once into a float panel that row blocks of 6
// read.
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include "common.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace ember {

// Per row and group the sum of x over the group, in a fixed order (8 lanes, then a fixed
// tree): one function for every path.
void group_sums(const float* x, int64_t M, int64_t K, int64_t G, float* xs) {
  const int64_t groups = K / G;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      const float* p = x + m * K + g * G;
#if defined(__AVX2__)
      __m256 s = _mm256_loadu_ps(p);
      for (int64_t k = 8; k < G; k += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(p + k));
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_movehdup_ps(h));
      xs[m * groups + g] = _mm_cvtss_f32(h);
#else
      float lanes[8];
      for (int i = 0; i < 8; ++i) lanes[i] = p[i];
      for (int64_t k = 8; k < G; k += 8)
        for (int i = 0; i < 8; ++i) lanes[i] += p[k + i];
      float h[4];
      for (int i = 0; i < 4; ++i) h[i] = lanes[i] + lanes[i + 4];
      h[0] += h[2], h[1] += h[3];
      xs[m * groups + g] = h[0] + h[1];
#endif
    }
}

namespace {

constexpr int64_t kColTile = 16;

#if defined(__AVX2__) && defined(__FMA__)
using Vec = __m256;     // 8 outputs
using Codes = __m256i;  // 8 rows' words
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vbroadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Codes cload(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
template <int J>
inline Vec nibble(Codes v) {  // 8 rows' codes at input k0 + J as floats
  const __m256i q = J == 7 ? _mm256_srli_epi32(v, 28)
                           : _mm256_and_si256(J == 0 ? v : _mm256_srli_epi32(v, 4 * J),
                                              _mm256_set1_epi32(15));
  return _mm256_cvtepi32_ps(q);
}
inline Vec bytes8(const int8_t* p) {  // 8 int8 codes as floats
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline Vec bf16x8(const uint16_t* p) {  // 8 bfloat16 as floats (exact: the high halves)
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
#else
struct Vec {
  float v[8];
};
struct Codes {
  int32_t v[8];
};
inline Vec vzero() { return Vec{}; }
inline Vec vbroadcast(const float* p) {
  Vec r;
  for (float& e : r.v) e = *p;
  return r;
}
inline Vec vload(const float* p) {
  Vec r;
  std::memcpy(r.v, p, sizeof r.v);
  return r;
}
inline void vstore(float* p, Vec v) { std::memcpy(p, v.v, sizeof v.v); }
inline Vec vfma(Vec a, Vec b, Vec c) {
  for (int i = 0; i < 8; ++i) c.v[i] = std::fma(a.v[i], b.v[i], c.v[i]);
  return c;
}
inline Codes cload(const int32_t* p) {
  Codes r;
  std::memcpy(r.v, p, sizeof r.v);
  return r;
}
template <int J>
inline Vec nibble(Codes c) {
  Vec r;
  for (int i = 0; i < 8; ++i) r.v[i] = static_cast<float>((static_cast<uint32_t>(c.v[i]) >> (4 * J)) & 15);
  return r;
}
inline Vec bytes8(const int8_t* p) {
  Vec r;
  for (int i = 0; i < 8; ++i) r.v[i] = static_cast<float>(p[i]);
  return r;
}
inline Vec bf16x8(const uint16_t* p) {
  Vec r;
  for (int i = 0; i < 8; ++i) {
    const uint32_t w = static_cast<uint32_t>(p[i]) << 16;
    std::memcpy(&r.v[i], &w, sizeof w);
  }
  return r;
}
#endif

#define EMBER_INLINE inline __attribute__((always_inline))

struct ColProblem {
  const float* x;   // [M, K] float32
  const float* xs;  // [M, K / G] group sums (int4 only)
  const void* codes;
  const float* s;  // [N / 16, K / G, 16] (not dense)
  const float* c;  // int4 only
  float* y;        // [M, N] float32
  int64_t M, K, N, G;
};

enum ColFormat { kInt4, kInt8, kF32, kBF16 };

template <int F>
constexpr bool kDense = F == kF32 || F == kBF16;

// The 16 codes of tile t at inputs k0..k0 + 7 as floats, handed to f(i, rows 0-7, rows 8-15)
// for i = 0..7 in order.
template <int F, typename Fn>
EMBER_INLINE void decode8(const ColProblem& P, int64_t t, int64_t k0, Fn&& f) {
  if constexpr (F == kInt4) {
    const int32_t* p = static_cast<const int32_t*>(P.codes) + (t * (P.K / 8) + k0 / 8) * kColTile;
    __builtin_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, 0, 3);
    const Codes lo = cload(p), hi = cload(p + 8);
    f(0, nibble<0>(lo), nibble<0>(hi));
    f(1, nibble<1>(lo), nibble<1>(hi));
    f(2, nibble<2>(lo), nibble<2>(hi));
    f(3, nibble<3>(lo), nibble<3>(hi));
    f(4, nibble<4>(lo), nibble<4>(hi));
    f(5, nibble<5>(lo), nibble<5>(hi));
    f(6, nibble<6>(lo), nibble<6>(hi));
    f(7, nibble<7>(lo), nibble<7>(hi));
  } else if constexpr (F == kInt8) {
    const int8_t* p = static_cast<const int8_t*>(P.codes) + (t * P.K + k0) * kColTile;
    __builtin_prefetch(p + kPrefetchBytes, 0, 3);
    __builtin_prefetch(p + kPrefetchBytes + 64, 0, 3);
    for (int i = 0; i < 8; ++i) f(i, bytes8(p + i * kColTile), bytes8(p + i * kColTile + 8));
  } else if constexpr (F == kBF16) {
    const uint16_t* p = static_cast<const uint16_t*>(P.codes) + (t * P.K + k0) * kColTile;
    const char* ahead = reinterpret_cast<const char*>(p) + kPrefetchBytes;
    for (int l = 0; l < 4; ++l) __builtin_prefetch(ahead + 64 * l, 0, 3);  // 8 inputs: 4 lines
    for (int i = 0; i < 8; ++i) f(i, bf16x8(p + i * kColTile), bf16x8(p + i * kColTile + 8));
  } else {
    const float* p = static_cast<const float*>(P.codes) + (t * P.K + k0) * kColTile;
    const char* ahead = reinterpret_cast<const char*>(p) + kPrefetchBytes;
    for (int l = 0; l < 8; ++l) __builtin_prefetch(ahead + 64 * l, 0, 3);  // 8 inputs: 8 lines
    for (int i = 0; i < 8; ++i) f(i, vload(p + i * kColTile), vload(p + i * kColTile + 8));
  }
}

// y[m0 .. m0 + MR, tiles t0 .. t0 + NT] += group g's terms from its FMA chains (a[r][j][h]:
// row r, tile j, its rows 8h..8h + 7): the group's scale (and offset) folded into y, which
// stays in memory between groups.
template <int F, int MR, int NT>
EMBER_INLINE void col_fold(const ColProblem& P, int64_t m0, int64_t t0, int64_t g,
                           const Vec (&a)[MR][NT][2]) {
  const int64_t N = P.N, groups = P.K / P.G;
  for (int r = 0; r < MR; ++r) {
    Vec xsum = vzero();
    if constexpr (F == kInt4) xsum = vbroadcast(P.xs + (m0 + r) * groups + g);
    for (int j = 0; j < NT; ++j)
      for (int h = 0; h < 2; ++h) {
        const int64_t n = (t0 + j) * kColTile + 8 * h;
        const int64_t at = ((t0 + j) * groups + g) * kColTile + 8 * h;  // this group's s, c
        float* yp = P.y + (m0 + r) * N + n;
        if constexpr (kDense<F>) {  // one group, no scale
          vstore(yp, a[r][j][h]);
          continue;
        }
        const Vec prev = g == 0 ? vzero() : vload(yp);
        Vec y = vfma(a[r][j][h], vload(P.s + at), prev);
        if constexpr (F == kInt4) y = vfma(vload(P.c + at), xsum, y);
        vstore(yp, y);
      }
  }
}

// Group g for rows m0 .. m0 + MR and tiles t0 .. t0 + NT, the codes decoded in registers:
// MR * NT * 2 FMA chains. (Two flat accumulator arrays, copied out for the fold: GCC keeps
// arrays whose address never escapes in registers across the loop, not others.)
template <int F, int MR, int NT>
EMBER_INLINE void col_group(const ColProblem& P, int64_t m0, int64_t t0, int64_t g) {
  const int64_t K = P.K, G = P.G;
  Vec a0[MR * NT], a1[MR * NT];
  for (int i = 0; i < MR * NT; ++i) a0[i] = a1[i] = vzero();
  const float* x = P.x + m0 * K;
  for (int64_t k0 = g * G; k0 < (g + 1) * G; k0 += 8)
    for (int j = 0; j < NT; ++j)
      decode8<F>(P, t0 + j, k0, [&](int i, Vec w0, Vec w1) {
        for (int r = 0; r < MR; ++r) {
          const Vec xk = vbroadcast(x + r * K + k0 + i);
          a0[r * NT + j] = vfma(xk, w0, a0[r * NT + j]);
          a1[r * NT + j] = vfma(xk, w1, a1[r * NT + j]);
        }
      });
  Vec a[MR][NT][2];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NT; ++j) a[r][j][0] = a0[r * NT + j], a[r][j][1] = a1[r * NT + j];
  col_fold<F, MR, NT>(P, m0, t0, g, a);
}

// The same from a tile's decoded panel (`panel`: the group's codes as floats, [G, 16]).
template <int F, int MR>
EMBER_INLINE void col_panel_group(const ColProblem& P, int64_t m0, int64_t t, int64_t g,
                                  const float* panel) {
  const int64_t K = P.K, G = P.G;
  Vec a0[MR], a1[MR];
  for (int r = 0; r < MR; ++r) a0[r] = a1[r] = vzero();
  const float* x = P.x + m0 * K + g * G;
  for (int64_t k = 0; k < G; ++k) {
    const Vec w0 = vload(panel + k * kColTile), w1 = vload(panel + k * kColTile + 8);
    for (int r = 0; r < MR; ++r) {
      const Vec xk = vbroadcast(x + r * K + k);
      a0[r] = vfma(xk, w0, a0[r]);
      a1[r] = vfma(xk, w1, a1[r]);
    }
  }
  Vec a[MR][1][2];
  for (int r = 0; r < MR; ++r) a[r][0][0] = a0[r], a[r][0][1] = a1[r];
  col_fold<F, MR, 1>(P, m0, t, g, a);
}

// Few rows: tiles NT at a time, every group.
template <int F, int MR, int NT>
void col_tiles(const ColProblem& P, int64_t t0, int64_t t1) {
  const int64_t groups = P.K / P.G;
  int64_t t = t0;
  for (; t + NT <= t1; t += NT)
    for (int64_t g = 0; g < groups; ++g) col_group<F, MR, NT>(P, 0, t, g);
  for (; t < t1; ++t)
    for (int64_t g = 0; g < groups; ++g) col_group<F, MR, 1>(P, 0, t, g);
}

// Many rows: each tile's codes decoded once into a float panel [K, 16] (in L2), then row
// blocks of 6 read it, group by group.
constexpr int64_t kPanelMinRows = 7;

template <int F, int MR>
void col_panel_block(const ColProblem& P, int64_t m0, int64_t t, const float* panel) {
  for (int64_t g = 0; g < P.K / P.G; ++g)
    col_panel_group<F, MR>(P, m0, t, g, panel + g * P.G * kColTile);
}

template <int F>
void col_panel_rows(const ColProblem& P, int64_t t0, int64_t t1) {
  const int64_t K = P.K;
  std::vector<float> decoded(F == kF32 ? 0 : K * kColTile);
  for (int64_t t = t0; t < t1; ++t) {
    const float* panel = decoded.data();
    if constexpr (F == kF32) {  // the tile is its own panel
      panel = static_cast<const float*>(P.codes) + t * K * kColTile;
    } else {
      for (int64_t k0 = 0; k0 < K; k0 += 8)
        decode8<F>(P, t, k0, [&](int i, Vec w0, Vec w1) {
          vstore(decoded.data() + (k0 + i) * kColTile, w0);
          vstore(decoded.data() + (k0 + i) * kColTile + 8, w1);
        });
    }
    int64_t m = 0;
    for (; m + 6 <= P.M; m += 6) col_panel_block<F, 6>(P, m, t, panel);
    switch (P.M - m) {
      case 5: col_panel_block<F, 5>(P, m, t, panel); break;
      case 4: col_panel_block<F, 4>(P, m, t, panel); break;
      case 3: col_panel_block<F, 3>(P, m, t, panel); break;
      case 2: col_panel_block<F, 2>(P, m, t, panel); break;
      case 1: col_panel_block<F, 1>(P, m, t, panel); break;
      default: break;
    }
  }
}

template <int F>
void col_matmul(const ColProblem& P) {
  const int64_t tiles = P.N / kColTile;
  if (P.M >= kPanelMinRows) {
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) { col_panel_rows<F>(P, t0, t1); });
    return;
  }
  at::parallel_for(0, tiles, 4, [&](int64_t t0, int64_t t1) {
    switch (P.M) {
      case 1: col_tiles<F, 1, 4>(P, t0, t1); break;
      case 2: col_tiles<F, 2, 2>(P, t0, t1); break;
      case 3: col_tiles<F, 3, 2>(P, t0, t1); break;
      case 4: col_tiles<F, 4, 1>(P, t0, t1); break;
      case 5: col_tiles<F, 5, 1>(P, t0, t1); break;
      default: col_tiles<F, 6, 1>(P, t0, t1); break;
    }
  });
}

// x as float32 [M, K], contiguous (a view where it already is).
at::Tensor float_rows(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x: float32 or bfloat16 [M, K] with K the weight's inputs");
  return x.to(at::kFloat).contiguous();
}

}  // namespace

at::Tensor int4_linear(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& scales,
                       const at::Tensor& offsets, int64_t G) {
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == at::kInt && codes.is_contiguous() &&
                  codes.size(2) == kColTile && G % 8 == 0 && G > 0,
              "codes: the column tiles [N / 16, K / 8, 16] (int32) of an [N, K] weight");
  const int64_t K = codes.size(1) * 8, N = codes.size(0) * kColTile;
  TORCH_CHECK(K % G == 0, "K a multiple of the group size");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && offsets.scalar_type() == at::kFloat &&
                  scales.is_contiguous() && offsets.is_contiguous() &&
                  scales.numel() == N * (K / G) && offsets.numel() == N * (K / G),
              "scales, offsets: contiguous float32 [N / 16, K / G, 16]");
  const at::Tensor x = float_rows(x_in, K);
  const int64_t M = x.size(0);
  std::vector<float> xs(M * (K / G));
  group_sums(x.data_ptr<float>(), M, K, G, xs.data());
  auto y = at::empty({M, N}, x.options());
  if (M > 0)
    col_matmul<kInt4>({x.data_ptr<float>(), xs.data(), codes.data_ptr<int32_t>(),
                       scales.data_ptr<float>(), offsets.data_ptr<float>(), y.data_ptr<float>(),
                       M, K, N, G});
  return x_in.scalar_type() == at::kFloat ? y : y.to(x_in.scalar_type());
}

at::Tensor int8_linear(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& scales) {
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == at::kChar && codes.is_contiguous() &&
                  codes.size(2) == kColTile && codes.size(1) % 8 == 0,
              "codes: the column tiles [N / 16, K, 16] (int8) of an [N, K] weight, K a "
              "multiple of 8");
  const int64_t K = codes.size(1), N = codes.size(0) * kColTile;
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.dim() == 3 &&
                  scales.size(0) * kColTile == N && scales.size(2) == kColTile &&
                  scales.size(1) > 0 && K % scales.size(1) == 0 && (K / scales.size(1)) % 8 == 0,
              "scales: contiguous float32 [N / 16, K / G, 16], G (the group size) a multiple "
              "of 8");
  const int64_t G = K / scales.size(1);
  const at::Tensor x = float_rows(x_in, K);
  const int64_t M = x.size(0);
  auto y = at::empty({M, N}, x.options());
  if (M > 0)
    col_matmul<kInt8>({x.data_ptr<float>(), nullptr, codes.data_ptr<int8_t>(),
                       scales.data_ptr<float>(), nullptr, y.data_ptr<float>(), M, K, N, G});
  return y;
}

at::Tensor dense_linear(const at::Tensor& x_in, const at::Tensor& tiles) {
  TORCH_CHECK(tiles.dim() == 3 && tiles.is_contiguous() && tiles.size(2) == kColTile &&
                  tiles.size(1) % 8 == 0 &&
                  (tiles.scalar_type() == at::kFloat || tiles.scalar_type() == at::kBFloat16),
              "tiles: the column tiles [N / 16, K, 16] (float32 or bfloat16) of an [N, K] "
              "weight, K a multiple of 8");
  const int64_t K = tiles.size(1), N = tiles.size(0) * kColTile;
  const at::Tensor x = float_rows(x_in, K);
  const int64_t M = x.size(0);
  auto y = at::empty({M, N}, x.options());
  if (M > 0) {
    const ColProblem P{x.data_ptr<float>(), nullptr, tiles.data_ptr(), nullptr, nullptr,
                       y.data_ptr<float>(), M, K, N, K};
    if (tiles.scalar_type() == at::kFloat)
      col_matmul<kF32>(P);
    else
      col_matmul<kBF16>(P);
  }
  return x_in.scalar_type() == at::kFloat ? y : y.to(x_in.scalar_type());
}

}  // namespace ember

TORCH_LIBRARY_FRAGMENT(ember_cpu, m) {
  m.def("int4_linear(Tensor x, Tensor codes, Tensor scales, Tensor offsets, int group_size) "
        "-> Tensor");
  m.def("int8_linear(Tensor x, Tensor codes, Tensor scales) -> Tensor");
  m.def("dense_linear(Tensor x, Tensor tiles) -> Tensor");
}

TORCH_LIBRARY_IMPL(ember_cpu, CPU, m) {
  m.impl("int4_linear", ember::int4_linear);
  m.impl("int8_linear", ember::int8_linear);
  m.impl("dense_linear", ember::dense_linear);
}
