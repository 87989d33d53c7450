// Adam/AdamW's arithmetic, shared by the CPU operator (cpu/adam_cpu.cpp) and
// the CUDA kernel (cuda/adam_kernels.cu): the per-tensor scalars of one step
// and the update of one element. Plain C++ (no torch, no CUDA headers), like
// clip_math.h, so nvcc and g++ both take it.
//
// The formulas are torch's fused Adam's (aten/src/ATen/native/cpu/
// FusedAdamKernel.cpp and cuda/fused_adam_utils.cuh): the step's scalars in
// double, the element update in the accumulator type (float for 16- and
// 32-bit params, double for fp64), exp_avg as torch's lerp. The gradient
// enters already multiplied by the clip coefficient (clip_math.h:
// coef_factors), exactly as fastclip's clip would have left it in memory.
#pragma once

#include <cmath>

#include "clip_math.h"

namespace fastclip {

// One param group's hyperparameters (torch's names). lr is the value of the
// group's lr, a float or the current value of its lr tensor.
struct AdamHyper {
  double lr, beta1, beta2, eps, weight_decay;
};

// What does not depend on the element, for one tensor at one step (t: the
// step count after this step's increment).
struct AdamScalars {
  double step_size;       // lr / (1 - beta1^t)
  double bias2_sqrt;      // sqrt(1 - beta2^t)
  double decay;           // AdamW: 1 - lr * weight_decay; Adam: 1 (unused)
  double lerp_weight;     // 1 - beta1: exp_avg.lerp_(grad, 1 - beta1)
  double grad_sq_weight;  // 1 - beta2
  double beta2, eps, weight_decay;
};

FASTCLIP_HD AdamScalars adam_scalars(const AdamHyper& h, double t, bool decoupled) {
  AdamScalars s;
  s.step_size = h.lr / (1.0 - std::pow(h.beta1, t));
  s.bias2_sqrt = std::sqrt(1.0 - std::pow(h.beta2, t));
  s.decay = decoupled ? 1.0 - h.lr * h.weight_decay : 1.0;
  s.lerp_weight = 1.0 - h.beta1;
  s.grad_sq_weight = 1.0 - h.beta2;
  s.beta2 = h.beta2;
  s.eps = h.eps;
  s.weight_decay = h.weight_decay;
  return s;
}

// The op-wide switches (the same in every param group: fastclip/optim.py checks).
struct AdamFlags {
  bool amsgrad, maximize, decoupled;
};

// torch's lerp(a, b, w): a + w * (b - a) for |w| < 0.5, else b - (b - a) * (1 - w),
// the form that is exact at both ends.
template <typename acc_t>
FASTCLIP_HD acc_t adam_lerp(acc_t a, acc_t b, acc_t w) {
  return std::fabs(w) < acc_t(0.5) ? a + w * (b - a) : b - (b - a) * (acc_t(1) - w);
}

// One element's update. g: the clipped gradient. max_sq is read and written
// only with amsgrad.
template <typename acc_t>
FASTCLIP_HD void adam_element(acc_t& param, acc_t g, acc_t& exp_avg, acc_t& exp_avg_sq, acc_t* max_sq,
                              const AdamScalars& s, AdamFlags f) {
  if (f.maximize) g = -g;
  if (s.weight_decay != 0) {
    if (f.decoupled) {
      param = param * acc_t(s.decay);
    } else {
      g = g + param * acc_t(s.weight_decay);
    }
  }
  exp_avg = adam_lerp(exp_avg, g, acc_t(s.lerp_weight));
  exp_avg_sq = exp_avg_sq * acc_t(s.beta2) + acc_t(s.grad_sq_weight) * g * g;
  acc_t second = exp_avg_sq;
  if (f.amsgrad) {
    *max_sq = nan_max(*max_sq, second);
    second = *max_sq;
  }
  const acc_t denom = std::sqrt(second) / acc_t(s.bias2_sqrt) + acc_t(s.eps);
  param = param - acc_t(s.step_size) * exp_avg / denom;
}

// The factor the grads are multiplied by: the clip coefficient of `norm` (1
// without a clip), divided by a GradScaler's scale when one is given
// (grad_scale: the scale the grads carry; norm: that of the unscaled grads).
FASTCLIP_HD double adam_grad_factor(bool clip, double max_norm, double norm, double grad_scale) {
  return (clip ? clip_coef(max_norm, norm) : 1.0) / grad_scale;
}

}  // namespace fastclip
