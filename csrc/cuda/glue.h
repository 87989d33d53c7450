// What every CUDA glue file (clip_cuda.cpp, norms_cuda.cpp) needs between
// torch and the kernels' C API: the dtype tag, the current stream (through the
// device-generic accelerator API, so the glue compiles against a CPU-only
// torch too) and the error check of a launch.
#pragma once

#include <ATen/ATen.h>
#include <ATen/DeviceAccelerator.h>
#include <cuda_runtime_api.h>

#include "../clip_math.h"
#include "clip_kernels.h"

namespace fastclip::glue {

// Only called with a fused dtype (grad_checks.h has checked it).
inline gpu::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return gpu::DType::F32;
    case at::kDouble: return gpu::DType::F64;
    case at::kHalf: return gpu::DType::F16;
    default: return gpu::DType::BF16;
  }
}

inline cudaStream_t current_stream(const c10::Device& device) {
  return static_cast<cudaStream_t>(at::accelerator::getCurrentStream(device.index()).native_handle());
}

inline void check(cudaError_t e, const char* op) {
  TORCH_CHECK(e == cudaSuccess, "fastclip::", op, ": CUDA kernel launch failed: ", cudaGetErrorString(e));
}

}  // namespace fastclip::glue
