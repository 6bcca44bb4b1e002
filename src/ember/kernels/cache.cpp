// write_kv: the step's new keys and values into their cache slots (each slot checked against
// the cache's size first: the slots come from Python).
#include "common.h"

#include <torch/library.h>

#include <cstdint>

namespace ember {
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

}  // namespace ember

TORCH_LIBRARY_FRAGMENT(ember_cpu, m) {
  m.def("write_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots) -> ()");
}

TORCH_LIBRARY_IMPL(ember_cpu, CPU, m) { m.impl("write_kv", ember::write_kv); }
