// CPU implementation of fastclip::clip_grad_norm_per_layer_ (schema in
// csrc/ops.cpp): local clipping. Each group of grads (one grad, or the
// parameters of one layer) is scaled by min(max_norm / (norm + 1e-6), 1) with
// its own norm. Phase 1 is per_tensor.h's per-tensor norms (one pass over the
// chunked index space); the group norms and coefficients are a loop over the
// tensors; phase 2 scales every chunk by its tensor's coefficient, with the
// same thread split as phase 1 so each thread re-reads data in its own cache.
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

at::Tensor clip_grad_norm_per_layer_cpu(at::TensorList grads, at::IntArrayRef groups, double max_norm,
                                        double norm_type) {
  const char* op = "clip_grad_norm_per_layer_";
  check_norm_type(norm_type, op);
  TORCH_CHECK(max_norm >= 0.0, "fastclip::", op, ": max_norm must be a non-negative number, got ", max_norm);
  TORCH_CHECK(groups.empty() || groups.size() == grads.size(), "fastclip::", op,
              ": groups must be empty or hold one id per grad, got ", groups.size(), " ids for ", grads.size(),
              " grads");
  for (const int64_t g : groups) {
    TORCH_CHECK(g >= 0 && g < static_cast<int64_t>(grads.size()), "fastclip::", op,
                ": group ids must be in [0, number of grads), got ", g);
  }
  const PerTensorSet pts = make_per_tensor_set(grads, op, /*check_overlap=*/true);  // checks, before any write
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
  return vector_tensor(norms, pts.set.any_double ? at::kDouble : at::kFloat);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastclip, CPU, m) { m.impl("clip_grad_norm_per_layer_", &clip_grad_norm_per_layer_cpu); }

}  // namespace fastclip
