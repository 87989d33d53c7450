// Per-tensor norms on the CPU: the building block of per_tensor_norms
// (norms_cpu.cpp) and of local clipping (per_layer_cpu.cpp). Built on
// chunks.h's chunked index space, so a tensor's norm is accumulated exactly as
// the global norm is (same vectorised chunk partial, fp32/fp64 accumulator,
// partials combined in double in chunk order: bitwise the same whatever the
// thread count), and made overflow/underflow-safe by the same rescue pass.
#pragma once

#include <vector>

#include "chunks.h"

namespace fastclip::cpu {

// The grads of a per-tensor op. Unlike make_grad_set, a grad listed twice gets
// a span of its own (each listed tensor has a norm); `repeated` says which
// grads a scaling op must skip so that memory is scaled once.
struct PerTensorSet {
  GradSet set;
  std::vector<int64_t> span_of;  // grad i -> its span, or -1 for a zero-size grad
  std::vector<bool> repeated;    // empty: nothing repeats (grad_checks.h: repeated_grads)
};

// check_overlap: scaling ops pass true (a partial overlap is an error and a
// repeat is scaled once, as in clip_grad_norm_); read-only ops pass false.
inline PerTensorSet make_per_tensor_set(at::TensorList grads, const char* op, bool check_overlap) {
  check_grads(grads, op);
  PerTensorSet out;
  if (check_overlap) out.repeated = repeated_grads(grads, op);
  out.set.spans.reserve(grads.size());
  out.span_of.reserve(grads.size());
  for (const at::Tensor& g : grads) out.span_of.push_back(add_span(out.set, g));  // a repeat too: it has a norm
  return out;
}

inline bool is_repeat(const PerTensorSet& pts, size_t grad) { return !pts.repeated.empty() && pts.repeated[grad]; }

inline size_t span_index(const GradSet& set, const Span& s) { return static_cast<size_t>(&s - set.spans.data()); }

// Each span's combined accumulator (sum of |x|^p, or max |x|), chunk partials
// combined in chunk order.
template <NormKind kind>
std::vector<double> span_accumulators(const GradSet& set, double p) {
  std::vector<double> acc(set.spans.size(), 0.0);  // 0 is neutral for the sums and for max |x|
  if (set.numel <= kSerialMaxElems) {
    // Small sets: no pool, no buffer; combine as we go, in the same order as below.
    for_each_chunk(set, 0, set.num_chunks, Order::Forward, [&](const Span& s, int64_t off, int64_t n, int64_t) {
      double& a = acc[span_index(set, s)];
      a = combine(a, span_partial<kind>(s, off, n, p), kind);
    });
    return acc;
  }
  std::vector<double> partials(set.num_chunks);
  over_chunks(set, [&](int64_t begin, int64_t end) {
    for_each_chunk(set, begin, end, Order::Forward, [&](const Span& s, int64_t off, int64_t n, int64_t c) {
      partials[c] = span_partial<kind>(s, off, n, p);
    });
  });
  for (size_t i = 0; i < set.spans.size(); ++i) {
    const Span& s = set.spans[i];
    for (int64_t c = s.first_chunk; c < s.first_chunk + chunks_of(s); ++c) acc[i] = combine(acc[i], partials[c], kind);
  }
  return acc;
}

// One span's norm again, overflow- and underflow-safe (the per-span twin of
// clip_cpu.cpp's rescued_global_norm). On the calling thread: it runs only for
// a tensor whose fast sum left the accumulator's range.
inline double rescued_span_norm(const Span& s, double fast_acc, NormKind kind, double p) {
  double max_abs = 0.0;
  for (int64_t off = 0; off < s.numel; off += kChunkElems) {
    max_abs =
        combine(max_abs, span_partial<NormKind::Inf>(s, off, std::min(kChunkElems, s.numel - off), p), NormKind::Inf);
  }
  if (!(max_abs > 0.0 && max_abs <= 1.7976931348623157e308)) return finish_norm(fast_acc, kind, p);
  double scaled = 0.0;
  for (int64_t off = 0; off < s.numel; off += kChunkElems) {
    scaled += span_scaled_sum(s, off, std::min(kChunkElems, s.numel - off), max_abs, kind, p);
  }
  return rescued_norm(max_abs, scaled, kind, p);
}

template <NormKind kind>
std::vector<double> span_norms(const GradSet& set, double p) {
  std::vector<double> norms = span_accumulators<kind>(set, p);
  for (size_t i = 0; i < norms.size(); ++i) {
    const Span& s = set.spans[i];
    norms[i] = needs_rescue(norms[i], kind, s.dtype != at::kDouble) ? rescued_span_norm(s, norms[i], kind, p)
                                                                    : finish_norm(norms[i], kind, p);
  }
  return norms;
}

// The p-norm of each span, in double.
inline std::vector<double> span_norms(const GradSet& set, double p) {
  switch (norm_kind(p)) {
    case NormKind::L1: return span_norms<NormKind::L1>(set, p);
    case NormKind::L2: return span_norms<NormKind::L2>(set, p);
    case NormKind::Inf: return span_norms<NormKind::Inf>(set, p);
    default: return span_norms<NormKind::P>(set, p);
  }
}

// The p-norm of each grad (0 for a zero-size one), in double.
inline std::vector<double> grad_norms(const PerTensorSet& pts, double p) {
  const std::vector<double> by_span = span_norms(pts.set, p);
  std::vector<double> out(pts.span_of.size(), 0.0);
  for (size_t i = 0; i < out.size(); ++i) {
    if (pts.span_of[i] >= 0) out[i] = by_span[pts.span_of[i]];
  }
  return out;
}

// A 1-D CPU tensor holding `values` in float32 or float64.
inline at::Tensor vector_tensor(const std::vector<double>& values, at::ScalarType dtype) {
  at::Tensor out = at::empty({static_cast<int64_t>(values.size())}, at::TensorOptions().dtype(dtype));
  if (dtype == at::kDouble) {
    std::copy(values.begin(), values.end(), out.data_ptr<double>());
  } else {
    float* o = out.data_ptr<float>();
    for (size_t i = 0; i < values.size(); ++i) o[i] = static_cast<float>(values[i]);
  }
  return out;
}

}  // namespace fastclip::cpu
