// C API of the CUDA kernel of fastclip::adam_step_ (adam_kernels.cu): the
// global gradient norm and Adam/AdamW's update with the clip coefficient
// applied as each grad is read, in one cooperative launch. Raw pointers and a
// cudaStream_t, no torch types, as clip_kernels.h; the glue is adam_cuda.cpp.
// The norm's tiles, partials and their order are clip_kernels.h's: the norm is
// bitwise the one fastclip's clip computes on the same GPU.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "../adam_math.h"
#include "clip_kernels.h"

namespace fastclip::gpu {

// One param and its state, all `grad.numel` elements of `grad.dtype` in the
// same memory order (each 16-byte aligned or not, in any mix). Zero-size
// params are welcome (no tile; only their step counts).
struct AdamTensorDesc {
  TensorDesc grad;  // grad.first_tile: filled in by adam_plan
  void* param;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;  // amsgrad only
  float* step;           // the step count, float32 on the device, incremented by the launch
  const void* lr;        // the group's lr tensor on the device (float, or double when lr_double), or null: hyper.lr
  bool lr_double;
  AdamHyper hyper;
};

// What one launch does, besides the tensors.
struct AdamJob {
  NormKind kind;
  double p;
  bool clip;  // false: coefficient 1 (the norm is still computed)
  double max_norm;
  bool float_acc;  // some grad is accumulated in float (clip_math.h: needs_rescue)
  AdamFlags flags;
  // GradScaler's protocol: grads divided by the scale (a device float, or grad_scale_value
  // when the pointer is null); the update skipped (steps included) where *found_inf != 0
  // (or skip_value when the pointer is null).
  const float* grad_scale;
  double grad_scale_value;
  const float* found_inf;
  bool skip_value;
  void* norm_out;  // the norm of the unscaled grads, in norm_out_dtype
  DType norm_out_dtype;
};

// Numbers the tiles (sets grad.first_tile) and sizes the device scratch of adam_step.
Plan adam_plan(AdamTensorDesc* descs, int n);

// The launch. workspace: adam_plan(...).workspace_bytes of device memory, 16-byte aligned
// (nullptr when 0). Never synchronises with the host; capturable in a CUDA graph. On error
// the CUDA runtime's last error is cleared (clip_kernels.h: norm_and_clip).
cudaError_t adam_step(const AdamTensorDesc* descs, int n, const Plan& plan, const AdamJob& job, void* workspace,
                      cudaStream_t stream);

}  // namespace fastclip::gpu
