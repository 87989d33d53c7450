// The operator schemas, declared once. The Python module is csrc/py_module.cpp. Backends register implementations in
// csrc/cpu/*_cpu.cpp and csrc/cuda/*_cuda.cpp; fake (meta) kernels for
// torch.compile live in fastclip/_ops.py.
#include <torch/library.h>

TORCH_LIBRARY(fastclip, m) {
  // Global p-norm (p > 0 or inf) over every element of every grad; all grads on
  // one device. Accumulated in fp32 (fp64 if any grad is fp64); the result is a
  // 0-dim float32 tensor (float64 if any grad is fp64) on that device.
  m.def("total_norm(Tensor[] grads, float norm_type) -> Tensor");
  // grads *= coef in place. coef: 0-dim float32/float64 tensor on the grads'
  // device, already clamped. When coef == 1 nothing is stored.
  m.def("scale_(Tensor(a!)[] grads, Tensor coef) -> ()");
  // Fused total_norm + coefficient + scale_: one call (one launch on CUDA).
  // The coefficient comes from the accurate norm; the returned norm is written
  // in norm_dtype (default: total_norm's dtype), so returning it in the grads'
  // dtype, as torch does, costs no extra cast.
  m.def("clip_grad_norm_(Tensor(a!)[] grads, float max_norm, float norm_type, ScalarType? norm_dtype=None) -> Tensor");
  // The p-norm (p > 0 or inf) of each tensor, in one pass: a 1-D tensor of
  // len(tensors) norms (0 for a zero-size tensor), float32 (float64 if any
  // tensor is fp64), on the tensors' device. Accumulated and combined as
  // total_norm is (DESIGN.md §3), so bitwise reproducible. Kernels:
  // csrc/cpu/norms_cpu.cpp, csrc/cuda/norms_cuda.cpp.
  m.def("per_tensor_norms(Tensor[] tensors, float norm_type) -> Tensor");
}
