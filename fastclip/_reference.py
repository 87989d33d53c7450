"""The pure-torch path: the fallback where the extension is missing (or for
inputs the fused ops do not take: p <= 0, complex grads, devices without
kernels), and an oracle for the tests.

It mirrors torch's algorithm (per-tensor norms, then the norm of the norms),
but accumulates in float32 (float64 for float64 grads) like the fused ops, so
a half-precision norm that overflows never zeroes the gradients.
"""
import torch


def accumulate_dtype(grads):
    return torch.float64 if any(g.dtype in (torch.float64, torch.complex128) for g in grads) else torch.float32


def total_norm(grads, norm_type):
    """Global norm of grads on one device, as a 0-dim float32/float64 tensor."""
    acc = accumulate_dtype(grads)
    norms = [
        torch.linalg.vector_norm(g, norm_type, dtype=acc if g.is_floating_point() else None).to(acc)
        for g in grads
    ]
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)


def scale_(grads, coef):
    """grads *= coef in place (coef: 0-dim tensor on the grads' device)."""
    torch._foreach_mul_(grads, coef)


def clip_coef(max_norm, norm):
    """torch's coefficient, min(max_norm / (norm + 1e-6), 1), in the norm's dtype."""
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)
