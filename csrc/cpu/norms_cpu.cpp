// CPU implementation of fastclip::per_tensor_norms (schema in csrc/ops.cpp):
// the p-norm of each tensor in one pass over the chunked index space
// (per_tensor.h), as a 1-D float32 tensor (float64 if any tensor is fp64).
#include <torch/library.h>

#include "per_tensor.h"

namespace fastclip {
namespace {

using namespace cpu;

at::Tensor per_tensor_norms_cpu(at::TensorList tensors, double norm_type) {
  check_norm_type(norm_type, "per_tensor_norms");
  // Read-only: a tensor listed twice simply gets its norm twice.
  const PerTensorSet pts = make_per_tensor_set(tensors, "per_tensor_norms", /*check_overlap=*/false);
  return vector_tensor(grad_norms(pts, norm_type), pts.set.any_double ? at::kDouble : at::kFloat);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastclip, CPU, m) { m.impl("per_tensor_norms", &per_tensor_norms_cpu); }

}  // namespace fastclip
