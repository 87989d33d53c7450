// The operator schemas, declared once. The Python module is csrc/py_module.cpp. Backends register implementations in
// csrc/cpu/clip_cpu.cpp and csrc/cuda/clip_cuda.cpp; fake (meta) kernels for
// torch.compile live in fastclip/_ops.py.
#include <torch/library.h>

TORCH_LIBRARY(fastclip, m) {
  // Global p-norm (p > 0 or inf) over every element of every grad; all grads on
  // one device. Accumulated in fp32 (fp64 if any grad is fp64), overflow- and
  // underflow-safe; the result is a 0-dim tensor of norm_dtype (default: float32,
  // float64 if any grad is fp64) on that device. norm_dtype=float64 keeps a norm
  // above FLT_MAX finite.
  m.def("total_norm(Tensor[] grads, float norm_type, ScalarType? norm_dtype=None) -> Tensor");
  // grads *= coef in place. coef: 0-dim float32/float64 tensor on the grads'
  // device, already clamped. When coef == 1 nothing is stored.
  m.def("scale_(Tensor(a!)[] grads, Tensor coef) -> ()");
  // Fused total_norm + coefficient + scale_: one call (one launch on CUDA).
  // The coefficient comes from the accurate norm; the returned norm is written
  // in norm_dtype (default: total_norm's dtype), so returning it in the grads'
  // dtype, as torch does, costs no extra cast.
  m.def("clip_grad_norm_(Tensor(a!)[] grads, float max_norm, float norm_type, ScalarType? norm_dtype=None) -> Tensor");
}
