// CPU implementation of the fastclip ops (schemas in csrc/ops.cpp).
//
// All grads of one call form a flattened index space cut into fixed-size chunks
// (kChunkElems, never crossing a tensor). Phase 1 writes one partial of |g|^p
// per chunk; the partials are combined in double in chunk order, so the norm
// is bitwise the same whatever the thread count. Phase 2 scales in place,
// walking the chunks with the same thread split so each thread re-reads data
// still in its own cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "clip_math.h"
#include "fused_dtypes.h"

namespace fastclip {
namespace {

using at::BFloat16;
using at::Half;
using at::vec::Vectorized;

// Up to this many elements everything runs on the calling thread: waking the
// pool, and pulling data another core's cache holds, cost more than the work
// (measured on 2 cores: one thread wins up to ~250K fp32 elements).
constexpr int64_t kSerialMaxElems = int64_t{1} << 18;

// One grad as the kernels see it: a flat run of `numel` elements. A grad that
// is not dense in memory gets a contiguous copy for the norm (`data` points
// into it) and is scaled through ATen instead (`scale_in_place` false).
struct Span {
  at::Tensor keep_alive;
  void* data;
  int64_t numel;
  at::ScalarType dtype;
  int64_t first_chunk;
  bool scale_in_place;
};

struct GradSet {
  std::vector<Span> spans;
  std::vector<at::Tensor> strided;  // non-dense grads, scaled with at::mul_
  int64_t num_chunks = 0;
  int64_t numel = 0;
  bool any_double = false;
};

GradSet make_grad_set(const at::TensorList grads, const char* op) {
  GradSet set;
  set.spans.reserve(grads.size());
  for (const at::Tensor& g : grads) {
    TORCH_CHECK(g.device().is_cpu(), "fastclip::", op, ": expected CPU grads, got one on ", g.device());
    TORCH_CHECK(is_fused_dtype(g.scalar_type()), "fastclip::", op,
                ": grads must be float32, float64, float16 or bfloat16, got ", g.scalar_type());
    TORCH_CHECK(g.layout() == at::kStrided, "fastclip::", op, ": sparse grads are not supported");
    set.any_double |= g.scalar_type() == at::kDouble;
    const int64_t n = g.numel();
    if (n == 0) continue;
    const bool dense = g.is_non_overlapping_and_dense();
    at::Tensor flat = dense ? g : g.contiguous();
    if (!dense) set.strided.push_back(g);
    set.spans.push_back(Span{flat, flat.data_ptr(), n, g.scalar_type(), set.num_chunks, dense});
    set.num_chunks += (n + kChunkElems - 1) / kChunkElems;
    set.numel += n;
  }
  return set;
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
    while (c >= set.spans[i].first_chunk + (set.spans[i].numel + kChunkElems - 1) / kChunkElems) ++i;
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
  if constexpr (kind == NormKind::L2) return x * x;
  else if constexpr (kind == NormKind::P) return x.abs().pow(p);
  else return x.abs();
}

template <NormKind kind, typename V>
V vec_combine(const V& a, const V& b) {
  if constexpr (kind == NormKind::Inf) return at::vec::maximum(a, b);
  else return a + b;
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
template <> struct Loader<Half> : ReducedLoader<Half> {};
template <> struct Loader<BFloat16> : ReducedLoader<BFloat16> {};

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

template <NormKind kind>
double reduce_norm(const GradSet& set, double p) {
  double acc = 0.0;  // 0 is neutral for the sums and for max |x|
  if (set.numel <= kSerialMaxElems) {
    // Small sets: no pool, no buffer; combine as we go, in chunk order as below.
    for_each_chunk(set, 0, set.num_chunks, Order::Forward, [&](const Span& s, int64_t off, int64_t n, int64_t) {
      acc = combine(acc, span_partial<kind>(s, off, n, p), kind);
    });
    return finish_norm(acc, kind, p);
  }
  std::vector<double> partials(set.num_chunks);
  over_chunks(set, [&](int64_t begin, int64_t end) {
    for_each_chunk(set, begin, end, Order::Forward, [&](const Span& s, int64_t off, int64_t n, int64_t c) {
      partials[c] = span_partial<kind>(s, off, n, p);
    });
  });
  for (const double part : partials) acc = combine(acc, part, kind);
  return finish_norm(acc, kind, p);
}

double global_norm(const GradSet& set, double p) {
  switch (norm_kind(p)) {
    case NormKind::L1: return reduce_norm<NormKind::L1>(set, p);
    case NormKind::L2: return reduce_norm<NormKind::L2>(set, p);
    case NormKind::Inf: return reduce_norm<NormKind::Inf>(set, p);
    default: return reduce_norm<NormKind::P>(set, p);
  }
}

// ---- phase 2: scale in place ----------------------------------------------

template <typename scalar_t, typename coef_t>
void scale_run(void* data, int64_t n, coef_t coef) {
  using V = Vectorized<coef_t>;
  auto* x = static_cast<scalar_t*>(data);
  at::vec::map([c = V(coef)](V v) { return v * c; }, x, x, n);
}

// coef is the clamped coefficient in the norm's precision (float or double).
void scale_grads(const GradSet& set, double coef) {
  if (coef == 1.0) return;  // leave the grads bitwise untouched, as torch's *1 would
  const float coef_f = static_cast<float>(coef);
  over_chunks(set, [&](int64_t begin, int64_t end) {
    for_each_chunk(set, begin, end, Order::Backward, [&](const Span& s, int64_t off, int64_t n, int64_t) {
      if (!s.scale_in_place) return;
      switch (s.dtype) {
        case at::kFloat: scale_run<float>(static_cast<float*>(s.data) + off, n, coef_f); break;
        case at::kDouble: scale_run<double>(static_cast<double*>(s.data) + off, n, coef); break;
        case at::kHalf: scale_run<Half>(static_cast<Half*>(s.data) + off, n, coef_f); break;
        default: scale_run<BFloat16>(static_cast<BFloat16*>(s.data) + off, n, coef_f); break;
      }
    });
  });
  for (const at::Tensor& g : set.strided) g.mul_(g.scalar_type() == at::kDouble ? coef : double(coef_f));
}

// The dtype the norm is returned in: the caller's, else float64 if any grad
// is fp64, else float32.
at::ScalarType norm_dtype_for(const GradSet& set, std::optional<at::ScalarType> requested) {
  const at::ScalarType t = requested.value_or(set.any_double ? at::kDouble : at::kFloat);
  TORCH_CHECK(is_fused_dtype(t), "fastclip: norm_dtype must be float32, float64, float16 or bfloat16, got ", t);
  return t;
}

at::Tensor norm_tensor(double norm, at::ScalarType dtype) {
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(dtype));
  switch (dtype) {
    case at::kDouble: *out.data_ptr<double>() = norm; break;
    case at::kFloat: *out.data_ptr<float>() = static_cast<float>(norm); break;
    case at::kHalf: *out.data_ptr<Half>() = static_cast<float>(norm); break;
    default: *out.data_ptr<BFloat16>() = static_cast<float>(norm); break;
  }
  return out;
}

void check_norm_type(double p, const char* op) {
  TORCH_CHECK(p > 0.0, "fastclip::", op, ": norm_type must be > 0 or inf, got ", p,
              " (p <= 0 is handled by fastclip's reference path)");
}

// ---- ops ----------------------------------------------------------------------

at::Tensor total_norm_cpu(at::TensorList grads, double norm_type) {
  check_norm_type(norm_type, "total_norm");
  const GradSet set = make_grad_set(grads, "total_norm");
  return norm_tensor(global_norm(set, norm_type), norm_dtype_for(set, std::nullopt));
}

void scale_cpu(at::TensorList grads, const at::Tensor& coef) {
  TORCH_CHECK(coef.numel() == 1 && coef.device().is_cpu(), "fastclip::scale_: coef must be a one-element CPU tensor");
  const GradSet set = make_grad_set(grads, "scale_");
  scale_grads(set, coef.item<double>());
}

at::Tensor clip_grad_norm_cpu(at::TensorList grads, double max_norm, double norm_type,
                              std::optional<at::ScalarType> norm_dtype) {
  check_norm_type(norm_type, "clip_grad_norm_");
  const GradSet set = make_grad_set(grads, "clip_grad_norm_");
  const at::ScalarType out_dtype = norm_dtype_for(set, norm_dtype);  // checked before any grad is touched
  const double norm = global_norm(set, norm_type);
  scale_grads(set, set.any_double ? clip_coef<double>(max_norm, norm) : clip_coef<float>(max_norm, norm));
  return norm_tensor(norm, out_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastclip, CPU, m) {
  m.impl("total_norm", &total_norm_cpu);
  m.impl("scale_", &scale_cpu);
  m.impl("clip_grad_norm_", &clip_grad_norm_cpu);
}

}  // namespace fastclip
