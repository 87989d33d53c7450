"""The pure-torch path: the fallback where the extension is missing (or for
inputs the fused ops do not take: p <= 0, complex grads, devices without
kernels).

It mirrors torch's algorithm (per-tensor norms, then the norm of the norms),
but accumulates in float32 (float64 for float64 grads) like the fused ops, so
a half-precision norm that overflows never zeroes the gradients; and, like the
fused ops, it is overflow- and underflow-safe for p > 0 (the grads are scaled
by a power of two near their largest magnitude, which is exact) and counts a
grad listed twice once. No host synchronisation.
"""

import torch


def accumulate_dtype(grads):
    return torch.float64 if any(g.dtype in (torch.float64, torch.complex128) for g in grads) else torch.float32


def unique(grads):
    """grads without repeats of the same tensor object (counted and scaled once, as the fused ops do)."""
    seen = set()
    return [g for g in grads if not (id(g) in seen or seen.add(id(g)))]


def _norm(g, norm_type, acc, scale=None):
    """vector_norm of one grad accumulated in acc (complex grads: in their own dtype), optionally of g / scale."""
    floating = g.is_floating_point()
    if scale is not None:
        g = (g.to(acc) if floating else g) / scale
    return torch.linalg.vector_norm(g, norm_type, dtype=acc if floating else None).to(acc)


def _power_of_two_near_max(grads, acc):
    """2^floor(log2(max |g|)) as a 0-dim tensor, or 1 where that max is 0, inf or NaN
    (then scaling changes nothing and the result is torch's)."""
    peak = torch.stack([_norm(g, float("inf"), acc) for g in grads]).max()
    _, exponent = torch.frexp(peak)
    scale = torch.ldexp(torch.ones_like(peak), exponent - 1)
    return torch.where(torch.isfinite(peak) & (peak > 0), scale, torch.ones_like(peak))


def total_norm(grads, norm_type, norm_dtype=None):
    """Global norm of grads on one device, as a 0-dim tensor of norm_dtype (default:
    float32, float64 if a grad is float64); float64 keeps a norm above FLT_MAX finite."""
    acc, device = accumulate_dtype(grads), grads[0].device
    out = norm_dtype or acc
    grads = unique(grads)
    if norm_type >= 0:
        grads = [g for g in grads if g.numel()]  # they add nothing (torch raises on them for inf)
        if not grads:
            return torch.zeros((), dtype=out, device=device)
    if norm_type <= 0:  # torch's own definition, unscaled (p = 0 counts non-zeros)
        return torch.linalg.vector_norm(torch.stack([_norm(g, norm_type, acc) for g in grads]), norm_type).to(out)
    scale = _power_of_two_near_max(grads, acc)
    norms = torch.stack([_norm(g, norm_type, acc, scale) for g in grads])
    return torch.linalg.vector_norm(norms, norm_type).to(out) * scale.to(out)


def scale_(grads, coef):
    """grads *= coef in place (coef: 0-dim tensor on the grads' device). Real grads below
    fp64 are scaled in float64 and rounded once: a coefficient below FLT_MIN (an exploding
    set) would lose its precision as a float subnormal, and in fp16 vanish."""
    grads = unique(grads)
    wide = [g for g in grads if g.is_floating_point() and g.dtype != torch.float64]
    coef64 = coef.to(torch.float64)
    for g in wide:
        g.copy_(g.to(torch.float64).mul_(coef64))
    rest = [g for g in grads if not (g.is_floating_point() and g.dtype != torch.float64)]
    if rest:
        torch._foreach_mul_(rest, coef)


def clip_coef(max_norm, norm):
    """torch's coefficient, min(max_norm / (norm + 1e-6), 1), in the norm's dtype."""
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)
