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

// torch's formula, min(max_norm / (norm + 1e-6), 1), evaluated in the norm's
// precision (float for fp32/fp16/bf16 sets, double when fp64 is involved).
// NaN stays NaN (torch.clamp propagates it), so a NaN norm poisons the grads
// exactly as torch's does.
template <typename real_t>
FASTCLIP_HD real_t clip_coef(double max_norm, double norm) {
  real_t c = static_cast<real_t>(max_norm) / (static_cast<real_t>(norm) + static_cast<real_t>(1e-6));
  return c > real_t(1) ? real_t(1) : c;
}

}  // namespace fastclip
