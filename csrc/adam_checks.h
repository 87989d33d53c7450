// adam_step_'s arguments (schema in csrc/ops.cpp) and their checks, in one
// place for the CPU operator (cpu/adam_cpu.cpp) and the CUDA glue
// (cuda/adam_cuda.cpp): every check runs before anything is touched, and both
// backends reject the same input with the same message.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "adam_math.h"
#include "grad_checks.h"

namespace fastclip {

constexpr const char* kAdamOp = "adam_step_";

// adam_step_'s C++ signature, for the typed calls through the dispatcher
// (autograd.cpp, eager_adam.h).
using AdamStepFn = at::Tensor(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                              at::TensorList, at::IntArrayRef, at::ArrayRef<double>, at::ArrayRef<double>,
                              at::ArrayRef<double>, at::ArrayRef<double>, at::ArrayRef<double>, at::TensorList, bool,
                              bool, bool, std::optional<double>, double, const std::optional<at::Tensor>&,
                              const std::optional<at::Tensor>&, std::optional<at::ScalarType>);

struct AdamArgs {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps;
  at::IntArrayRef groups;                                         // param i belongs to group groups[i]
  at::ArrayRef<double> lrs, beta1s, beta2s, epss, weight_decays;  // one per group
  at::TensorList lr_tensors;                                      // empty, or one per group (read instead of lrs)
  AdamFlags flags;
  std::optional<double> max_norm;  // none: no clip (the norm is still computed)
  double norm_type;
  const std::optional<at::Tensor>& grad_scale;
  const std::optional<at::Tensor>& found_inf;

  size_t num_groups() const { return lrs.size(); }
  AdamHyper hyper(size_t group, double lr) const {
    return {lr, beta1s[group], beta2s[group], epss[group], weight_decays[group]};
  }
};

inline void check_like_param(const at::Tensor& t, const at::Tensor& p, const char* what, size_t i) {
  TORCH_CHECK(t.device() == p.device(), "fastclip::", kAdamOp, ": ", what, "[", i, "] is on ", t.device(),
              ", its param on ", p.device());
  TORCH_CHECK(t.scalar_type() == p.scalar_type(), "fastclip::", kAdamOp, ": ", what, "[", i, "] has dtype ",
              t.scalar_type(), ", its param ", p.scalar_type());
  TORCH_CHECK(t.sizes() == p.sizes(), "fastclip::", kAdamOp, ": ", what, "[", i, "] has shape ", t.sizes(),
              ", its param ", p.sizes());
}

// A one-element floating tensor on `device` or on the CPU (read on the host there).
inline void check_scalar_tensor(const at::Tensor& t, const c10::Device& device, const char* what) {
  TORCH_CHECK(t.numel() == 1 && t.is_floating_point() && (t.device() == device || t.device().is_cpu()),
              "fastclip::", kAdamOp, ": ", what,
              " must be a one-element floating-point tensor on the params' device or the CPU");
}

inline void check_adam_args(const AdamArgs& a) {
  const size_t n = a.params.size();
  TORCH_CHECK(a.grads.size() == n && a.exp_avgs.size() == n && a.exp_avg_sqs.size() == n && a.steps.size() == n &&
                  a.groups.size() == n,
              "fastclip::", kAdamOp,
              ": params, grads, exp_avgs, exp_avg_sqs, steps and groups must have one entry per param");
  TORCH_CHECK(a.max_exp_avg_sqs.size() == (a.flags.amsgrad ? n : 0), "fastclip::", kAdamOp,
              ": max_exp_avg_sqs must hold one tensor per param with amsgrad, none without");
  const size_t g = a.num_groups();
  TORCH_CHECK(a.beta1s.size() == g && a.beta2s.size() == g && a.epss.size() == g && a.weight_decays.size() == g &&
                  (a.lr_tensors.empty() || a.lr_tensors.size() == g),
              "fastclip::", kAdamOp,
              ": lrs, beta1s, beta2s, epss, weight_decays (and lr_tensors, if any) need one value per group");
  for (const int64_t id : a.groups) {
    TORCH_CHECK(id >= 0 && id < static_cast<int64_t>(g), "fastclip::", kAdamOp, ": group ids must be in [0, ", g,
                "), got ", id);
  }
  check_norm_type(a.norm_type, kAdamOp);
  if (a.max_norm) check_max_norm(*a.max_norm, kAdamOp);
  if (n == 0) return;
  const c10::Device device = a.params[0].device();
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = a.params[i];
    TORCH_CHECK(is_fused_dtype(p.scalar_type()), "fastclip::", kAdamOp,
                ": params must be float32, float64, float16 or bfloat16, got ", p.scalar_type());
    TORCH_CHECK(p.device() == device, "fastclip::", kAdamOp, ": all params must be on one device, got ", device,
                " and ", p.device());
    check_like_param(a.grads[i], p, "grads", i);
    check_like_param(a.exp_avgs[i], p, "exp_avgs", i);
    check_like_param(a.exp_avg_sqs[i], p, "exp_avg_sqs", i);
    if (a.flags.amsgrad) check_like_param(a.max_exp_avg_sqs[i], p, "max_exp_avg_sqs", i);
    // float32 on the param's device, as torch's fused and capturable Adam keep it.
    const at::Tensor& s = a.steps[i];
    TORCH_CHECK(s.numel() == 1 && s.device() == device && s.scalar_type() == at::kFloat, "fastclip::", kAdamOp,
                ": steps[", i, "] must be a one-element float32 tensor on its param's device");
  }
  for (const at::Tensor& lr : a.lr_tensors) check_scalar_tensor(lr, device, "each lr tensor");
  if (a.grad_scale) check_scalar_tensor(*a.grad_scale, device, "grad_scale");
  if (a.found_inf) check_scalar_tensor(*a.found_inf, device, "found_inf");
}

}  // namespace fastclip
