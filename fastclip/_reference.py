"""The library's pure-torch path: the fallback where the extension is missing, and
the path of inputs the fused ops do not take (p <= 0, complex tensors, devices
without kernels). fastclip/_grads.py's runs_fused() decides which path runs.

Like the fused ops, and unlike torch, it accumulates in float32 (float64 for
float64 or complex128 tensors), so a half-precision norm that overflows never
zeroes the gradients; the global norm is overflow- and underflow-safe for p > 0
(the grads are scaled by a power of two near their largest magnitude, which is
exact); and a grad listed twice is counted and scaled once. No host sync.

The clip coefficient is not computed here: callers apply _grads.clip_coef().
"""

import torch


def accumulate_dtype(tensors):
    """float64 if any tensor is float64 or complex128, else float32."""
    wide = (torch.float64, torch.complex128)
    return torch.float64 if any(t.dtype in wide for t in tensors) else torch.float32


def unique(grads):
    """grads without repeats of the same tensor object."""
    seen = set()
    return [g for g in grads if not (id(g) in seen or seen.add(id(g)))]


def _norm(t, norm_type, acc, scale=None):
    """vector_norm of one tensor accumulated in acc (complex: in its own dtype), optionally of t / scale."""
    floating = t.is_floating_point()
    if scale is not None:
        t = (t.to(acc) if floating else t) / scale
    return torch.linalg.vector_norm(t, norm_type, dtype=acc if floating else None).to(acc)


def _power_of_two_near_max(grads, acc):
    """2^floor(log2(max |g|)) as a 0-dim tensor, or 1 where that max is 0, inf or NaN
    (then scaling changes nothing and the result is torch's)."""
    peak = torch.stack([_norm(g, float("inf"), acc) for g in grads]).max()
    _, exponent = torch.frexp(peak)
    scale = torch.ldexp(torch.ones_like(peak), exponent - 1)
    return torch.where(torch.isfinite(peak) & (peak > 0), scale, torch.ones_like(peak))


# ---- the global norm (fastclip/clip.py) -------------------------------------------


def total_norm(grads, norm_type, norm_dtype=None):
    """Global norm of grads on one device, as a 0-dim tensor of norm_dtype (default:
    the accumulation dtype); float64 keeps a norm above FLT_MAX finite."""
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
    narrow = [g for g in grads if g.is_floating_point() and g.dtype != torch.float64]
    coef64 = coef.to(torch.float64)
    for g in narrow:
        g.copy_(g.to(torch.float64).mul_(coef64))
    rest = [g for g in grads if not (g.is_floating_point() and g.dtype != torch.float64)]
    if rest:
        torch._foreach_mul_(rest, coef)


# ---- per-tensor norms and per-layer clipping (fastclip/per_layer.py) ----------------


def per_tensor_norms(tensors, norm_type):
    """The p-norm of each tensor (on one device), as a 1-D float32/float64 tensor."""
    acc = accumulate_dtype(tensors)
    if not tensors:
        return torch.empty(0, dtype=acc)
    return torch.stack([_norm(t, norm_type, acc) for t in tensors])


def group_norms(tensors, groups, norm_type):
    """Each tensor's group norm: the p-norm of all tensors sharing its group id.
    groups: one id (0, 1, ...) per tensor, or empty (every tensor its own group)."""
    norms = per_tensor_norms(tensors, norm_type)
    if not groups:
        return norms
    ids = torch.tensor(groups, device=norms.device)
    members = [norms[ids == g] for g in range(max(groups) + 1)]
    by_group = torch.stack([torch.linalg.vector_norm(m, norm_type) if m.numel() else m.new_zeros(()) for m in members])
    return by_group[ids]


def scale_each_(tensors, coefs):
    """tensors[i] *= coefs[i] in place (coefs: 1-D, one per tensor)."""
    for t, c in zip(tensors, coefs.unbind()):
        t.copy_(t * c)


# ---- AGC (fastclip/agc.py) -------------------------------------------------------------


def unit_norms(x, norm_type, dtype):
    """AGC's unit norms: over every dim but the first of a >= 2-D tensor
    (keepdim, so they broadcast over the rows), over everything otherwise."""
    dims = tuple(range(1, x.dim())) if x.dim() > 1 else None
    return torch.linalg.vector_norm(x, norm_type, dim=dims, keepdim=x.dim() > 1, dtype=dtype)


def adaptive_clip_grad_(params, grads, clip_factor, eps, norm_type):
    """AGC with timm's formula, norms accumulated in float32/float64."""
    for p, g in zip(params, grads):
        if g.numel() == 0:
            continue
        acc = accumulate_dtype([p, g])
        max_norm = unit_norms(p.detach(), norm_type, acc).clamp(min=eps) * clip_factor
        g_norm = unit_norms(g, norm_type, acc)
        coef = torch.where(g_norm < max_norm, torch.ones_like(g_norm), max_norm / g_norm.clamp(min=1e-6))
        g.copy_(g * coef)
