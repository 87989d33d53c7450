// The Autograd-key kernels of the ops that write tensors in place (the clips
// scale grads; adam_step_ updates params and moments): what torch's own in-place
// ops do at that key, written out so that a call stays unboxed. Without them
// every call goes through torch's boxed autograd fallback, which costs about a
// fifth of a small model's whole clip on the CPU and bumps no version counter.
// Here: refuse a differentiable call (neither clipping nor the optimizer step is
// differentiable; torch runs both under no_grad, as fastclip's Python API does),
// run the op below autograd, and bump the version counter of every tensor it
// may have written, as torch's mul_ does.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <initializer_list>
#include <optional>
#include <type_traits>
#include <utility>

#include "adam_checks.h"

namespace fastclip {
namespace {

using Written = std::initializer_list<at::TensorList>;

void check_not_differentiable(Written written, const char* op) {
  if (!at::GradMode::is_enabled()) return;
  for (at::TensorList list : written) {
    for (const at::Tensor& t : list) {
      TORCH_CHECK(!t.requires_grad(), "fastclip::", op,
                  ": a tensor it writes in place requires grad, in grad mode: clipping is not differentiable; "
                  "call it under torch.no_grad(), as torch.nn.utils.clip_grad_norm_ and torch's optimizers do");
    }
  }
}

void bump_versions(Written written) {
  for (at::TensorList list : written) {
    for (const at::Tensor& t : list) t.unsafeGetTensorImpl()->bump_version();
  }
}

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// op(args...) below autograd, for an op that writes the `written` lists (among its args) in place.
template <typename Return, typename... Params, typename... Args>
Return run_in_place(const c10::TypedOperatorHandle<Return(Params...)>& op, c10::DispatchKeySet ks, Written written,
                    const char* name, Args&&... args) {
  check_not_differentiable(written, name);
  at::AutoDispatchBelowADInplaceOrView below;
  const c10::DispatchKeySet below_keys = ks & c10::after_ADInplaceOrView_keyset;
  if constexpr (std::is_void_v<Return>) {
    op.redispatch(below_keys, std::forward<Args>(args)...);
    bump_versions(written);
  } else {
    Return out = op.redispatch(below_keys, std::forward<Args>(args)...);
    bump_versions(written);
    return out;
  }
}

at::Tensor clip_grad_norm_autograd(c10::DispatchKeySet ks, at::TensorList grads, double max_norm, double norm_type,
                                   std::optional<at::ScalarType> norm_dtype) {
  static const auto op =
      op_handle<at::Tensor(at::TensorList, double, double, std::optional<at::ScalarType>)>("fastclip::clip_grad_norm_");
  return run_in_place(op, ks, {grads}, "clip_grad_norm_", grads, max_norm, norm_type, norm_dtype);
}

void scale_autograd(c10::DispatchKeySet ks, at::TensorList grads, const at::Tensor& coef) {
  static const auto op = op_handle<void(at::TensorList, const at::Tensor&)>("fastclip::scale_");
  run_in_place(op, ks, {grads}, "scale_", grads, coef);
}

at::Tensor per_layer_autograd(c10::DispatchKeySet ks, at::TensorList grads, at::IntArrayRef groups, double max_norm,
                              double norm_type) {
  static const auto op =
      op_handle<at::Tensor(at::TensorList, at::IntArrayRef, double, double)>("fastclip::clip_grad_norm_per_layer_");
  return run_in_place(op, ks, {grads}, "clip_grad_norm_per_layer_", grads, groups, max_norm, norm_type);
}

// params are only read: they may require grad.
void agc_autograd(c10::DispatchKeySet ks, at::TensorList params, at::TensorList grads, double clip_factor, double eps,
                  double norm_type) {
  static const auto op =
      op_handle<void(at::TensorList, at::TensorList, double, double, double)>("fastclip::adaptive_clip_grad_");
  run_in_place(op, ks, {grads}, "adaptive_clip_grad_", params, grads, clip_factor, eps, norm_type);
}

at::Tensor adam_autograd(c10::DispatchKeySet ks, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                         at::IntArrayRef groups, at::ArrayRef<double> lrs, at::ArrayRef<double> beta1s,
                         at::ArrayRef<double> beta2s, at::ArrayRef<double> epss, at::ArrayRef<double> weight_decays,
                         at::TensorList lr_tensors, bool amsgrad, bool maximize, bool decoupled_weight_decay,
                         std::optional<double> max_norm, double norm_type, const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf, std::optional<at::ScalarType> norm_dtype) {
  static const auto op = op_handle<AdamStepFn>("fastclip::adam_step_");
  return run_in_place(op, ks, {params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps}, "adam_step_", params, grads,
                      exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, groups, lrs, beta1s, beta2s, epss, weight_decays,
                      lr_tensors, amsgrad, maximize, decoupled_weight_decay, max_norm, norm_type, grad_scale, found_inf,
                      norm_dtype);
}

}  // namespace
}  // namespace fastclip

TORCH_LIBRARY_IMPL(fastclip, Autograd, m) {
  m.impl("clip_grad_norm_", &fastclip::clip_grad_norm_autograd);
  m.impl("scale_", &fastclip::scale_autograd);
  m.impl("clip_grad_norm_per_layer_", &fastclip::per_layer_autograd);
  m.impl("adaptive_clip_grad_", &fastclip::agc_autograd);
  m.impl("adam_step_", &fastclip::adam_autograd);
}
