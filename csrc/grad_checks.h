// The rules every fused op applies to its list of grads, in one place for the
// CPU operator, the CUDA glue and the eager entry (py_module.cpp), so that all
// backends accept the same grads and reject the rest with the same message.
// fastclip/clip.py's _FUSED_DTYPES is the Python twin of is_fused_dtype.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fastclip {

inline bool is_fused_dtype(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kDouble || t == c10::kHalf || t == c10::kBFloat16;
}

// Checks every grad (before anything is touched): a fused dtype, all on one
// device. Sparse and other non-strided layouts have dispatch keys of their own
// (SparseCPU, MkldnnCPU...) for which no kernel is registered: the dispatcher
// refuses them before any kernel runs.
inline void check_grads(at::TensorList grads, const char* op) {
  for (const at::Tensor& g : grads) {
    TORCH_CHECK(is_fused_dtype(g.scalar_type()), "fastclip::", op,
                ": grads must be float32, float64, float16 or bfloat16, got ", g.scalar_type());
    TORCH_CHECK(g.device() == grads[0].device(), "fastclip::", op, ": all grads must be on one device, got ",
                grads[0].device(), " and ", g.device());
  }
}

inline void check_norm_type(double p, const char* op) {
  TORCH_CHECK(p > 0.0, "fastclip::", op, ": norm_type must be > 0 or inf, got ", p,
              " (p <= 0 is handled by fastclip's reference path)");
}

// A negative max_norm would flip the grads' signs; NaN fails the test too.
inline void check_max_norm(double max_norm, const char* op) {
  TORCH_CHECK(max_norm >= 0.0, "fastclip::", op, ": max_norm must be a non-negative number, got ", max_norm);
}

// clip_grad_norm_per_layer_'s arguments (both backends): groups empty (one
// group per grad) or one id per grad, each in [0, number of grads).
inline void check_per_layer_args(at::TensorList grads, at::IntArrayRef groups, double max_norm, double norm_type,
                                 const char* op) {
  check_norm_type(norm_type, op);
  check_max_norm(max_norm, op);
  TORCH_CHECK(groups.empty() || groups.size() == grads.size(), "fastclip::", op,
              ": groups must be empty or hold one id per grad, got ", groups.size(), " ids for ", grads.size(),
              " grads");
  for (const int64_t g : groups) {
    TORCH_CHECK(g >= 0 && g < static_cast<int64_t>(grads.size()), "fastclip::", op,
                ": group ids must be in [0, number of grads), got ", g);
  }
}

inline bool any_double(at::TensorList grads) {
  return std::any_of(grads.begin(), grads.end(), [](const at::Tensor& g) { return g.scalar_type() == at::kDouble; });
}

// The dtype a norm is returned in: the caller's, else float64 if any grad is
// fp64, else float32 (the accumulation precision).
inline at::ScalarType norm_dtype(at::TensorList grads, std::optional<at::ScalarType> requested, const char* op) {
  const at::ScalarType t = requested.value_or(any_double(grads) ? at::kDouble : at::kFloat);
  TORCH_CHECK(is_fused_dtype(t), "fastclip::", op, ": norm_dtype must be float32, float64, float16 or bfloat16, got ",
              t);
  return t;
}

// Which grads repeat an earlier one: the same memory seen twice (the same
// tensor listed twice, or a reshaped view of it). A repeat is counted and
// scaled once: torch counts it twice and scales it by coef^2 (and a fused
// kernel would scale it c or c^2 depending on timing). Dense grads that
// overlap only in part have no sensible clip: an error. Non-dense grads may
// interleave without sharing an element (g[::2], g[1::2]) and are let through.
// Returns an empty vector when nothing repeats.
//
// Cost: grads can share memory only through a shared storage, and nearly every
// grad owns its own. A counting pass over a hash of each storage's address
// (a few ns per grad) finds the grads whose storage may be shared; only those
// are sorted by address and compared, so thousands of grads need no sort.
inline std::vector<bool> repeated_grads(at::TensorList grads, const char* op) {
  int shift = 64 - 6;  // 2^(64 - shift) buckets: at least 16 per grad, so few collide by chance
  while ((size_t{1} << (64 - shift)) < 16 * grads.size()) --shift;
  const auto bucket = [shift](const at::Tensor& g) {  // Fibonacci hashing of the storage's address
    const auto p = reinterpret_cast<uint64_t>(g.storage().unsafeGetStorageImpl());
    return static_cast<size_t>((p * 0x9E3779B97F4A7C15ull) >> shift);
  };
  c10::SmallVector<uint8_t, 1024> seen(size_t{1} << (64 - shift), 0);  // 0, 1, or 2 = more than once
  bool collided = false;
  for (const at::Tensor& g : grads) {
    if (g.numel() == 0) continue;
    uint8_t& c = seen[bucket(g)];
    collided |= c != 0;
    c = c ? 2 : 1;
  }
  if (!collided) return {};

  struct Extent {
    uintptr_t begin, end;
    size_t index;
  };
  std::vector<Extent> ext;  // the grads whose storage may be shared
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    if (g.numel() == 0 || seen[bucket(g)] != 2) continue;
    int64_t last = 0;  // offset of the last element, in elements (torch strides are >= 0)
    for (int64_t d = 0; d < g.dim(); ++d) last += (g.size(d) - 1) * g.stride(d);
    const auto begin = reinterpret_cast<uintptr_t>(g.data_ptr());
    ext.push_back({begin, begin + static_cast<uintptr_t>((last + 1) * g.element_size()), i});
  }
  std::sort(ext.begin(), ext.end(), [](const Extent& a, const Extent& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.index < b.index;
  });
  const auto dense = [&](const Extent& e) { return grads[e.index].is_non_overlapping_and_dense(); };
  std::vector<bool> repeated;
  const Extent* reach = nullptr;  // the extent that ends furthest so far
  for (size_t k = 0; k < ext.size(); ++k) {
    const Extent& b = ext[k];
    if (reach != nullptr && b.begin < reach->end) {
      const Extent& a = ext[k - 1];
      if (a.begin == b.begin && a.end == b.end && dense(a) && dense(b) &&
          grads[a.index].scalar_type() == grads[b.index].scalar_type()) {
        if (repeated.empty()) repeated.resize(grads.size(), false);
        repeated[b.index] = true;  // sorted by index among equal starts: keep the first listed
        continue;
      }
      TORCH_CHECK(!(dense(*reach) && dense(b)), "fastclip::", op, ": grads ", std::min(reach->index, b.index), " and ",
                  std::max(reach->index, b.index),
                  " share part of their memory, so no scale of each one is a clip; pass each gradient once");
    }
    if (reach == nullptr || b.end > reach->end) reach = &b;
  }
  return repeated;
}

}  // namespace fastclip
