// C API of the per-tensor CUDA kernels (norms_kernels.cu): per-tensor norms,
// local clipping and AGC. Raw pointers and a cudaStream_t, no torch types, as
// clip_kernels.h; the glue is norms_cuda.cpp. Same tiles, accumulation and
// determinism rules as the global norm: a tensor's norm is its tile partials
// combined in tile order by one block, whatever the grid size.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "clip_kernels.h"

namespace fastclip::gpu {

// Unlike the fused clip's, these kernels take zero-size tensors (numel 0, data
// never read): they own no tile and get norm 0, so descriptors and results
// stay in list order.
//
// Device scratch of per_tensor: tile partials, one coefficient per tensor,
// and the descriptor table when they do not fit the parameter space. plan:
// plan(descs, n, true) (numbers the tiles).
size_t per_tensor_workspace(const Plan& plan, int n);

// The p-norm of each tensor, written to norms_out[i] (float, or double when
// norms_double). With `clip`, each tensor is also scaled in place by
// clip_coef(max_norm, its own norm), nothing stored where that is exactly 1.
// One cooperative launch when the device supports it (tile partials, grid
// barrier, per-tensor reduction by one block each, grid barrier, scale), else
// three ordinary launches. Never synchronises with the host.
cudaError_t per_tensor(const TensorDesc* descs, int n, const Plan& plan, NormKind kind, double p, bool clip,
                       double max_norm, void* norms_out, bool norms_double, void* workspace, cudaStream_t stream);

// Scales tensor i in place by coefs[i] (device doubles), nothing stored where
// it is exactly 1. workspace: per_tensor_workspace(plan, n) bytes.
cudaError_t scale_each(const TensorDesc* descs, int n, const Plan& plan, const double* coefs, void* workspace,
                       cudaStream_t stream);

// AGC. descs holds 2n descriptors: the grads, then their params (same numel,
// rows one after another in memory). A grad descriptor's first_tile is the
// index of its first unit (row); num_units the total. Device scratch:
// agc_workspace(n) bytes (0: pass nullptr).
size_t agc_workspace(int n);
cudaError_t agc(const TensorDesc* descs, int n, int64_t num_units, NormKind kind, double p, double clip_factor,
                double eps, void* workspace, cudaStream_t stream);

}  // namespace fastclip::gpu
