// paged_attention: the query rows of a step (prompt chunks, decodes, speculative verify rows)
// against their sequences' paged KV caches, read in place through the block tables (no gather,
// no mask), the query heads of one KV head together (GQA: each key is loaded once for the
// group), softmax in float32. Sequence i's query rows are q[query_start[i] : query_start[i+1]],
// at the last positions of its seq_lens[i] keys (written to the cache before the call): the
// query at position p sees keys 0..p, or on a sliding-window layer (window > 0) its last
// `window` of them.
//
// Each query row's result is a function of that row alone, bitwise: the same whether it comes
// in a prompt chunk of 1 or 600 tokens, a decode step or a verify chunk, whatever else is in
// the batch and however many threads run. So that chunked prefill, prefix caching and batching
// change no token:
// - keys are split into chunks at fixed absolute positions (multiples of kChunk); a row's
//   partial softmax over its keys of one chunk is computed by one function (attend_chunk),
//   whose per-row arithmetic does not depend on the other rows it runs with (rows and keys are
//   blocked for register reuse, but each score is its own chain of FMAs over the head
//   dimension and one fixed summation tree, each output element its own chain of FMAs over the
//   keys in order; a key outside a row's range gets weight 0, which adds exactly nothing);
// - the chunks' partials are merged in chunk order by one function (merge_row);
// - every accumulation is an FMA intrinsic or a fixed tree of horizontal adds: the build's
//   -fassociative-math cannot reorder them (it may rewrite plain `+` chains, and the
//   vectorizer may split a loop's reduction by its trip count or alignment); attend_chunk and
//   merge_row are `noipa` so that no caller gets its own specialised copy of them.
// Long contexts with few query rows (decodes, verify chunks) are split into one task per key
// chunk (flash-decoding: their few KV heads still keep every thread busy), longer spans into
// blocks of kBlockRows rows; tasks are taken from a shared counter, which sets only who computes
// a partial, not its bits.
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#include "common.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

namespace ember {
namespace {

// Keys per chunk: chunk c holds key positions [c * kChunk, (c + 1) * kChunk).
constexpr int64_t kChunk = 128;
// Query rows of one sequence attended together (each key loaded once for them).
constexpr int64_t kBlockRows = 16;
constexpr int64_t kMaxGroup = 16;  // query heads per KV head
constexpr int64_t kMaxDim = 256;
constexpr int64_t kRowStride = kChunk + 8;  // a row's scores: a chunk, + room for whole vectors

// ---- 8 floats: AVX2 + FMA, else the same arithmetic lane by lane ----------------------------
#if defined(__AVX2__) && defined(__FMA__)
using V = __m256;
inline V vzero() { return _mm256_setzero_ps(); }
inline V vset(float x) { return _mm256_set1_ps(x); }
inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, V x) { _mm256_storeu_ps(p, x); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V vdiv(V a, V b) { return _mm256_div_ps(a, b); }
// 8 bfloat16 as float32 (exact).
inline V vload(const c10::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
// The sums of 4 vectors' lanes, each by the tree ((x0+x1)+(x2+x3))+((x4+x5)+(x6+x7)).
inline void vsum4(V a, V b, V c, V d, float* out) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
}
// x where lane base + i is in [lo, hi), else 0.
inline V vkeep(V x, int64_t base, int64_t lo, int64_t hi) {
  const __m256i i = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                     _mm256_set1_epi32(static_cast<int32_t>(base)));
  const __m256i in = _mm256_and_si256(
      _mm256_cmpgt_epi32(i, _mm256_set1_epi32(static_cast<int32_t>(lo - 1))),
      _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(hi)), i));
  return _mm256_and_ps(x, _mm256_castsi256_ps(in));
}
// e^(x - m) for x <= m: exp_nonpositive (common.h), lane by lane, with explicit FMAs.
inline V vexp_shifted(V x, V m) {
  const V t = _mm256_mul_ps(_mm256_max_ps(_mm256_sub_ps(x, m), vset(-87.f)), vset(1.4426950409f));
  const V i = _mm256_floor_ps(t), f = _mm256_sub_ps(t, i);
  V p = vset(1.8775767e-3f);
  p = vfma(p, f, vset(8.9893397e-3f));
  p = vfma(p, f, vset(5.5826318e-2f));
  p = vfma(p, f, vset(2.4015361e-1f));
  p = vfma(p, f, vset(6.9315308e-1f));
  p = vfma(p, f, vset(9.9999994e-1f));
  const __m256i bits =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(i), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
#else
struct V {
  float x[8];
};
inline V vzero() { return V{}; }
inline V vset(float a) {
  V r;
  for (int i = 0; i < 8; ++i) r.x[i] = a;
  return r;
}
template <typename T>
inline V vload(const T* p) {
  V r;
  for (int i = 0; i < 8; ++i) r.x[i] = to_float(p[i]);
  return r;
}
inline void vstore(float* p, V a) {
  for (int i = 0; i < 8; ++i) p[i] = a.x[i];
}
inline V vfma(V a, V b, V c) {
  V r;
  for (int i = 0; i < 8; ++i) r.x[i] = std::fma(a.x[i], b.x[i], c.x[i]);
  return r;
}
inline V vdiv(V a, V b) {
  V r;
  for (int i = 0; i < 8; ++i) r.x[i] = a.x[i] / b.x[i];
  return r;
}
inline float tree8(const V& a) {
  return ((a.x[0] + a.x[1]) + (a.x[2] + a.x[3])) + ((a.x[4] + a.x[5]) + (a.x[6] + a.x[7]));
}
inline void vsum4(V a, V b, V c, V d, float* out) {
  out[0] = tree8(a), out[1] = tree8(b), out[2] = tree8(c), out[3] = tree8(d);
}
inline V vkeep(V a, int64_t base, int64_t lo, int64_t hi) {
  for (int i = 0; i < 8; ++i)
    if (base + i < lo || base + i >= hi) a.x[i] = 0.f;
  return a;
}
inline V vexp_shifted(V a, V m) {
  V r;
  for (int i = 0; i < 8; ++i) r.x[i] = exp_nonpositive(a.x[i] - m.x[i]);
  return r;
}
#endif

// Keys ahead to prefetch: nearer arrives late at long contexts, further gains little
// (docs/benchmarks.md).
constexpr int64_t kAhead = 16;
inline void prefetch_row(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, 3);
}

inline int64_t first_key(int64_t pos, int64_t window) {
  return window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
}

// What every task of one call shares.
struct Problem {
  int64_t heads, kv_heads, group, dim, nv;  // nv: dim / 8
  int64_t q_stride0, q_stride1, slot_stride, block_size, window;
  float scale;
  int64_t part_stride;  // floats of one (row, head)'s partial: m, l, acc[dim]
};

// A partial over one chunk of keys, per (row, query head of the group): the max m of the
// scores, the sum l of e^(score - m), acc = sum of e^(score - m) * value (not yet divided by l).
// Rows [0, rows) of a block at positions pos0.., their scaled queries qf [rows, group, dim];
// their keys of chunk c (the caller passes the rows that have any there). Writes
// part[(r * group + g) * part_stride + {0: m, 1: l, 2..: acc}].
template <typename KT>
__attribute__((noipa)) void attend_chunk(const Problem& P, const KT* kc, const KT* vc,
                                         const int64_t* table, int64_t pos0, int64_t rows,
                                         int64_t c, const float* qf, float* scores,
                                         int64_t* offsets, float* part) {
  const int64_t G = P.group, dim = P.dim, nv = P.nv, nrg = rows * G;
  const int64_t base = c * kChunk;
  // The block's keys here: from the first row's first key to the last row's position.
  const int64_t k0 = std::max(base, first_key(pos0, P.window));
  const int64_t k1 = std::min(base + kChunk, pos0 + rows);
  for (int64_t j = k0; j < k1; ++j) {
    const int64_t blk = j / P.block_size;
    offsets[j - base] = (table[blk] * P.block_size + j % P.block_size) * P.slot_stride;
    if (j < k0 + kAhead) prefetch_row(kc + offsets[j - base], dim * sizeof(KT));
  }
  // Scores: 4 keys x 2 (row, head)s at a time; past the end, the last key and (row, head)
  // again (computed, not stored).
  for (int64_t j = k0; j < k1; j += 4) {
    const KT* kr[4];
    for (int u = 0; u < 4; ++u) kr[u] = kc + offsets[std::min(j + u, k1 - 1) - base];
    // A decode reads the cache from memory (the weights streamed since evicted it), a key's
    // row at a time, a head's rows apart: too sparse for the hardware prefetchers. Ask for the
    // keys kAhead on, and for these keys' values (read after the chunk's scores).
    for (int64_t u = j + kAhead; u < std::min(j + kAhead + 4, k1); ++u)
      prefetch_row(kc + offsets[u - base], dim * sizeof(KT));
    for (int64_t u = j; u < std::min(j + 4, k1); ++u)
      prefetch_row(vc + offsets[u - base], dim * sizeof(KT));
    for (int64_t rg = 0; rg < nrg; rg += 2) {
      const float* qa = qf + rg * dim;
      const float* qb = qf + std::min(rg + 1, nrg - 1) * dim;
      V a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
      V b0 = vzero(), b1 = vzero(), b2 = vzero(), b3 = vzero();
      for (int64_t i = 0; i < nv; ++i) {
        const V x = vload(qa + 8 * i), y = vload(qb + 8 * i);
        const V k_0 = vload(kr[0] + 8 * i), k_1 = vload(kr[1] + 8 * i);
        const V k_2 = vload(kr[2] + 8 * i), k_3 = vload(kr[3] + 8 * i);
        a0 = vfma(x, k_0, a0), a1 = vfma(x, k_1, a1), a2 = vfma(x, k_2, a2);
        a3 = vfma(x, k_3, a3);
        b0 = vfma(y, k_0, b0), b1 = vfma(y, k_1, b1), b2 = vfma(y, k_2, b2);
        b3 = vfma(y, k_3, b3);
      }
      // The rows' score buffers have room for 4 past the chunk's end.
      vsum4(a0, a1, a2, a3, scores + rg * kRowStride + (j - base));
      if (rg + 1 < nrg) vsum4(b0, b1, b2, b3, scores + (rg + 1) * kRowStride + (j - base));
    }
  }
  // Softmax pieces: each row over its own keys [lo, hi) of the chunk (relative to `base`);
  // its other keys of the block's range get weight 0. Vectors are aligned to the chunk, so a
  // row's lanes (and its sum's tree) are the same in any block.
  const int64_t v0 = (k0 - base) & ~int64_t{7}, v1 = k1 - base;
  const V one = vset(1.f);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t pos = pos0 + r;
    const int64_t lo = std::max(base, first_key(pos, P.window)) - base;
    const int64_t hi = std::min(base + kChunk, pos + 1) - base;
    for (int64_t g = 0; g < G; ++g) {
      float* s = scores + (r * G + g) * kRowStride;
      float* out = part + (r * G + g) * P.part_stride;
      float m = s[lo];
      for (int64_t j = lo + 1; j < hi; ++j) m = std::max(m, s[j]);
      const V mv = vset(m);
      V sum = vzero();
      for (int64_t i = v0; i < v1; i += 8) {
        const V e = vkeep(vexp_shifted(vload(s + i), mv), i, lo, hi);
        vstore(s + i, e);
        if (i + 8 > lo && i < hi) sum = vfma(e, one, sum);
      }
      float l[4];
      vsum4(sum, sum, sum, sum, l);
      out[0] = m;
      out[1] = l[0];
    }
  }
  // acc = sum over keys, in order, of weight * value: (row, head) pairs x 4 vectors of the
  // head dimension in registers; each element's chain of FMAs is the same however blocked.
  for (int64_t rg = 0; rg < nrg; rg += 2) {
    const float* ea = scores + rg * kRowStride - base;
    const float* eb = scores + std::min(rg + 1, nrg - 1) * kRowStride - base;
    float* oa = part + rg * P.part_stride + 2;
    float* ob = part + std::min(rg + 1, nrg - 1) * P.part_stride + 2;
    int64_t i = 0;
    for (; i + 4 <= nv; i += 4) {
      V a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
      V b0 = vzero(), b1 = vzero(), b2 = vzero(), b3 = vzero();
      for (int64_t j = k0; j < k1; ++j) {
        const KT* vr = vc + offsets[j - base] + 8 * i;
        const V x = vset(ea[j]), y = vset(eb[j]);
        const V v_0 = vload(vr), v_1 = vload(vr + 8), v_2 = vload(vr + 16), v_3 = vload(vr + 24);
        a0 = vfma(x, v_0, a0), a1 = vfma(x, v_1, a1), a2 = vfma(x, v_2, a2);
        a3 = vfma(x, v_3, a3);
        b0 = vfma(y, v_0, b0), b1 = vfma(y, v_1, b1), b2 = vfma(y, v_2, b2);
        b3 = vfma(y, v_3, b3);
      }
      vstore(oa + 8 * i, a0), vstore(oa + 8 * i + 8, a1), vstore(oa + 8 * i + 16, a2);
      vstore(oa + 8 * i + 24, a3);
      vstore(ob + 8 * i, b0), vstore(ob + 8 * i + 8, b1), vstore(ob + 8 * i + 16, b2);
      vstore(ob + 8 * i + 24, b3);
    }
    for (; i < nv; ++i) {
      V a = vzero(), b = vzero();
      for (int64_t j = k0; j < k1; ++j) {
        const V v = vload(vc + offsets[j - base] + 8 * i);
        a = vfma(vset(ea[j]), v, a), b = vfma(vset(eb[j]), v, b);
      }
      vstore(oa + 8 * i, a), vstore(ob + 8 * i, b);
    }
  }
}

// One (row, query head)'s output from its chunks' partials (`count` of them, `stride` floats
// apart, in chunk order): rescaled to the common max, summed in chunk order, divided by the sum.
template <typename QT>
__attribute__((noipa)) void merge_row(const Problem& P, const float* first, int64_t count,
                                      int64_t stride, QT* dst) {
  float m = first[0];
  for (int64_t c = 1; c < count; ++c) m = std::max(m, first[c * stride]);
  float l = 0.f;
  V o[kMaxDim / 8];
  for (int64_t i = 0; i < P.nv; ++i) o[i] = vzero();
  for (int64_t c = 0; c < count; ++c) {
    const float* pt = first + c * stride;
    const float w = pt[0] == m ? 1.f : exp_nonpositive(pt[0] - m);
    l = std::fma(pt[1], w, l);
    const V wv = vset(w);
    for (int64_t i = 0; i < P.nv; ++i) o[i] = vfma(wv, vload(pt + 2 + 8 * i), o[i]);
  }
  const V lv = vset(l);
  float row[8];
  for (int64_t i = 0; i < P.nv; ++i) {
    vstore(row, vdiv(o[i], lv));
    for (int d = 0; d < 8; ++d) dst[8 * i + d] = from_float<QT>(row[d]);
  }
}

// One sequence of the batch.
struct Seq {
  int64_t row0, rows, pos0;  // its query rows [row0, row0 + rows) at positions pos0..
  const int64_t* table;
  int64_t c0, c1;            // the chunks its rows read: [c0, c1]
  bool split;                // one task per chunk (few rows), partials in `shared`
  int64_t shared;            // there, from this float on: [chunk][kv head][row][head]
};

// A task: (sequence, KV head, block of rows) over all their chunks (chunk < 0), or over one.
struct Task {
  int64_t seq, head, block, chunk, cost;
};

template <typename QT, typename KT>
void run(const Problem& P, const QT* q, const KT* kp, const KT* vp, std::vector<Seq>& seqs,
         QT* out) {
  const int64_t G = P.group, PS = P.part_stride;
  const int64_t per_block = kBlockRows * G * PS;  // floats of a block's partials per chunk
  std::vector<Task> tasks;
  int64_t shared_floats = 0, work = 0;
  for (int64_t s = 0; s < static_cast<int64_t>(seqs.size()); ++s) {
    Seq& sq = seqs[s];
    if (sq.rows == 0) continue;
    const int64_t last = sq.pos0 + sq.rows - 1;
    sq.c0 = first_key(sq.pos0, P.window) / kChunk, sq.c1 = last / kChunk;
    sq.split = sq.rows <= kBlockRows && sq.c1 > sq.c0;
    const int64_t blocks = (sq.rows + kBlockRows - 1) / kBlockRows;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t rows = std::min(kBlockRows, sq.rows - b * kBlockRows);
      const int64_t keys = sq.pos0 + b * kBlockRows + rows - first_key(sq.pos0 + b * kBlockRows,
                                                                       P.window);
      for (int64_t h = 0; h < P.kv_heads; ++h) {
        if (!sq.split) {
          tasks.push_back({s, h, b, -1, rows * keys});
          continue;
        }
        for (int64_t c = sq.c0; c <= sq.c1; ++c)
          tasks.push_back({s, h, b, c, rows * std::min(keys, kChunk)});
      }
      work += rows * keys * P.kv_heads;
    }
    if (sq.split) {
      sq.shared = shared_floats;
      shared_floats += (sq.c1 - sq.c0 + 1) * P.kv_heads * sq.rows * G * PS;
    }
  }
  // The longest tasks first, so that the last ones taken are short.
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& a, const Task& b) { return a.cost > b.cost; });
  std::vector<float> shared(shared_floats);

  // The queries of a block, scaled, as float32 [rows, group, dim].
  auto load_queries = [&](const Seq& sq, int64_t h, int64_t r0, int64_t rows, float* qf) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t g = 0; g < G; ++g) {
        const QT* src = q + (sq.row0 + r0 + r) * P.q_stride0 + (h * G + g) * P.q_stride1;
        float* dst = qf + (r * G + g) * P.dim;
        for (int64_t d = 0; d < P.dim; ++d) dst[d] = to_float(src[d]) * P.scale;
      }
  };
  // The rows of [r0, r0 + rows) that read chunk c: [first, end).
  auto rows_in_chunk = [&](const Seq& sq, int64_t r0, int64_t rows, int64_t c, int64_t& first,
                           int64_t& end) {
    first = r0, end = r0 + rows;
    while (first < end && sq.pos0 + first < c * kChunk) ++first;
    while (end > first && first_key(sq.pos0 + end - 1, P.window) >= (c + 1) * kChunk) --end;
  };
  auto out_row = [&](const Seq& sq, int64_t r, int64_t h, int64_t g) {
    return out + ((sq.row0 + r) * P.heads + h * G + g) * P.dim;
  };
  // The chunks row r reads: [c_lo, c_hi].
  auto row_chunks = [&](const Seq& sq, int64_t r, int64_t& c_lo, int64_t& c_hi) {
    c_lo = first_key(sq.pos0 + r, P.window) / kChunk, c_hi = (sq.pos0 + r) / kChunk;
  };

  auto worker = [&](std::atomic<int64_t>& next) {
    std::vector<float> qf(kBlockRows * G * P.dim), scores(kBlockRows * G * kRowStride);
    std::vector<int64_t> offsets(kChunk);
    std::vector<float> local;
    for (int64_t t; (t = next.fetch_add(1)) < static_cast<int64_t>(tasks.size());) {
      const Task& task = tasks[t];
      const Seq& sq = seqs[task.seq];
      const int64_t h = task.head, r0 = task.block * kBlockRows;
      const int64_t rows = std::min(kBlockRows, sq.rows - r0);
      const KT* kc = kp + h * P.dim;
      const KT* vc = vp + h * P.dim;
      load_queries(sq, h, r0, rows, qf.data());
      auto attend = [&](int64_t c, float* part) {  // part: [rows, group] partials of chunk c
        int64_t first, end;
        rows_in_chunk(sq, r0, rows, c, first, end);
        if (first < end)
          attend_chunk<KT>(P, kc, vc, sq.table, sq.pos0 + first, end - first, c,
                           qf.data() + (first - r0) * G * P.dim, scores.data(), offsets.data(),
                           part + (first - r0) * G * PS);
      };
      if (task.chunk >= 0) {  // one chunk of a split sequence: into `shared`
        attend(task.chunk, shared.data() + sq.shared +
                               ((task.chunk - sq.c0) * P.kv_heads + h) * sq.rows * G * PS);
        continue;
      }
      // Every chunk of the block, then each row's merge.
      int64_t c_lo, c_hi, unused;
      row_chunks(sq, r0, c_lo, unused);
      row_chunks(sq, r0 + rows - 1, unused, c_hi);
      local.resize((c_hi - c_lo + 1) * per_block);
      for (int64_t c = c_lo; c <= c_hi; ++c) attend(c, local.data() + (c - c_lo) * per_block);
      for (int64_t r = r0; r < r0 + rows; ++r) {
        int64_t a, b;
        row_chunks(sq, r, a, b);
        for (int64_t g = 0; g < G; ++g)
          merge_row<QT>(P, local.data() + (a - c_lo) * per_block + ((r - r0) * G + g) * PS,
                        b - a + 1, per_block, out_row(sq, r, h, g));
      }
    }
  };
  // Threads pay off only for enough work; the tasks' results do not depend on who runs them.
  const int64_t threads = work * G < 4096 ? 1 : std::min<int64_t>(at::get_num_threads(),
                                                                  tasks.size());
  std::atomic<int64_t> next{0};
  if (threads <= 1) worker(next);
  else at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { worker(next); });

  // The split sequences' merges.
  std::vector<std::pair<int64_t, int64_t>> merges;  // (sequence, KV head)
  int64_t merge_work = 0;                           // floats read
  for (int64_t s = 0; s < static_cast<int64_t>(seqs.size()); ++s)
    if (seqs[s].rows > 0 && seqs[s].split) {
      for (int64_t h = 0; h < P.kv_heads; ++h) merges.emplace_back(s, h);
      merge_work += (seqs[s].c1 - seqs[s].c0 + 1) * P.kv_heads * seqs[s].rows * G * PS;
    }
  auto merge = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const auto [s, h] = merges[i];
      const Seq& sq = seqs[s];
      const int64_t stride = P.kv_heads * sq.rows * G * PS;  // one chunk to the next
      for (int64_t r = 0; r < sq.rows; ++r) {
        int64_t a, b;
        row_chunks(sq, r, a, b);
        for (int64_t g = 0; g < G; ++g)
          merge_row<QT>(P, shared.data() + sq.shared + (a - sq.c0) * stride +
                               ((h * sq.rows + r) * G + g) * PS,
                        b - a + 1, stride, out_row(sq, r, h, g));
      }
    }
  };
  // A second fork/join only for a big merge: a decode step's few chunks merge in
  // microseconds, and on a busy machine every parallel region waits for its slowest thread.
  const bool parallel_merge = threads > 1 && merge_work > (int64_t{1} << 20);
  at::parallel_for(0, merges.size(), parallel_merge ? 1 : merges.size() + 1, merge);
}

}  // namespace

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& block_tables,
                           const at::Tensor& query_start, const at::Tensor& seq_lens,
                           int64_t block_size, double scale, int64_t window) {
  TORCH_CHECK(window >= 0, "window: >= 0 (0: no sliding window)");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q: [T, H, D] with contiguous rows");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes() &&
                  k_cache.scalar_type() == v_cache.scalar_type(),
              "caches: two contiguous [slots, Hkv, D] tensors of one dtype");
  const int64_t T = q.size(0), heads = q.size(1), dim = q.size(2), kv_heads = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == dim && dim % 8 == 0 && dim <= kMaxDim &&
                  heads % kv_heads == 0 && heads / kv_heads <= kMaxGroup,
              "head size a multiple of 8 up to 256; up to 16 query heads per KV head");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && query_start.scalar_type() == at::kLong &&
                  seq_lens.scalar_type() == at::kLong && block_tables.dim() == 2 &&
                  block_tables.is_contiguous() && query_start.is_contiguous() &&
                  seq_lens.is_contiguous() && query_start.numel() == seq_lens.numel() + 1 &&
                  block_tables.size(0) == seq_lens.numel(),
              "block_tables [S, W], query_start [S + 1], seq_lens [S]: contiguous int64");
  TORCH_CHECK(block_size > 0, "block_size must be > 0");
  const auto qt = q.scalar_type(), ct = k_cache.scalar_type();
  TORCH_CHECK((qt == at::kFloat || qt == at::kBFloat16) && (ct == at::kFloat || ct == at::kBFloat16),
              "float32 or bfloat16 only");
  // The table walk trusts every entry it reads: refuse a batch that points outside the cache.
  const int64_t S = seq_lens.numel(), width = block_tables.size(1);
  const int64_t num_blocks = k_cache.size(0) / block_size;
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* starts = query_start.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  TORCH_CHECK(starts[0] == 0 && starts[S] == T, "query_start: from 0 to the ", T, " rows of q");
  std::vector<Seq> seqs(S);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t rows = starts[s + 1] - starts[s];
    TORCH_CHECK(rows >= 0, "query_start: not increasing at sequence ", s);
    TORCH_CHECK(lens[s] >= rows && lens[s] <= width * block_size, "context length ", lens[s],
                " of sequence ", s, " is beyond its block table or short of its ", rows,
                " query rows");
    for (int64_t i = 0; i < (lens[s] + block_size - 1) / block_size; ++i)
      TORCH_CHECK(tables[s * width + i] >= 0 && tables[s * width + i] < num_blocks, "block id ",
                  tables[s * width + i], " of sequence ", s, " is outside the cache");
    seqs[s] = Seq{starts[s], rows, lens[s] - rows, tables + s * width, 0, 0, false, 0};
  }
  auto out = at::empty({T, heads, dim}, q.options());
  const Problem P{heads, kv_heads, heads / kv_heads, dim, dim / 8, q.stride(0), q.stride(1),
                  k_cache.stride(0), block_size, window, static_cast<float>(scale),
                  dim + 2};
  auto with_cache = [&](auto q_tag) {
    using QT = decltype(q_tag);
    const QT* qp = q.data_ptr<QT>();
    QT* op = out.data_ptr<QT>();
    if (ct == at::kBFloat16)
      run<QT, c10::BFloat16>(P, qp, k_cache.data_ptr<c10::BFloat16>(),
                             v_cache.data_ptr<c10::BFloat16>(), seqs, op);
    else
      run<QT, float>(P, qp, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), seqs, op);
  };
  if (qt == at::kBFloat16) with_cache(c10::BFloat16{});
  else with_cache(float{});
  return out;
}

}  // namespace ember

TORCH_LIBRARY_FRAGMENT(ember_cpu, m) {
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor query_start, Tensor seq_lens, int block_size, float scale, int window=0) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(ember_cpu, CPU, m) { m.impl("paged_attention", ember::paged_attention); }
