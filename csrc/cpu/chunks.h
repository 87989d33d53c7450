// The CPU ops' shared machinery: a list of grads seen as one flattened index
// space cut into fixed-size chunks (kChunkElems, never crossing a tensor), the
// vectorised per-chunk partial of |g|^p, and the in-place scale of a run.
// Used by clip_cpu.cpp and by every other CPU op that walks grads the same way,
// so they all share the accumulation and determinism rules.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <vector>

#include "clip_math.h"
#include "grad_checks.h"

namespace fastclip::cpu {

using at::BFloat16;
using at::Half;
using at::vec::Vectorized;

// Up to this many elements everything runs on the calling thread: waking the
// pool, and pulling data another core's cache holds, cost more than the work
// (measured on 2 cores: one thread wins up to ~250K fp32 elements).
constexpr int64_t kSerialMaxElems = int64_t{1} << 18;

// One grad as the kernels see it: a flat run of `numel` elements.
struct Span {
  void* data;
  int64_t numel;
  at::ScalarType dtype;
  int64_t first_chunk;
};

// The grads of one call. A grad that is not one dense run in memory (a strided
// view) is read and scaled through a contiguous copy, written back by
// copy_back(): the same code and precision as every other grad. A grad listed
// twice is counted and scaled once (grad_checks.h).
struct GradSet {
  std::vector<Span> spans;
  std::vector<std::pair<at::Tensor, at::Tensor>> copies;  // (non-dense grad, its contiguous copy)
  int64_t num_chunks = 0;
  int64_t numel = 0;
  bool any_double = false;
  bool float_acc = false;  // some grad is accumulated in float (not fp64)
};

inline int64_t chunks_of(const Span& s) { return (s.numel + kChunkElems - 1) / kChunkElems; }

// Appends g as the set's next span (read through a contiguous copy if it is not
// dense). Returns the span's index, or -1 for a zero-size grad (no span).
inline int64_t add_span(GradSet& set, const at::Tensor& g) {
  set.any_double |= g.scalar_type() == at::kDouble;
  if (g.numel() == 0) return -1;
  set.float_acc |= g.scalar_type() != at::kDouble;
  void* data = g.data_ptr();
  if (!g.is_non_overlapping_and_dense()) {
    set.copies.emplace_back(g, g.contiguous());
    data = set.copies.back().second.data_ptr();
  }
  set.spans.push_back(Span{data, g.numel(), g.scalar_type(), set.num_chunks});
  set.num_chunks += chunks_of(set.spans.back());
  set.numel += g.numel();
  return static_cast<int64_t>(set.spans.size()) - 1;
}

// Defined in clip_cpu.cpp. The p-norm of all grads as total_norm computes it (the
// same chunks and partials: bitwise the same), after make_grad_set's checks.
double grads_norm(at::TensorList grads, double norm_type, const char* op);
// A 0-dim CPU tensor of `dtype` holding `value`, made as torch's CPU kernels make
// their outputs: not a trip through the dispatcher, which costs a small model's
// call a tenth of its time.
at::Tensor norm_tensor(double value, at::ScalarType dtype);

inline GradSet make_grad_set(at::TensorList grads, const char* op) {
  check_grads(grads, op);
  const std::vector<bool> repeated = repeated_grads(grads, op);
  GradSet set;
  set.spans.reserve(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    if (repeated.empty() || !repeated[i]) add_span(set, grads[i]);
  }
  return set;
}

inline void copy_back(const GradSet& set) {
  for (const auto& [grad, copy] : set.copies) grad.copy_(copy);
}

enum class Order { Forward, Backward };

// Calls fn(span, offset, length, chunk_index) for chunks [begin, end), in the
// given order. Phase 2 walks backward: the chunks its thread read last in
// phase 1 come first, while they are still in cache.
template <typename Fn>
void for_each_chunk(const GradSet& set, int64_t begin, int64_t end, Order order, const Fn& fn) {
  if (begin >= end) return;
  const bool forward = order == Order::Forward;
  const int64_t first = forward ? begin : end - 1;
  auto it = std::upper_bound(set.spans.begin(), set.spans.end(), first,
                             [](int64_t c, const Span& s) { return c < s.first_chunk; });
  size_t i = static_cast<size_t>(it - set.spans.begin()) - 1;  // the span holding chunk `first`
  for (int64_t c = first; forward ? c < end : c >= begin; c += forward ? 1 : -1) {
    while (c < set.spans[i].first_chunk) --i;
    while (c >= set.spans[i].first_chunk + chunks_of(set.spans[i])) ++i;
    const Span& s = set.spans[i];
    const int64_t offset = (c - s.first_chunk) * kChunkElems;
    fn(s, offset, std::min(kChunkElems, s.numel - offset), c);
  }
}

// Runs body(begin, end) over chunk ranges: on the pool for big sets, inline
// for small ones. The split is a pure function of the range and the thread
// count, so phase 2 sees the same chunks per thread as phase 1.
template <typename Body>
void over_chunks(const GradSet& set, const Body& body) {
  if (set.numel <= kSerialMaxElems) {
    body(0, set.num_chunks);
  } else {
    at::parallel_for(0, set.num_chunks, 1, body);
  }
}

// ---- phase 1: partial of one chunk ----------------------------------------

template <NormKind kind, typename V>
V vec_term(const V& x, const V& p) {
  if constexpr (kind == NormKind::L2)
    return x * x;
  else if constexpr (kind == NormKind::P)
    return x.abs().pow(p);
  else
    return x.abs();
}

template <NormKind kind, typename V>
V vec_combine(const V& a, const V& b) {
  if constexpr (kind == NormKind::Inf)
    return at::vec::maximum(a, b);
  else
    return a + b;
}

// Loads one step of elements as accumulator-precision vectors: one vector for
// float/double, two float vectors for half/bfloat16.
template <typename scalar_t>
struct Loader {
  using acc_t = scalar_t;
  static constexpr int kVecs = 1;
  static constexpr int64_t kStep = Vectorized<scalar_t>::size();
  static void load(const scalar_t* x, Vectorized<acc_t>* out) { out[0] = Vectorized<acc_t>::loadu(x); }
};

template <typename scalar_t>
struct ReducedLoader {
  using acc_t = float;
  static constexpr int kVecs = 2;
  static constexpr int64_t kStep = 2 * Vectorized<float>::size();
  static void load(const scalar_t* x, Vectorized<float>* out) { at::vec::load_to_float(x, out[0], out[1]); }
};
template <>
struct Loader<Half> : ReducedLoader<Half> {};
template <>
struct Loader<BFloat16> : ReducedLoader<BFloat16> {};

template <typename scalar_t>
using acc_type = typename Loader<scalar_t>::acc_t;

// Sum of |x|^p (max |x| for inf) over n elements. Four independent vector
// accumulators hide the add latency; they are folded in a fixed order.
template <typename scalar_t, NormKind kind>
acc_type<scalar_t> chunk_partial(const scalar_t* x, int64_t n, acc_type<scalar_t> p) {
  using L = Loader<scalar_t>;
  using acc_t = acc_type<scalar_t>;
  using V = Vectorized<acc_t>;
  constexpr int kAcc = 4;
  constexpr int64_t kUnroll = kAcc / L::kVecs * L::kStep;
  acc_t total = 0;  // neutral for the sums and for max |x|
  int64_t i = 0;
  if (n >= kUnroll) {  // tiny tensors skip the vector set-up and the lane fold
    const V vp(p);
    V acc[kAcc] = {V(0), V(0), V(0), V(0)};
    for (; i + kUnroll <= n; i += kUnroll) {
      V v[kAcc];
      for (int j = 0; j < kAcc / L::kVecs; ++j) L::load(x + i + j * L::kStep, v + j * L::kVecs);
      for (int j = 0; j < kAcc; ++j) acc[j] = vec_combine<kind>(acc[j], vec_term<kind>(v[j], vp));
    }
    acc_t lanes[kAcc * V::size()];
    for (int j = 0; j < kAcc; ++j) acc[j].store(lanes + j * V::size());
    for (const acc_t lane : lanes) total = combine(total, lane, kind);
  }
  for (; i < n; ++i) total = combine(total, norm_term(static_cast<acc_t>(x[i]), kind, p), kind);
  return total;
}

template <NormKind kind>
double span_partial(const Span& s, int64_t offset, int64_t n, double p) {
  switch (s.dtype) {
    case at::kFloat: return chunk_partial<float, kind>(static_cast<const float*>(s.data) + offset, n, p);
    case at::kDouble: return chunk_partial<double, kind>(static_cast<const double*>(s.data) + offset, n, p);
    case at::kHalf: return chunk_partial<Half, kind>(static_cast<const Half*>(s.data) + offset, n, p);
    default: return chunk_partial<BFloat16, kind>(static_cast<const BFloat16*>(s.data) + offset, n, p);
  }
}

// ---- the rescue pass's summand (clip_math.h: needs_rescue) ----------------

// Sum of (|x| / max_abs)^p over n elements, in double. Scalar: it runs only
// when the fast sum overflowed or underflowed.
inline double span_scaled_sum(const Span& s, int64_t offset, int64_t n, double max_abs, NormKind kind, double p) {
  double acc = 0.0;
  const auto sum = [&](const auto* x) {
    for (int64_t i = 0; i < n; ++i) acc += scaled_term(static_cast<double>(x[i]), max_abs, kind, p);
  };
  switch (s.dtype) {
    case at::kFloat: sum(static_cast<const float*>(s.data) + offset); break;
    case at::kDouble: sum(static_cast<const double*>(s.data) + offset); break;
    case at::kHalf: sum(static_cast<const Half*>(s.data) + offset); break;
    default: sum(static_cast<const BFloat16*>(s.data) + offset); break;
  }
  return acc;
}

// ---- phase 2: scale one run in place ---------------------------------------

template <typename scalar_t, typename coef_t>
void scale_run(void* data, int64_t n, coef_t coef) {
  using V = Vectorized<coef_t>;
  auto* x = static_cast<scalar_t*>(data);
  at::vec::map([c = V(coef)](V v) { return v * c; }, x, x, n);
}

// x * hi * lo for a coefficient below FLT_MIN (clip_math.h: coef_factors).
template <typename scalar_t>
void scale_run_tiny(void* data, int64_t n, CoefFactors f) {
  using V = Vectorized<float>;
  auto* x = static_cast<scalar_t*>(data);
  at::vec::map([hi = V(f.hi), lo = V(f.lo)](V v) { return v * hi * lo; }, x, x, n);
}

// Scales elements [offset, offset + n) of a span by coef (fp64 grads) or by
// its float factors (every other dtype, computed in float).
inline void scale_span(const Span& s, int64_t offset, int64_t n, double coef, CoefFactors f) {
  if (s.dtype == at::kDouble) return scale_run<double>(static_cast<double*>(s.data) + offset, n, coef);
  const int64_t bytes = offset * c10::elementSize(s.dtype);
  void* x = static_cast<char*>(s.data) + bytes;
  if (f.lo == 1.0f) {
    switch (s.dtype) {
      case at::kFloat: return scale_run<float>(x, n, f.hi);
      case at::kHalf: return scale_run<Half>(x, n, f.hi);
      default: return scale_run<BFloat16>(x, n, f.hi);
    }
  }
  switch (s.dtype) {
    case at::kFloat: return scale_run_tiny<float>(x, n, f);
    case at::kHalf: return scale_run_tiny<Half>(x, n, f);
    default: return scale_run_tiny<BFloat16>(x, n, f);
  }
}

}  // namespace fastclip::cpu
