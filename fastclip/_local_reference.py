"""The pure-torch path of fastclip/local.py: the fallback where the extension
is missing or the fused ops do not take the input (p <= 0, complex tensors,
devices without kernels). Accumulates in float32 (float64 for fp64/complex128)
like the fused ops."""
import torch

from ._reference import accumulate_dtype


def per_tensor_norms(tensors, norm_type):
    """The p-norm of each tensor (on one device), as a 1-D float32/float64 tensor."""
    acc = accumulate_dtype(tensors)
    if not tensors:
        return torch.empty(0, dtype=acc)
    norms = [
        torch.linalg.vector_norm(t, norm_type, dtype=acc if t.is_floating_point() else None).to(acc)
        for t in tensors
    ]
    return torch.stack(norms)
