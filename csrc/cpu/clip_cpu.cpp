// CPU implementation of the fastclip ops (schemas in csrc/ops.cpp).
//
// All grads of one call form a flattened index space cut into fixed-size chunks
// (csrc/cpu/chunks.h). Phase 1 writes one partial of |g|^p per chunk; the
// partials are combined in double in chunk order, so the norm is bitwise the
// same whatever the thread count. If that fast sum left the accumulator's range
// (clip_math.h: needs_rescue) the rescue pass recomputes it scaled by max |g|.
// Phase 2 scales in place, walking the chunks with the same thread split so
// each thread re-reads data still in its own cache.
#include <ATen/EmptyTensor.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "chunks.h"

namespace fastclip {
namespace {

using namespace cpu;

// Combines chunk_fn(span, offset, length) over every chunk, in chunk order.
template <typename ChunkFn>
double combine_chunks(const GradSet& set, NormKind kind, const ChunkFn& chunk_fn) {
  double acc = 0.0;  // 0 is neutral for the sums and for max |x|
  if (set.numel <= kSerialMaxElems) {
    // Small sets: no pool, no buffer; combine as we go, in chunk order as below.
    for_each_chunk(set, 0, set.num_chunks, Order::Forward, [&](const Span& s, int64_t off, int64_t n, int64_t) {
      acc = combine(acc, chunk_fn(s, off, n), kind);
    });
    return acc;
  }
  std::vector<double> partials(set.num_chunks);
  over_chunks(set, [&](int64_t begin, int64_t end) {
    for_each_chunk(set, begin, end, Order::Forward,
                   [&](const Span& s, int64_t off, int64_t n, int64_t c) { partials[c] = chunk_fn(s, off, n); });
  });
  for (const double part : partials) acc = combine(acc, part, kind);
  return acc;
}

template <NormKind kind>
double fast_sum(const GradSet& set, double p) {
  return combine_chunks(set, kind,
                        [p](const Span& s, int64_t off, int64_t n) { return span_partial<kind>(s, off, n, p); });
}

// The norm again, overflow- and underflow-safe: max |g|, then the sum of
// (|g| / max)^p in double. Finite grads get a finite norm wherever the norm
// itself fits in a double.
double rescued_global_norm(const GradSet& set, double fast_acc, NormKind kind, double p) {
  const double max_abs = fast_sum<NormKind::Inf>(set, p);
  if (!(max_abs > 0.0 && max_abs <= 1.7976931348623157e308)) {
    return finish_norm(fast_acc, kind, p);  // all zero, or an inf element: the fast result stands
  }
  const double scaled = combine_chunks(
      set, kind, [&](const Span& s, int64_t off, int64_t n) { return span_scaled_sum(s, off, n, max_abs, kind, p); });
  return rescued_norm(max_abs, scaled, kind, p);
}

template <NormKind kind>
double global_norm(const GradSet& set, double p) {
  const double acc = fast_sum<kind>(set, p);
  if (needs_rescue(acc, kind, set.float_acc)) return rescued_global_norm(set, acc, kind, p);
  return finish_norm(acc, kind, p);
}

double global_norm(const GradSet& set, double p) {
  switch (norm_kind(p)) {
    case NormKind::L1: return global_norm<NormKind::L1>(set, p);
    case NormKind::L2: return global_norm<NormKind::L2>(set, p);
    case NormKind::Inf: return global_norm<NormKind::Inf>(set, p);
    default: return global_norm<NormKind::P>(set, p);
  }
}

// coef: the clamped coefficient (clip_math.h: clip_coef).
void scale_grads(const GradSet& set, double coef) {
  if (coef == 1.0) return;  // leave the grads bitwise untouched, as torch's *1 would
  const CoefFactors factors = coef_factors(coef);
  over_chunks(set, [&](int64_t begin, int64_t end) {
    for_each_chunk(set, begin, end, Order::Backward,
                   [&](const Span& s, int64_t off, int64_t n, int64_t) { scale_span(s, off, n, coef, factors); });
  });
  copy_back(set);
}

// ---- ops ----------------------------------------------------------------------

at::Tensor total_norm_cpu(at::TensorList grads, double norm_type, std::optional<at::ScalarType> requested) {
  check_norm_type(norm_type, "total_norm");
  const at::ScalarType out_dtype = norm_dtype(grads, requested, "total_norm");
  const GradSet set = make_grad_set(grads, "total_norm");
  return norm_tensor(global_norm(set, norm_type), out_dtype);
}

void scale_cpu(at::TensorList grads, const at::Tensor& coef) {
  TORCH_CHECK(coef.numel() == 1 && coef.device().is_cpu() &&
                  (coef.scalar_type() == at::kFloat || coef.scalar_type() == at::kDouble),
              "fastclip::scale_: coef must be a one-element float32/float64 tensor on the grads' device");
  const GradSet set = make_grad_set(grads, "scale_");
  scale_grads(set, coef.item<double>());
}

at::Tensor clip_grad_norm_cpu(at::TensorList grads, double max_norm, double norm_type,
                              std::optional<at::ScalarType> requested) {
  check_norm_type(norm_type, "clip_grad_norm_");
  check_max_norm(max_norm, "clip_grad_norm_");
  const at::ScalarType out_dtype = norm_dtype(grads, requested, "clip_grad_norm_");  // before any grad is touched
  const GradSet set = make_grad_set(grads, "clip_grad_norm_");
  const double norm = global_norm(set, norm_type);
  scale_grads(set, clip_coef(max_norm, norm));
  return norm_tensor(norm, out_dtype);
}

}  // namespace

namespace cpu {

double grads_norm(at::TensorList grads, double norm_type, const char* op) {
  return global_norm(make_grad_set(grads, op), norm_type);
}

at::Tensor norm_tensor(double norm, at::ScalarType dtype) {
  at::Tensor out = at::detail::empty_cpu({}, dtype, /*pin_memory=*/false, std::nullopt);
  switch (dtype) {
    case at::kDouble: *out.data_ptr<double>() = norm; break;
    case at::kFloat: *out.data_ptr<float>() = static_cast<float>(norm); break;
    case at::kHalf: *out.data_ptr<Half>() = static_cast<float>(norm); break;
    default: *out.data_ptr<BFloat16>() = static_cast<float>(norm); break;
  }
  return out;
}

}  // namespace cpu

TORCH_LIBRARY_IMPL(fastclip, CPU, m) {
  m.impl("total_norm", &total_norm_cpu);
  m.impl("scale_", &scale_cpu);
  m.impl("clip_grad_norm_", &clip_grad_norm_cpu);
}

}  // namespace fastclip
