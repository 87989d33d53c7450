// The checks of fastclip::adaptive_clip_grad_'s inputs, shared by the CPU
// operator (cpu/agc_cpu.cpp) and the CUDA glue (cuda/norms_cuda.cpp), so both
// reject the same inputs with the same messages, before anything is touched.
#pragma once

#include <ATen/ATen.h>

#include "grad_checks.h"

namespace fastclip {

// Rows in place: a tensor whose units (rows, index 0) lie one after another
// in memory, each a dense block (its elements in any order: a norm does not
// care). Dense with dim 0 outermost is enough; others go through a copy.
inline bool rows_in_place(const at::Tensor& t) {
  if (!t.is_non_overlapping_and_dense()) return false;
  return t.dim() <= 1 || t.size(0) == 1 || t.stride(0) * t.size(0) == t.numel();
}

inline void check_agc_inputs(at::TensorList params, at::TensorList grads, double clip_factor, double eps,
                             double norm_type, const char* op) {
  check_norm_type(norm_type, op);
  TORCH_CHECK(clip_factor >= 0.0 && eps >= 0.0, "fastclip::", op,
              ": clip_factor and eps must be non-negative numbers, got ", clip_factor, " and ", eps);
  check_grads(grads, op);
  TORCH_CHECK(params.size() == grads.size(), "fastclip::", op, ": got ", params.size(), " params for ", grads.size(),
              " grads");
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.layout() == at::kStrided && is_fused_dtype(p.scalar_type()), "fastclip::", op,
                ": params must be dense float32, float64, float16 or bfloat16, got ", p.scalar_type(), " (param ", i,
                ")");
    TORCH_CHECK(p.device() == grads[i].device(), "fastclip::", op, ": param ", i, " is on ", p.device(),
                ", its grad on ", grads[i].device());
    TORCH_CHECK(p.sizes() == grads[i].sizes(), "fastclip::", op, ": param ", i, " has shape ", p.sizes(), ", its grad ",
                grads[i].sizes());
  }
}

}  // namespace fastclip
