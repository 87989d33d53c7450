// CPU implementation of fastclip::clip_grad_norm_per_layer_ (schema in
// csrc/ops.cpp): local clipping. Each group of grads (one grad, or the
// parameters of one layer) is scaled by min(max_norm / (norm + 1e-6), 1) with
// its own norm. One group per grad: clip_by_windows (below). Layer groups:
// phase 1 is per_tensor.h's per-tensor norms (one pass over the chunked index
// space); the group norms and coefficients are a loop over the tensors; phase
// 2 scales every chunk by its tensor's coefficient, with the same thread split
// as phase 1 so each thread re-reads data in its own cache.
#include <torch/library.h>

#include "per_tensor.h"

namespace fastclip {
namespace {

using namespace cpu;

// The p-norm of a group from its members' norms, overflow/underflow-safe:
// max * (sum of (n_i / max)^p)^(1/p), in double, members in list order.
double group_norm(const std::vector<double>& member_norms, NormKind kind, double p) {
  double max_n = 0.0;
  for (const double n : member_norms) max_n = nan_max(max_n, n);
  if (kind == NormKind::Inf || member_norms.size() == 1 || !(max_n > 0.0 && max_n <= 1.7976931348623157e308)) {
    if (kind == NormKind::Inf || member_norms.size() == 1) return max_n;
    double acc = 0.0;  // 0, inf or NaN: the plain formula gives the right special value
    for (const double n : member_norms) acc += norm_term(n, kind, p);
    return finish_norm(acc, kind, p);
  }
  double scaled = 0.0;
  for (const double n : member_norms) scaled += scaled_term(n, max_n, kind, p);
  return rescued_norm(max_n, scaled, kind, p);
}

// groups: one id in [0, num_groups) per grad, or empty (each grad its own group).
std::vector<double> per_grad_group_norms(const PerTensorSet& pts, const std::vector<double>& norms,
                                         at::IntArrayRef groups, double p) {
  if (groups.empty()) return norms;
  const int64_t num_groups = groups.empty() ? 0 : *std::max_element(groups.begin(), groups.end()) + 1;
  std::vector<std::vector<double>> members(num_groups);
  for (size_t i = 0; i < norms.size(); ++i) {
    if (!is_repeat(pts, i)) members[groups[i]].push_back(norms[i]);  // memory seen twice counts once
  }
  std::vector<double> by_group(num_groups);
  const NormKind kind = norm_kind(p);
  for (int64_t g = 0; g < num_groups; ++g) by_group[g] = group_norm(members[g], kind, p);
  std::vector<double> out(norms.size());
  for (size_t i = 0; i < norms.size(); ++i) out[i] = by_group[groups[i]];
  return out;
}

// One group per grad: clipped window by window, a window being consecutive
// whole tensors of up to kWindowElems elements (a bigger tensor is a window of
// its own): the partials of the window's chunks, its tensors' norms and
// coefficients, then its scale with the same thread split, while the window
// is still in each thread's cache. (A global norm needs every element before
// the first scale; a tensor's own norm does not, and a plain per-tensor loop
// gets that locality too.) A tensor's norm is still its chunk partials
// combined in chunk order, bitwise what per_tensor_norms computes.
constexpr int64_t kWindowElems = int64_t{1} << 19;  // 2 MB of fp32: a thread's share stays in L2

template <NormKind kind>
std::vector<double> clip_by_windows(const PerTensorSet& pts, double max_norm, double p) {
  const GradSet& set = pts.set;
  const size_t num_spans = set.spans.size();
  std::vector<bool> repeat(num_spans, false);  // scaled by its first listing
  for (size_t i = 0; i < pts.span_of.size(); ++i) {
    if (pts.span_of[i] >= 0 && is_repeat(pts, i)) repeat[pts.span_of[i]] = true;
  }
  std::vector<double> norms(num_spans), coef(num_spans, 1.0), partials(set.num_chunks);
  std::vector<CoefFactors> factors(num_spans);
  for (size_t first = 0; first < num_spans;) {
    size_t last = first + 1;
    int64_t elems = set.spans[first].numel;
    while (last < num_spans && elems + set.spans[last].numel <= kWindowElems) elems += set.spans[last++].numel;
    const int64_t c0 = set.spans[first].first_chunk;
    const int64_t c1 = set.spans[last - 1].first_chunk + chunks_of(set.spans[last - 1]);
    const auto run = [&](const auto& body) {  // the same split both times: a pure function of the range
      if (elems <= kSerialMaxElems)
        body(c0, c1);
      else
        at::parallel_for(c0, c1, 1, body);
    };
    run([&](int64_t b, int64_t e) {
      for_each_chunk(set, b, e, Order::Forward, [&](const Span& s, int64_t off, int64_t n, int64_t c) {
        partials[c] = span_partial<kind>(s, off, n, p);
      });
    });
    bool any = false;
    for (size_t k = first; k < last; ++k) {
      const Span& s = set.spans[k];
      double acc = 0.0;
      for (int64_t c = s.first_chunk; c < s.first_chunk + chunks_of(s); ++c) acc = combine(acc, partials[c], kind);
      norms[k] = needs_rescue(acc, kind, s.dtype != at::kDouble) ? rescued_span_norm(s, acc, kind, p)
                                                                 : finish_norm(acc, kind, p);
      if (!repeat[k]) coef[k] = clip_coef(max_norm, norms[k]);
      factors[k] = coef_factors(coef[k]);
      any |= coef[k] != 1.0;
    }
    if (any) {
      run([&](int64_t b, int64_t e) {
        for_each_chunk(set, b, e, Order::Backward, [&](const Span& s, int64_t off, int64_t n, int64_t) {
          const size_t k = span_index(set, s);
          if (coef[k] != 1.0) scale_span(s, off, n, coef[k], factors[k]);  // 1: bitwise untouched
        });
      });
    }
    first = last;
  }
  copy_back(set);
  std::vector<double> by_grad(pts.span_of.size(), 0.0);
  for (size_t i = 0; i < by_grad.size(); ++i) {
    if (pts.span_of[i] >= 0) by_grad[i] = norms[pts.span_of[i]];
  }
  return by_grad;
}

std::vector<double> clip_by_windows(const PerTensorSet& pts, double max_norm, double p) {
  switch (norm_kind(p)) {
    case NormKind::L1: return clip_by_windows<NormKind::L1>(pts, max_norm, p);
    case NormKind::L2: return clip_by_windows<NormKind::L2>(pts, max_norm, p);
    case NormKind::Inf: return clip_by_windows<NormKind::Inf>(pts, max_norm, p);
    default: return clip_by_windows<NormKind::P>(pts, max_norm, p);
  }
}

at::Tensor clip_grad_norm_per_layer_cpu(at::TensorList grads, at::IntArrayRef groups, double max_norm,
                                        double norm_type) {
  const char* op = "clip_grad_norm_per_layer_";
  check_per_layer_args(grads, groups, max_norm, norm_type, op);
  const PerTensorSet pts = make_per_tensor_set(grads, op, /*check_overlap=*/true);  // checks, before any write
  const at::ScalarType out_dtype = pts.set.any_double ? at::kDouble : at::kFloat;
  if (groups.empty()) return vector_tensor(clip_by_windows(pts, max_norm, norm_type), out_dtype);

  // Layer groups: every member's norm before any scale, in two passes over the whole set.
  const std::vector<double> norms = per_grad_group_norms(pts, grad_norms(pts, norm_type), groups, norm_type);

  // Each span's coefficient; 1 (no write) for a repeat, which its first listing scales.
  std::vector<double> coef(pts.set.spans.size(), 1.0);
  bool any = false;
  for (size_t i = 0; i < grads.size(); ++i) {
    if (pts.span_of[i] < 0 || is_repeat(pts, i)) continue;
    coef[pts.span_of[i]] = clip_coef(max_norm, norms[i]);
    any |= coef[pts.span_of[i]] != 1.0;
  }
  if (any) {
    std::vector<CoefFactors> factors(coef.size());
    for (size_t s = 0; s < coef.size(); ++s) factors[s] = coef_factors(coef[s]);
    const GradSet& set = pts.set;
    over_chunks(set, [&](int64_t begin, int64_t end) {
      for_each_chunk(set, begin, end, Order::Backward, [&](const Span& s, int64_t off, int64_t n, int64_t) {
        const size_t k = span_index(set, s);
        if (coef[k] != 1.0) scale_span(s, off, n, coef[k], factors[k]);  // 1: bitwise untouched
      });
    });
    copy_back(set);
  }
  return vector_tensor(norms, out_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastclip, CPU, m) { m.impl("clip_grad_norm_per_layer_", &clip_grad_norm_per_layer_cpu); }

}  // namespace fastclip
