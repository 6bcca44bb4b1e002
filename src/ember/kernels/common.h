// What ember's CPU kernel sources share: float conversions and the ops one calls from another.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace ember {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
template <typename T> inline T from_float(float x) { return static_cast<T>(x); }

// Software prefetch distance in the GEMVs that stream weights (the int4 and K-quant tiles): the
// hardware prefetchers stop at every 4 KiB page and ramp up again, which costs little while the
// weights sit in the (shared) L3 but much when other processes have evicted them and every
// step streams from DRAM (docs/benchmarks.md).
constexpr int64_t kPrefetchBytes = 2048;

// e^x for x <= 0 (softmax's shifted scores) without a libm call, so the loop vectorizes:
// 2^(x log2 e) = 2^i * 2^f, 2^f by a degree-5 minimax polynomial (relative error < 1e-7).
inline float exp_nonpositive(float x) {
  const float t = std::max(x, -87.f) * 1.4426950409f;
  const float i = std::floor(t), f = t - i;
  float p = 1.8775767e-3f;
  p = p * f + 8.9893397e-3f;
  p = p * f + 5.5826318e-2f;
  p = p * f + 2.4015361e-1f;
  p = p * f + 6.9315308e-1f;
  p = p * f + 9.9999994e-1f;
  const int32_t bits = (static_cast<int32_t>(i) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// SiLU's sigmoid through exp_nonpositive (vectorizable): e^-|x| stays in (0, 1].
inline float sigmoid(float x) {
  const float e = exp_nonpositive(-std::fabs(x));
  return (x >= 0.f ? 1.f : e) / (1.f + e);
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& block_tables,
                           const at::Tensor& query_start, const at::Tensor& seq_lens,
                           int64_t block_size, double scale, int64_t window);
// Per row of x [M, K] and group of G inputs, the sum of x over the group, in a fixed order
// (matmul.cpp): the int4 kernels' offset terms.
void group_sums(const float* x, int64_t M, int64_t K, int64_t G, float* xs);
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                       const at::Tensor& offsets, int64_t group_size);
// x [M, K] @ w.T for a dense float32 w [N, K] (matmul.cpp): up to kDenseLinearMaxRows rows
// (decode steps, verify rows; K a multiple of 8), each row as a one-row call computes it;
// more (prompt chunks), ATen's GEMM, faster there.
at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& w);
constexpr int64_t kDenseLinearMaxRows = 16;
at::Tensor int4_tiled_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                             const at::Tensor& zeros, int64_t group_size);
at::Tensor kquant_linear(const at::Tensor& x, at::TensorList tiles, at::IntArrayRef kinds,
                         int64_t k, bool float_out);
// Rows `ids` [T] of a K-quant weight's tiles (see kquant.cpp) into out [T, k] float32.
void kquant_rows_into(const at::Tensor& tiles, const int64_t* ids, int64_t T, int64_t kind,
                      int64_t k, float* out);
// The inputs per block of a K-quant kind (its tiles hold K / block blocks a row).
int64_t kquant_block(int64_t kind);

}  // namespace ember
