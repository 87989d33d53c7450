// CPU implementation of fastclip::adaptive_clip_grad_ (schema in csrc/ops.cpp):
// unit-wise adaptive gradient clipping (AGC, Brock et al. 2021, as timm's
// adaptive_clip_grad). A unit is a row of a >= 2-D tensor (index 0, over all
// its other dims; the output channel of a linear or conv weight); a <= 1-D
// tensor is one unit. Each unit's grad is scaled by clip_math.h's agc_coef
// from the unit's param norm and grad norm.
//
// One pass: a unit of up to kChunkElems elements (every row of usual models)
// is handled whole by one thread: param row and grad row read, the two norms
// and the coefficient computed, the grad row scaled while still in cache.
// Longer units (a big 1-D tensor, rows over 64Ki elements) are cut into
// chunks: partials in parallel, combined in chunk order, then a parallel scale.
// Each unit's norms are summed in a fixed order by one thread, so results are
// bitwise the same whatever the thread count. Norms are accumulated as
// per_tensor_norms does (fp32, fp64 for fp64), with the same rescue pass.
#include <torch/library.h>

#include "../agc_checks.h"
#include "per_tensor.h"

namespace fastclip {
namespace {

using namespace cpu;

// A param and its grad as rows of `unit_len` elements, row u at u * unit_len.
struct UnitPair {
  Span param, grad;
  int64_t units, unit_len;
};

Span sub_span(const Span& s, int64_t offset, int64_t n) {
  return Span{static_cast<char*>(s.data) + offset * c10::elementSize(s.dtype), n, s.dtype, 0};
}

template <NormKind kind>
double finished_norm(const Span& s, double acc, double p) {
  return needs_rescue(acc, kind, s.dtype != at::kDouble) ? rescued_span_norm(s, acc, kind, p)
                                                         : finish_norm(acc, kind, p);
}

struct AgcArgs {
  double clip_factor, eps, p;
};

// One short unit, start to end: both norms, the coefficient, the scale.
template <NormKind kind>
void clip_unit(const UnitPair& t, int64_t u, const AgcArgs& a) {
  const Span prow = sub_span(t.param, u * t.unit_len, t.unit_len);
  const Span grow = sub_span(t.grad, u * t.unit_len, t.unit_len);
  const double pn = finished_norm<kind>(prow, span_partial<kind>(prow, 0, t.unit_len, a.p), a.p);
  const double gn = finished_norm<kind>(grow, span_partial<kind>(grow, 0, t.unit_len, a.p), a.p);
  const double coef = agc_coef(pn, gn, a.clip_factor, a.eps);
  if (coef != 1.0) scale_span(grow, 0, t.unit_len, coef, coef_factors(coef));
}

// Consecutive short units (tensor t, units [begin, end)) of about one chunk.
struct Block {
  size_t tensor;
  int64_t begin, end;
};

template <NormKind kind>
void clip_short_units(const std::vector<UnitPair>& pairs, const AgcArgs& a) {
  std::vector<Block> blocks;
  int64_t total = 0;
  for (size_t i = 0; i < pairs.size(); ++i) {
    const UnitPair& t = pairs[i];
    if (t.unit_len > kChunkElems) continue;
    const int64_t per_block = std::max<int64_t>(1, kChunkElems / t.unit_len);
    for (int64_t u = 0; u < t.units; u += per_block) blocks.push_back({i, u, std::min(t.units, u + per_block)});
    total += t.units * t.unit_len;
  }
  const auto body = [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t u = blocks[b].begin; u < blocks[b].end; ++u) clip_unit<kind>(pairs[blocks[b].tensor], u, a);
    }
  };
  if (total <= kSerialMaxElems) {
    body(0, static_cast<int64_t>(blocks.size()));
  } else {
    at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, body);
  }
}

// Units longer than a chunk: one chunk of one unit per work item.
struct Piece {
  size_t tensor;
  int64_t offset, n;  // elements of the tensor, within one unit
};

template <NormKind kind>
void clip_long_units(const std::vector<UnitPair>& pairs, const AgcArgs& a) {
  std::vector<Piece> pieces;
  std::vector<std::pair<size_t, int64_t>> units;  // (tensor, unit), each unit's pieces consecutive
  for (size_t i = 0; i < pairs.size(); ++i) {
    const UnitPair& t = pairs[i];
    if (t.unit_len <= kChunkElems) continue;
    for (int64_t u = 0; u < t.units; ++u) {
      units.emplace_back(i, u);
      for (int64_t off = 0; off < t.unit_len; off += kChunkElems) {
        pieces.push_back({i, u * t.unit_len + off, std::min(kChunkElems, t.unit_len - off)});
      }
    }
  }
  if (pieces.empty()) return;
  const int64_t num_pieces = static_cast<int64_t>(pieces.size());
  std::vector<double> pparts(num_pieces), gparts(num_pieces);
  at::parallel_for(0, num_pieces, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const Piece& c = pieces[k];
      pparts[k] = span_partial<kind>(pairs[c.tensor].param, c.offset, c.n, a.p);
      gparts[k] = span_partial<kind>(pairs[c.tensor].grad, c.offset, c.n, a.p);
    }
  });
  std::vector<double> coef(num_pieces);
  int64_t k = 0;
  for (const auto& [i, u] : units) {  // partials of a unit combined in chunk order
    const UnitPair& t = pairs[i];
    const int64_t first = k;
    double pacc = 0.0, gacc = 0.0;
    for (; k < num_pieces && pieces[k].tensor == i && pieces[k].offset < (u + 1) * t.unit_len; ++k) {
      pacc = combine(pacc, pparts[k], kind);
      gacc = combine(gacc, gparts[k], kind);
    }
    const double pn = finished_norm<kind>(sub_span(t.param, u * t.unit_len, t.unit_len), pacc, a.p);
    const double gn = finished_norm<kind>(sub_span(t.grad, u * t.unit_len, t.unit_len), gacc, a.p);
    std::fill(coef.begin() + first, coef.begin() + k, agc_coef(pn, gn, a.clip_factor, a.eps));
  }
  at::parallel_for(0, num_pieces, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      if (coef[j] != 1.0)
        scale_span(pairs[pieces[j].tensor].grad, pieces[j].offset, pieces[j].n, coef[j], coef_factors(coef[j]));
    }
  });
}

template <NormKind kind>
void clip_units(const std::vector<UnitPair>& pairs, const AgcArgs& a) {
  clip_short_units<kind>(pairs, a);
  clip_long_units<kind>(pairs, a);
}

void adaptive_clip_grad_cpu(at::TensorList params, at::TensorList grads, double clip_factor, double eps,
                            double norm_type) {
  const char* op = "adaptive_clip_grad_";
  check_agc_inputs(params, grads, clip_factor, eps, norm_type, op);
  const std::vector<bool> repeated = repeated_grads(grads, op);  // a grad listed twice is clipped once

  std::vector<at::Tensor> param_copies;                        // kept alive while their spans are read
  std::vector<std::pair<at::Tensor, at::Tensor>> grad_copies;  // (grad, its copy), written back at the end
  std::vector<UnitPair> pairs;
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor &p = params[i], &g = grads[i];
    if (g.numel() == 0 || (!repeated.empty() && repeated[i])) continue;
    const at::Tensor pin = rows_in_place(p) ? p : param_copies.emplace_back(p.contiguous());
    at::Tensor gin = g;
    if (!rows_in_place(g)) gin = grad_copies.emplace_back(g, g.contiguous()).second;
    const int64_t units = g.dim() <= 1 ? 1 : g.size(0);
    const int64_t n = g.numel();
    pairs.push_back(
        {Span{pin.data_ptr(), n, p.scalar_type(), 0}, Span{gin.data_ptr(), n, g.scalar_type(), 0}, units, n / units});
  }
  const AgcArgs args{clip_factor, eps, norm_type};
  switch (norm_kind(norm_type)) {
    case NormKind::L1: clip_units<NormKind::L1>(pairs, args); break;
    case NormKind::L2: clip_units<NormKind::L2>(pairs, args); break;
    case NormKind::Inf: clip_units<NormKind::Inf>(pairs, args); break;
    default: clip_units<NormKind::P>(pairs, args); break;
  }
  for (const auto& [grad, copy] : grad_copies) grad.copy_(copy);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastclip, CPU, m) { m.impl("adaptive_clip_grad_", &adaptive_clip_grad_cpu); }

}  // namespace fastclip
