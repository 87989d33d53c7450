// C API of fastclip's CUDA kernels: raw pointers and a cudaStream_t, no torch
// types, so clip_kernels.cu builds with plain nvcc and the glue
// (clip_cuda.cpp) builds with a plain C++ compiler.
//
// Work is cut into tiles: a tile is kTileBytes of one tensor (the last tile
// of a tensor may be shorter; tiles never straddle tensors), tiles numbered
// across tensors in list order. Each tile yields one partial of |g|^p (max |g|
// for inf), accumulated in fp32 (fp64 for fp64 tensors); the partials are
// combined in fp64 in an order fixed by the tile count alone. The norm is thus
// bitwise reproducible on a given GPU whatever the grid size. A tile is a
// fixed subdivision of the CPU backend's kChunkElems chunks (4 to 16 tiles per
// chunk, by dtype): finer, so a model of a few MB still spreads over all SMs.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "../clip_math.h"

namespace fastclip::gpu {

enum class DType : int32_t { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

// One gradient, seen as a flat span of numel elements starting at data.
// data must be aligned to the element size (not necessarily to 16 bytes).
struct TensorDesc {
  void* data;
  int64_t numel;       // > 0: the glue leaves zero-size tensors out
  int64_t first_tile;  // filled in by plan()
  DType dtype;
};

struct Plan {
  int64_t num_tiles;
  size_t workspace_bytes;  // device scratch the launch needs (0: pass nullptr)
};

// Numbers the tiles of descs[0..n) (sets first_tile) and sizes the workspace:
// the tile partials when `reduce` (norm kernels), plus a device copy of the
// descriptors when there are too many for the kernel parameter space. A small
// set (norm_and_clip's one-block kernel, partials in shared memory) needs none.
Plan plan(TensorDesc* descs, int n, bool reduce);

// Global norm of the tensors, written to norm_out in norm_out_dtype. With
// `clip`, also scales every tensor in place by clip_coef(max_norm, norm)
// (clip_math.h, evaluated in double), storing nothing when that coefficient is
// exactly 1. p > 0 (or kind == Inf). float_acc: some tensor is not fp64 (picks
// the rescue threshold, clip_math.h: needs_rescue). One cooperative launch when
// the device supports it, else three ordinary launches; never synchronises with
// the host. On error the CUDA runtime's last error is cleared, so torch's next
// kernel check does not report ours. workspace: plan(..., true).workspace_bytes
// of device memory, 16-byte aligned, no initialisation needed.
cudaError_t norm_and_clip(const TensorDesc* descs, int n, const Plan& plan, NormKind kind, double p, bool clip,
                          double max_norm, bool float_acc, void* norm_out, DType norm_out_dtype, void* workspace,
                          cudaStream_t stream);

// Scales every tensor in place by *coef (a float, or a double when
// coef_double; device memory), storing nothing when it is exactly 1.
// workspace: plan(..., false).workspace_bytes of device memory.
cudaError_t scale(const TensorDesc* descs, int n, const Plan& plan, const void* coef, bool coef_double, void* workspace,
                  cudaStream_t stream);

}  // namespace fastclip::gpu
