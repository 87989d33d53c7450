// The Autograd-key kernels of the ops that scale grads in place: what torch's
// own in-place ops do at that key, written out so that a call stays unboxed.
// Without them every call goes through torch's boxed autograd fallback, which
// costs about a fifth of a small model's whole clip on the CPU and bumps no
// version counter. Here: refuse a differentiable call (clipping is not
// differentiable; torch clips under no_grad, as fastclip's Python API does),
// run the op below autograd, and bump the version counter of every grad it
// may have written, as torch's mul_ does.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>

namespace fastclip {
namespace {

void check_not_differentiable(at::TensorList grads, const char* op) {
  if (!at::GradMode::is_enabled()) return;
  for (const at::Tensor& g : grads) {
    TORCH_CHECK(!g.requires_grad(), "fastclip::", op,
                ": a grad that requires grad, in grad mode: clipping is not differentiable; call it under "
                "torch.no_grad(), as torch.nn.utils.clip_grad_norm_ does");
  }
}

void bump_versions(at::TensorList grads) {
  for (const at::Tensor& g : grads) g.unsafeGetTensorImpl()->bump_version();
}

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

at::Tensor clip_grad_norm_autograd(c10::DispatchKeySet ks, at::TensorList grads, double max_norm, double norm_type,
                                   std::optional<at::ScalarType> norm_dtype) {
  using Sig = at::Tensor(at::TensorList, double, double, std::optional<at::ScalarType>);
  static const auto op = op_handle<Sig>("fastclip::clip_grad_norm_");
  check_not_differentiable(grads, "clip_grad_norm_");
  at::Tensor norm;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    norm = op.redispatch(ks & c10::after_ADInplaceOrView_keyset, grads, max_norm, norm_type, norm_dtype);
  }
  bump_versions(grads);
  return norm;
}

void scale_autograd(c10::DispatchKeySet ks, at::TensorList grads, const at::Tensor& coef) {
  static const auto op = op_handle<void(at::TensorList, const at::Tensor&)>("fastclip::scale_");
  check_not_differentiable(grads, "scale_");
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.redispatch(ks & c10::after_ADInplaceOrView_keyset, grads, coef);
  }
  bump_versions(grads);
}

at::Tensor per_layer_autograd(c10::DispatchKeySet ks, at::TensorList grads, at::IntArrayRef groups, double max_norm,
                              double norm_type) {
  static const auto op =
      op_handle<at::Tensor(at::TensorList, at::IntArrayRef, double, double)>("fastclip::clip_grad_norm_per_layer_");
  check_not_differentiable(grads, "clip_grad_norm_per_layer_");
  at::Tensor norms;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    norms = op.redispatch(ks & c10::after_ADInplaceOrView_keyset, grads, groups, max_norm, norm_type);
  }
  bump_versions(grads);
  return norms;
}

void agc_autograd(c10::DispatchKeySet ks, at::TensorList params, at::TensorList grads, double clip_factor, double eps,
                  double norm_type) {
  static const auto op =
      op_handle<void(at::TensorList, at::TensorList, double, double, double)>("fastclip::adaptive_clip_grad_");
  check_not_differentiable(grads, "adaptive_clip_grad_");  // params are read only: they may require grad
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.redispatch(ks & c10::after_ADInplaceOrView_keyset, params, grads, clip_factor, eps, norm_type);
  }
  bump_versions(grads);
}

}  // namespace
}  // namespace fastclip

TORCH_LIBRARY_IMPL(fastclip, Autograd, m) {
  m.impl("clip_grad_norm_", &fastclip::clip_grad_norm_autograd);
  m.impl("scale_", &fastclip::scale_autograd);
  m.impl("clip_grad_norm_per_layer_", &fastclip::per_layer_autograd);
  m.impl("adaptive_clip_grad_", &fastclip::agc_autograd);
}
