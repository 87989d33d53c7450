// CUDA implementations of the fastclip operators: turn the grads into
// TensorDesc, allocate scratch through torch's caching allocator and launch
// on the current stream (clip_kernels.cu). Only CPU-side torch headers: the
// stream comes through the device-generic accelerator API, so this file also
// compiles against a CPU-only torch (CI compile-checks it there).
#include <ATen/ATen.h>
#include <ATen/DeviceAccelerator.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <optional>
#include <utility>
#include <vector>

#include "../grad_checks.h"
#include "clip_kernels.h"
#include "glue.h"

namespace fastclip {
namespace {

using glue::check;
using glue::current_stream;
using glue::to_dtype;

// The grads as flat spans. A grad that is not one dense span (a strided view,
// an expanded tensor) or not element-aligned is replaced by a contiguous copy;
// the scaling ops copy the result back (as the CPU operator does). A grad
// listed twice is counted and scaled once (grad_checks.h).
struct Grads {
  c10::Device device;
  std::vector<gpu::TensorDesc> descs;
  std::vector<std::pair<at::Tensor, at::Tensor>> copies;  // (grad, its contiguous copy)
  bool float_acc = false;                                 // some grad is accumulated in float (not fp64)
};

Grads gather(at::TensorList grads, const char* op) {
  check_grads(grads, op);
  const std::vector<bool> repeated = repeated_grads(grads, op);
  Grads out{grads[0].device(), {}, {}, false};
  out.descs.reserve(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    if (g.numel() == 0 || (!repeated.empty() && repeated[i])) continue;
    out.float_acc |= g.scalar_type() != at::kDouble;
    at::Tensor span = g;
    const bool aligned = reinterpret_cast<uintptr_t>(g.data_ptr()) % g.element_size() == 0;
    if (!g.is_non_overlapping_and_dense() || !aligned) {
      span = g.clone(at::MemoryFormat::Contiguous);
      out.copies.emplace_back(g, span);
    }
    // Dense (even if permuted) means numel consecutive elements from data_ptr.
    out.descs.push_back({span.data_ptr(), span.numel(), 0, to_dtype(g.scalar_type())});
  }
  return out;
}

at::Tensor workspace(const c10::Device& device, size_t bytes) {
  return bytes == 0 ? at::Tensor()
                    : at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).device(device));
}

void copy_back(const Grads& g) {
  for (const auto& [grad, span] : g.copies) grad.copy_(span);
}

// total_norm and clip_grad_norm_ share everything but the scaling. The norm
// is returned in `requested` if given, else float64/float32.
at::Tensor norm_impl(at::TensorList grads, double norm_type, bool clip, double max_norm,
                     std::optional<at::ScalarType> requested, const char* op) {
  check_norm_type(norm_type, op);
  if (clip) check_max_norm(max_norm, op);
  c10::DeviceGuard guard(grads[0].device());  // the dispatcher comes here only for a list holding a CUDA tensor
  const at::ScalarType out_dtype = norm_dtype(grads, requested, op);  // before any grad is touched
  Grads g = gather(grads, op);
  if (g.descs.empty()) return at::zeros({}, at::TensorOptions().dtype(out_dtype).device(g.device));

  at::Tensor norm = at::empty({}, at::TensorOptions().dtype(out_dtype).device(g.device));
  const gpu::Plan plan = gpu::plan(g.descs.data(), static_cast<int>(g.descs.size()), /*reduce=*/true);
  at::Tensor ws = workspace(g.device, plan.workspace_bytes);  // none for a small set
  check(gpu::norm_and_clip(g.descs.data(), static_cast<int>(g.descs.size()), plan, norm_kind(norm_type), norm_type,
                           clip, max_norm, g.float_acc, norm.data_ptr(), to_dtype(out_dtype),
                           ws.defined() ? ws.data_ptr() : nullptr, current_stream(g.device)),
        op);
  if (clip) copy_back(g);
  return norm;
}

at::Tensor total_norm_cuda(at::TensorList grads, double norm_type, std::optional<at::ScalarType> requested) {
  return norm_impl(grads, norm_type, /*clip=*/false, 0.0, requested, "total_norm");
}

at::Tensor clip_grad_norm_cuda(at::TensorList grads, double max_norm, double norm_type,
                               std::optional<at::ScalarType> requested) {
  return norm_impl(grads, norm_type, /*clip=*/true, max_norm, requested, "clip_grad_norm_");
}

void scale_cuda(at::TensorList grads, const at::Tensor& coef) {
  if (grads.empty()) return;  // routed here by a CUDA coef
  c10::DeviceGuard guard(grads[0].device());
  TORCH_CHECK(coef.numel() == 1 && coef.device() == grads[0].device() &&
                  (coef.scalar_type() == at::kFloat || coef.scalar_type() == at::kDouble),
              "fastclip::scale_: coef must be a one-element float32/float64 tensor on the grads' device");
  Grads g = gather(grads, "scale_");
  if (g.descs.empty()) return;
  const at::Tensor c = coef.contiguous();  // keeps c alive until the launch is enqueued
  const gpu::Plan plan = gpu::plan(g.descs.data(), static_cast<int>(g.descs.size()), /*reduce=*/false);
  at::Tensor ws = workspace(g.device, plan.workspace_bytes);
  check(gpu::scale(g.descs.data(), static_cast<int>(g.descs.size()), plan, c.data_ptr(), c.scalar_type() == at::kDouble,
                   ws.defined() ? ws.data_ptr() : nullptr, current_stream(g.device)),
        "scale_");
  copy_back(g);
}

}  // namespace
}  // namespace fastclip

TORCH_LIBRARY_IMPL(fastclip, CUDA, m) {
  m.impl("total_norm", &fastclip::total_norm_cuda);
  m.impl("scale_", &fastclip::scale_cuda);
  m.impl("clip_grad_norm_", &fastclip::clip_grad_norm_cuda);
}
