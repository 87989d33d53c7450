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
        torch.linalg.vector_norm(t, norm_type, dtype=acc if t.is_floating_point() else None).to(acc) for t in tensors
    ]
    return torch.stack(norms)


def clip_grad_norm_per_layer_(grads, groups, max_norm, norm_type):
    """Local clipping, pure torch: each group scaled by its own norm's coefficient.
    groups: one id per grad, or empty (one group per grad). Returns each grad's
    group norm."""
    norms = per_tensor_norms(grads, norm_type)
    if groups:
        ids = torch.tensor(groups, device=norms.device)
        members = [norms[ids == g] for g in range(max(groups) + 1)]
        by_group = torch.stack(
            [torch.linalg.vector_norm(m, norm_type) if m.numel() else m.new_zeros(()) for m in members]
        )
        norms = by_group[ids]
    coefs = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
    for g, c in zip(grads, coefs.unbind()):
        g.copy_(g * c)
    return norms


def unit_norms(x, norm_type, dtype):
    """AGC's unit norms: over every dim but the first of a >= 2-D tensor
    (keepdim, so they broadcast over the rows), over everything otherwise."""
    dims = tuple(range(1, x.dim())) if x.dim() > 1 else None
    return torch.linalg.vector_norm(x, norm_type, dim=dims, keepdim=x.dim() > 1, dtype=dtype)


def adaptive_clip_grad_(params, grads, clip_factor, eps, norm_type):
    """AGC, pure torch (timm's formula), norms accumulated in float32/float64."""
    for p, g in zip(params, grads):
        if g.numel() == 0:
            continue
        acc = accumulate_dtype([p, g])
        max_norm = unit_norms(p.detach(), norm_type, acc).clamp(min=eps) * clip_factor
        g_norm = unit_norms(g, norm_type, acc)
        coef = torch.where(g_norm < max_norm, torch.ones_like(g_norm), max_norm / g_norm.clamp(min=1e-6))
        g.copy_(g * coef)
