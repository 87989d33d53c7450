// Scalar maths shared by the CPU operator, the CUDA glue and the CUDA kernels:
// how a norm type is encoded, how chunk partials become a norm, and the clip
// coefficient. Plain C++ (no torch, no CUDA headers) so nvcc and g++ both take it.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTCLIP_HD __host__ __device__ __forceinline__
#else
#define FASTCLIP_HD inline
#endif

namespace fastclip {

// Elements per chunk of the flattened index space. Each chunk yields one
// partial; partials are combined in index order, so a fixed chunk size makes
// the norm independent of thread or block count (bitwise reproducible).
constexpr int64_t kChunkElems = int64_t{1} << 16;

enum class NormKind : int32_t { L1 = 0, L2 = 1, Inf = 2, P = 3 };

// Only p > 0 and inf reach the fused operators; p <= 0 takes the reference path.
inline NormKind norm_kind(double p) {
  if (std::isinf(p)) return NormKind::Inf;
  if (p == 1.0) return NormKind::L1;
  if (p == 2.0) return NormKind::L2;
  return NormKind::P;
}

// |x|^p, the summand of one element (for Inf: |x|, combined with nan_max).
template <typename acc_t>
FASTCLIP_HD acc_t norm_term(acc_t x, NormKind kind, acc_t p) {
  switch (kind) {
    case NormKind::L2: return x * x;
    case NormKind::P: return std::pow(std::fabs(x), p);
    default: return std::fabs(x);
  }
}

// max that propagates NaN, as torch's inf-norm does.
template <typename acc_t>
FASTCLIP_HD acc_t nan_max(acc_t a, acc_t b) {
  return (a != a || a > b) ? a : b;
}

template <typename acc_t>
FASTCLIP_HD acc_t combine(acc_t a, acc_t b, NormKind kind) {
  return kind == NormKind::Inf ? nan_max(a, b) : a + b;
}

// The norm from the combined partials (sum of |x|^p, or max |x|).
FASTCLIP_HD double finish_norm(double acc, NormKind kind, double p) {
  switch (kind) {
    case NormKind::L2: return std::sqrt(acc);
    case NormKind::P: return std::pow(acc, 1.0 / p);
    default: return acc;
  }
}

// torch's formula, min(max_norm / (norm + 1e-6), 1), evaluated in double: the
// norm of fp32 grads may be finite yet above FLT_MAX, and the coefficient of an
// exploding set may be below FLT_MIN, where a float evaluation gives 0 and
// zeroes the grads. NaN stays NaN (torch.clamp propagates it), so a NaN norm
// poisons the grads exactly as torch's does; an inf norm gives 0, as torch.
FASTCLIP_HD double clip_coef(double max_norm, double norm) {
  const double c = max_norm / (norm + 1e-6);
  return c > 1.0 ? 1.0 : c;
}

// A coefficient applied to float/half grads as x * hi * lo, both normal floats,
// so a coefficient below FLT_MIN (a float subnormal: few significant bits)
// keeps its full precision. lo is 1 except in that rare case, and x * hi * 1 is
// bitwise x * hi. With lo = 2^-126, hi = coef * 2^126 is normal down to
// coef = 2^-252; below that x * coef < FLT_MAX * 2^-252 < 2^-124 is (nearly) a
// float subnormal itself, so hi's own few bits are all the result can hold.
// x * hi never overflows (hi < 1), and a product that would underflow there
// is below 2^-252 once scaled: 0 in float either way.
struct CoefFactors {
  float hi, lo;
};
FASTCLIP_HD CoefFactors coef_factors(double coef) {
  constexpr double kFloatMin = 1.17549435082228750797e-38;  // FLT_MIN = 2^-126
  if (coef > 0 && coef < kFloatMin) return {static_cast<float>(coef * 0x1p126), 0x1p-126f};
  return {static_cast<float>(coef), 1.0f};
}

// The fast sum of |x|^p is accumulated in float (double for fp64 grads). It is
// redone by the rescue pass (max |x| first, then the sum of (|x| / max)^p in
// double, as BLAS nrm2 does) when it overflowed (inf while every element may
// be finite) or is so small that subnormal terms lost precision. Inf-norms
// never need it, nor does L1 underflow (|x| is exact). The check costs one
// comparison on the normal path.
FASTCLIP_HD bool needs_rescue(double acc, NormKind kind, bool float_acc) {
  if (kind == NormKind::Inf) return false;
  if (acc > 1.7976931348623157e308) return true;  // +inf (NaN is not rescued: a NaN element)
  if (kind == NormKind::L1) return false;
  // Below 2^24 (2^53) times the smallest normal, subnormal terms may matter.
  const double tiny = float_acc ? 0x1p-102 : 0x1p-969;
  return acc < tiny;
}

// The norm from the rescue pass: max_abs and the sum of (|x| / max_abs)^p.
FASTCLIP_HD double rescued_norm(double max_abs, double scaled_sum, NormKind kind, double p) {
  return max_abs * finish_norm(scaled_sum, kind, p);
}

// The summand of the rescue pass, in double. A division, not a multiply by
// 1 / max_abs: that reciprocal overflows when max_abs is subnormal.
FASTCLIP_HD double scaled_term(double x, double max_abs, NormKind kind, double p) {
  return norm_term<double>(x / max_abs, kind, p);
}

// Added for adaptive clipping (AGC, Brock et al. 2021, in timm's form): the
// coefficient of one unit. The unit's grad norm is held to
// max = clip_factor * max(param_norm, eps); a unit at or above it is scaled by
// max / max(grad_norm, 1e-6), others are left alone (1: no write). NaN in
// either norm gives NaN, as torch's clamp/where do.
FASTCLIP_HD double agc_coef(double param_norm, double grad_norm, double clip_factor, double eps) {
  const double max_norm = clip_factor * nan_max(param_norm, eps);
  if (grad_norm < max_norm) return 1.0;
  return max_norm / nan_max(grad_norm, 1e-6);
}

}  // namespace fastclip
