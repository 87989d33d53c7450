// CUDA implementations of per_tensor_norms, clip_grad_norm_per_layer_ and
// adaptive_clip_grad_ (schemas in csrc/ops.cpp): tensors -> TensorDesc,
// scratch from torch's caching allocator, launches on the current stream
// (norms_kernels.cu). Only CPU-side torch headers, like clip_cuda.cpp, so it
// compile-checks against a CPU-only torch.
//
// Launches: per_tensor_norms, and local clipping with one group per grad,
// are one cooperative launch. Local clipping with layer groups, or with a
// grad listed twice, is the norms launch, a few ATen ops on the device for
// the group norms and coefficients, and a scale launch (no host sync; the
// group ids are copied to the device, so that form is not graph-capturable).
// AGC is one launch.
#include <ATen/ATen.h>
#include <ATen/DeviceAccelerator.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <utility>
#include <vector>

#include "../agc_checks.h"
#include "../grad_checks.h"
#include "glue.h"
#include "norms_kernels.h"

namespace fastclip {
namespace {

using glue::check;
using glue::current_stream;
using glue::to_dtype;

at::Tensor workspace(const c10::Device& device, size_t bytes) {
  return at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 16))},
                   at::TensorOptions().dtype(at::kByte).device(device));
}

bool aligned(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % t.element_size() == 0; }

// Every tensor as one descriptor, in list order (zero-size ones included:
// they own no tile and get norm 0). A tensor that is not one dense,
// element-aligned span is read (and scaled) through a contiguous copy.
struct Spans {
  std::vector<gpu::TensorDesc> descs;
  std::vector<std::pair<at::Tensor, at::Tensor>> copies;  // (tensor, its contiguous copy)
  bool any_double = false;
};

Spans spans_of(at::TensorList ts) {
  Spans s;
  s.descs.reserve(ts.size());
  for (const at::Tensor& t : ts) {
    s.any_double |= t.scalar_type() == at::kDouble;
    at::Tensor span = t;
    if (t.numel() > 0 && (!t.is_non_overlapping_and_dense() || !aligned(t))) {
      span = t.clone(at::MemoryFormat::Contiguous);
      s.copies.emplace_back(t, span);
    }
    s.descs.push_back({t.numel() > 0 ? span.data_ptr() : nullptr, t.numel(), 0, to_dtype(t.scalar_type())});
  }
  return s;
}

void copy_back(const Spans& s) {
  for (const auto& [t, span] : s.copies) t.copy_(span);
}

// The per-tensor norms launch (clip: also scaled by their own coefficients).
at::Tensor launch_per_tensor(Spans& s, const c10::Device& device, double norm_type, bool clip, double max_norm,
                             const char* op) {
  const int n = static_cast<int>(s.descs.size());
  at::Tensor norms = at::empty({n}, at::TensorOptions().dtype(s.any_double ? at::kDouble : at::kFloat).device(device));
  const gpu::Plan plan = gpu::plan(s.descs.data(), n, /*reduce=*/true);
  at::Tensor ws = workspace(device, gpu::per_tensor_workspace(plan, n));
  check(gpu::per_tensor(s.descs.data(), n, plan, norm_kind(norm_type), norm_type, clip, max_norm, norms.data_ptr(),
                        s.any_double, ws.data_ptr(), current_stream(device)),
        op);
  return norms;
}

at::Tensor per_tensor_norms_cuda(at::TensorList tensors, double norm_type) {
  const char* op = "per_tensor_norms";
  check_norm_type(norm_type, op);
  check_grads(tensors, op);
  if (tensors.empty()) return at::empty({0}, at::TensorOptions().dtype(at::kFloat));
  c10::DeviceGuard guard(tensors[0].device());
  Spans s = spans_of(tensors);
  return launch_per_tensor(s, tensors[0].device(), norm_type, /*clip=*/false, 0.0, op);
}

// Each group's p-norm from its members' norms (double, on the device), with
// the CPU's overflow-safe form: max * (sum of (n / max)^p)^(1/p).
at::Tensor group_norms(const at::Tensor& norms, const at::Tensor& ids, int64_t num_groups, double p) {
  const at::Tensor mx = at::zeros({num_groups}, norms.options()).index_reduce_(0, ids, norms, "amax");
  if (std::isinf(p)) return mx;
  const at::Tensor m = mx.index_select(0, ids);
  const at::Tensor ratio = at::where(m > 0, norms / m, at::zeros_like(norms)).pow(p);
  const at::Tensor sum = at::zeros({num_groups}, norms.options()).index_add_(0, ids, ratio);
  const at::Tensor scaled = mx * sum.pow(1.0 / p);
  return at::where(at::isfinite(mx) & (mx > 0), scaled, mx);  // 0, inf and NaN stand as they are
}

at::Tensor clip_grad_norm_per_layer_cuda(at::TensorList grads, at::IntArrayRef groups, double max_norm,
                                         double norm_type) {
  const char* op = "clip_grad_norm_per_layer_";
  check_per_layer_args(grads, groups, max_norm, norm_type, op);
  check_grads(grads, op);
  const std::vector<bool> repeated = repeated_grads(grads, op);  // before anything is touched
  if (grads.empty()) return at::empty({0}, at::TensorOptions().dtype(at::kFloat));
  const c10::Device device = grads[0].device();
  c10::DeviceGuard guard(device);
  Spans s = spans_of(grads);
  if (groups.empty() && repeated.empty()) {  // the one-launch form
    at::Tensor norms = launch_per_tensor(s, device, norm_type, /*clip=*/true, max_norm, op);
    copy_back(s);
    return norms;
  }
  at::Tensor norms = launch_per_tensor(s, device, norm_type, /*clip=*/false, 0.0, op);
  const int n = static_cast<int>(grads.size());
  at::Tensor by_grad = norms.to(at::kDouble);
  if (!groups.empty()) {
    // A repeated grad counts once in its group: its contribution goes to a spare group n.
    std::vector<int64_t> contrib(groups.begin(), groups.end());
    for (int i = 0; i < n; ++i) {
      if (!repeated.empty() && repeated[i]) contrib[i] = n;
    }
    const auto opts = at::TensorOptions().dtype(at::kLong);
    const at::Tensor ids = at::tensor(groups.vec(), opts).to(device, /*non_blocking=*/true);
    const at::Tensor contrib_ids = at::tensor(contrib, opts).to(device, /*non_blocking=*/true);
    by_grad = group_norms(by_grad, contrib_ids, n + 1, norm_type).index_select(0, ids);
  }
  // min(max_norm / (norm + 1e-6), 1) in double; NaN stays NaN, as clip_coef.
  const at::Tensor coefs = at::clamp_max(at::full_like(by_grad, max_norm) / (by_grad + 1e-6), 1.0).contiguous();
  for (int i = 0; i < n; ++i) {  // a repeat owns no tile in the scale launch: scaled once
    if (!repeated.empty() && repeated[i]) s.descs[i].numel = 0;
  }
  const gpu::Plan plan = gpu::plan(s.descs.data(), n, /*reduce=*/true);
  at::Tensor ws = workspace(device, gpu::per_tensor_workspace(plan, n));
  check(gpu::scale_each(s.descs.data(), n, plan, coefs.data_ptr<double>(), ws.data_ptr(), current_stream(device)), op);
  copy_back(s);
  return by_grad.to(norms.scalar_type());
}

void adaptive_clip_grad_cuda(at::TensorList params, at::TensorList grads, double clip_factor, double eps,
                             double norm_type) {
  const char* op = "adaptive_clip_grad_";
  check_agc_inputs(params, grads, clip_factor, eps, norm_type, op);
  const std::vector<bool> repeated = repeated_grads(grads, op);  // a grad listed twice is clipped once
  if (grads.empty()) return;
  const c10::Device device = grads[0].device();
  c10::DeviceGuard guard(device);
  std::vector<gpu::TensorDesc> gdescs, pdescs;
  std::vector<at::Tensor> keep;                                // param copies, alive until the launch is enqueued
  std::vector<std::pair<at::Tensor, at::Tensor>> grad_copies;  // (grad, its copy), written back after
  int64_t units = 0;
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor &p = params[i], &g = grads[i];
    if (g.numel() == 0 || (!repeated.empty() && repeated[i])) continue;
    at::Tensor pin = p, gin = g;
    if (!rows_in_place(p) || !aligned(p)) pin = keep.emplace_back(p.contiguous());
    if (!rows_in_place(g) || !aligned(g))
      gin = grad_copies.emplace_back(g, g.clone(at::MemoryFormat::Contiguous)).second;
    gdescs.push_back({gin.data_ptr(), g.numel(), units, to_dtype(g.scalar_type())});
    pdescs.push_back({pin.data_ptr(), p.numel(), 0, to_dtype(p.scalar_type())});
    units += g.dim() <= 1 ? 1 : g.size(0);
  }
  if (gdescs.empty()) return;
  const int n = static_cast<int>(gdescs.size());
  gdescs.insert(gdescs.end(), pdescs.begin(), pdescs.end());
  const size_t bytes = gpu::agc_workspace(n);
  at::Tensor ws = bytes ? workspace(device, bytes) : at::Tensor();
  check(gpu::agc(gdescs.data(), n, units, norm_kind(norm_type), norm_type, clip_factor, eps,
                 ws.defined() ? ws.data_ptr() : nullptr, current_stream(device)),
        op);
  for (const auto& [grad, copy] : grad_copies) grad.copy_(copy);
}

}  // namespace
}  // namespace fastclip

TORCH_LIBRARY_IMPL(fastclip, CUDA, m) {
  m.impl("per_tensor_norms", &fastclip::per_tensor_norms_cuda);
  m.impl("clip_grad_norm_per_layer_", &fastclip::clip_grad_norm_per_layer_cuda);
  m.impl("adaptive_clip_grad_", &fastclip::adaptive_clip_grad_cuda);
}
