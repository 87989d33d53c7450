// CUDA implementation of fastclip::adam_step_ (schema in csrc/ops.cpp): the
// params and their state as AdamTensorDesc, scratch from torch's caching
// allocator, one launch on the current stream (adam_kernels.cu). Only
// CPU-side torch headers, like clip_cuda.cpp, so it compile-checks against a
// CPU-only torch. Nothing is read from the device: lr, grad_scale and
// found_inf tensors on the device are read by the kernel, those on the CPU
// here; so with device tensors (and params that need no staging copy) the
// call can be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/DeviceAccelerator.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../adam_checks.h"
#include "../adam_layout.h"
#include "adam_kernels.h"
#include "glue.h"

namespace fastclip {
namespace {

using glue::check;
using glue::current_stream;
using glue::to_dtype;

// A one-element tensor as the kernel reads it: a float32 tensor on the device, or
// nullptr and its value read here when it is on the CPU (no device sync).
const float* device_float(const std::optional<at::Tensor>& t, const c10::Device& device, double* host_value,
                          std::vector<at::Tensor>& keep) {
  if (!t) return nullptr;
  if (t->device().is_cpu()) {
    *host_value = t->item<double>();
    return nullptr;
  }
  at::Tensor f = t->scalar_type() == at::kFloat ? *t : t->to(device, at::kFloat);
  keep.push_back(f);
  return f.const_data_ptr<float>();
}

at::Tensor adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                          at::IntArrayRef groups, at::ArrayRef<double> lrs, at::ArrayRef<double> beta1s,
                          at::ArrayRef<double> beta2s, at::ArrayRef<double> epss, at::ArrayRef<double> weight_decays,
                          at::TensorList lr_tensors, bool amsgrad, bool maximize, bool decoupled_weight_decay,
                          std::optional<double> max_norm, double norm_type, const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf, std::optional<at::ScalarType> norm_dtype_arg) {
  const AdamArgs a{params,
                   grads,
                   exp_avgs,
                   exp_avg_sqs,
                   max_exp_avg_sqs,
                   steps,
                   groups,
                   lrs,
                   beta1s,
                   beta2s,
                   epss,
                   weight_decays,
                   lr_tensors,
                   {amsgrad, maximize, decoupled_weight_decay},
                   max_norm,
                   norm_type,
                   grad_scale,
                   found_inf};
  check_adam_args(a);
  const at::ScalarType out_dtype = norm_dtype(grads, norm_dtype_arg, kAdamOp);
  if (params.empty()) return at::zeros({}, at::TensorOptions().dtype(out_dtype));  // routed here by grad_scale
  const c10::Device device = params[0].device();
  c10::DeviceGuard guard(device);

  std::vector<at::Tensor> keep;  // tensors whose pointers the launch reads
  gpu::AdamJob job{};
  job.kind = norm_kind(norm_type);
  job.p = norm_type;
  job.clip = max_norm.has_value();
  job.max_norm = max_norm.value_or(0.0);
  job.flags = a.flags;
  job.grad_scale_value = 1.0;
  job.grad_scale = device_float(grad_scale, device, &job.grad_scale_value, keep);
  double skip_value = 0.0;
  job.found_inf = device_float(found_inf, device, &skip_value, keep);
  job.skip_value = skip_value != 0.0;

  // One lr per group: a device tensor read by the kernel, or a value.
  std::vector<double> lr_values(lrs.begin(), lrs.end());
  std::vector<const void*> lr_ptrs(lrs.size(), nullptr);
  std::vector<bool> lr_double(lrs.size(), false);
  for (size_t g = 0; g < lr_tensors.size(); ++g) {
    const at::Tensor& lr = lr_tensors[g];
    if (lr.device().is_cpu()) {
      lr_values[g] = lr.item<double>();
      continue;
    }
    at::Tensor l = lr.scalar_type() == at::kFloat || lr.scalar_type() == at::kDouble ? lr : lr.to(at::kFloat);
    keep.push_back(l);
    lr_ptrs[g] = l.const_data_ptr();
    lr_double[g] = l.scalar_type() == at::kDouble;
  }

  AdamLayout layout;
  std::vector<gpu::AdamTensorDesc> descs;
  descs.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    job.float_acc |= grads[i].scalar_type() != at::kDouble && grads[i].numel() > 0;
    const at::Tensor ref = layout.param(params[i]);
    gpu::AdamTensorDesc d{};
    d.grad = {layout.flat(grads[i], ref, false), ref.numel(), 0, to_dtype(ref.scalar_type())};
    d.param = ref.numel() > 0 ? ref.data_ptr() : nullptr;
    d.exp_avg = layout.flat(exp_avgs[i], ref, true);
    d.exp_avg_sq = layout.flat(exp_avg_sqs[i], ref, true);
    d.max_exp_avg_sq = amsgrad ? layout.flat(max_exp_avg_sqs[i], ref, true) : nullptr;
    d.step = static_cast<float*>(steps[i].data_ptr());
    const size_t g = static_cast<size_t>(groups[i]);
    d.lr = lr_ptrs[g];
    d.lr_double = lr_double[g];
    d.hyper = a.hyper(g, lr_values[g]);
    descs.push_back(d);
  }

  at::Tensor norm = at::empty({}, at::TensorOptions().dtype(out_dtype).device(device));
  job.norm_out = norm.data_ptr();
  job.norm_out_dtype = to_dtype(out_dtype);
  const int n = static_cast<int>(descs.size());
  const gpu::Plan plan = gpu::adam_plan(descs.data(), n);
  at::Tensor ws = plan.workspace_bytes == 0 ? at::Tensor()
                                            : at::empty({static_cast<int64_t>(plan.workspace_bytes)},
                                                        at::TensorOptions().dtype(at::kByte).device(device));
  check(gpu::adam_step(descs.data(), n, plan, job, ws.defined() ? ws.data_ptr() : nullptr, current_stream(device)),
        kAdamOp);
  layout.finish();
  return norm;
}

}  // namespace
}  // namespace fastclip

TORCH_LIBRARY_IMPL(fastclip, CUDA, m) { m.impl("adam_step_", &fastclip::adam_step_cuda); }
