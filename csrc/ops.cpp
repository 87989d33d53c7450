// The operator schemas, declared once. The Python module is csrc/py_module.cpp. Backends register implementations in
// csrc/cpu/*_cpu.cpp and csrc/cuda/*_cuda.cpp; fake (meta) kernels for
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
  // The p-norm (p > 0 or inf) of each tensor, in one pass: a 1-D tensor of
  // len(tensors) norms (0 for a zero-size tensor), float32 (float64 if any
  // tensor is fp64), on the tensors' device. Accumulated and combined as
  // total_norm is, so bitwise reproducible. Kernels:
  // csrc/cpu/norms_cpu.cpp, csrc/cuda/norms_cuda.cpp.
  m.def("per_tensor_norms(Tensor[] tensors, float norm_type) -> Tensor");
  // Local clipping: each group of grads scaled in place by
  // min(max_norm / (norm + 1e-6), 1) with the group's own p-norm. groups: one
  // id in [0, len(grads)) per grad (a layer's weight and bias share an id), or
  // empty for one group per grad. Returns the pre-clip norm of each grad's
  // group, one per grad, as per_tensor_norms does. Kernels:
  // csrc/cpu/per_layer_cpu.cpp, csrc/cuda/norms_cuda.cpp.
  m.def("clip_grad_norm_per_layer_(Tensor(a!)[] grads, int[] groups, float max_norm, float norm_type) -> Tensor");
  // Adaptive (unit-wise) clipping, AGC in timm's form: a unit is a row of a
  // >= 2-D grad (index 0, over its other dims), a <= 1-D grad is one unit; a
  // unit whose grad p-norm reaches clip_factor * max(unit norm of its param,
  // eps) is scaled in place to that. params[i] is grads[i]'s parameter (same
  // shape and device). Kernels: csrc/cpu/agc_cpu.cpp, csrc/cuda/norms_cuda.cpp.
  m.def(
      "adaptive_clip_grad_(Tensor[] params, Tensor(a!)[] grads, float clip_factor, float eps, float norm_type) -> ()");
  // Adam/AdamW (torch's fused formulas, csrc/adam_math.h) with the global-norm
  // clip inside: the p-norm of all grads (as total_norm computes it), then each
  // param and its moments updated with its grad times
  // min(max_norm / (norm + 1e-6), 1) (no clip when max_norm is None); the grads
  // are not written. Param i belongs to group groups[i], whose hyperparameters
  // are lrs/beta1s/... [groups[i]] (lr_tensors: empty, or one lr tensor per
  // group, read instead of lrs). steps are incremented before use. GradScaler's
  // protocol: grads divided by grad_scale (the norm is that of the unscaled
  // grads), nothing updated (steps included) where found_inf is nonzero.
  // Returns the norm in norm_dtype (default: total_norm's). Kernels:
  // csrc/cpu/adam_cpu.cpp, csrc/cuda/adam_cuda.cpp.
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, int[] groups, float[] lrs, float[] beta1s, float[] beta2s, "
      "float[] epss, float[] weight_decays, Tensor[] lr_tensors, bool amsgrad, bool maximize, "
      "bool decoupled_weight_decay, float? max_norm, float norm_type, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, ScalarType? norm_dtype=None) -> Tensor");
}
