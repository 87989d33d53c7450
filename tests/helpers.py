"""Shared test helpers: build parameter sets, clone them, compare against torch."""
import math

import torch

FUSED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
NORM_TYPES = (0.5, 1.0, 2.0, 3.0, math.inf, "inf", 0.0, -1.0)

# Tolerance on clipped grads between fastclip and torch. Both compute the norm
# with rounding error (torch's fp32 norm is itself off by ~1e-5 relative), so
# the coefficient, and every clipped grad, may differ by that much.
GRAD_RTOL = {torch.float64: 1e-10, torch.float32: 5e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_params(shapes, dtype=torch.float32, scale=1.0, none_every=0, seed=0, noncontiguous=False):
    """Parameters with random grads. none_every=k leaves every k-th grad None;
    noncontiguous gives 2-d grads as transposed or strided views."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate(shapes):
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
        if none_every and i % none_every == none_every - 1:
            params.append(p)
            continue
        g = torch.randn(shape, generator=gen, dtype=torch.float64).mul_(scale).to(dtype)
        if noncontiguous and g.dim() == 2:
            if i % 2:  # dense but permuted: a transposed view
                g = g.t().contiguous().t()
            else:  # not dense: every other column of a wider tensor
                wide = torch.zeros(shape[0], 2 * shape[1], dtype=dtype)
                wide[:, ::2] = g
                g = wide[:, ::2]
        p.grad = g
        params.append(p)
    return params


def clone_params(params):
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        if p.grad is not None:
            q.grad = p.grad.clone()
        out.append(q)
    return out


def grads(params):
    return [p.grad for p in params if p.grad is not None]


def assert_grads_close(actual, expected):
    """Clipped grads agree with torch's to within the coefficient's rounding."""
    for a, e in zip(grads(actual), grads(expected)):
        rtol = GRAD_RTOL[e.dtype]
        atol = rtol * float(e.detach().abs().max()) if e.numel() else 0.0
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, equal_nan=True)


def fp64_norm(params, norm_type):
    """The exact-ish norm: fp64 over every element, as one vector."""
    flat = torch.cat([g.detach().double().reshape(-1) for g in grads(params)])
    return float(torch.linalg.vector_norm(flat, float(norm_type)))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def exact_norm(tensors, norm_type):
    """The overflow-safe fp64 oracle: the p-norm of every element, scaled by the largest
    magnitude (as BLAS nrm2 does) so sums that leave even fp64's range stay finite."""
    flat = torch.cat([t.detach().reshape(-1).cpu().double() for t in tensors]) if tensors else torch.zeros(0)
    norm_type = float(norm_type)
    if flat.numel() == 0:
        return 0.0
    peak = float(flat.abs().max())
    if not math.isfinite(peak) or peak == 0 or math.isinf(norm_type):
        return float(torch.linalg.vector_norm(flat, norm_type))
    return peak * float(torch.linalg.vector_norm(flat / peak, norm_type))


def exact_clip(tensors, max_norm, norm_type):
    """The grads clipped by the oracle's coefficient, in fp64."""
    coef = min(max_norm / (exact_norm(tensors, norm_type) + 1e-6), 1.0)
    return [t.detach().cpu().double() * coef for t in tensors]
