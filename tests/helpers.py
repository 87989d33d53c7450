"""Shared test helpers: build parameter sets, clone them, compare against torch."""

import math

import torch

FUSED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
NORM_TYPES = (0.5, 1.0, 2.0, 3.0, math.inf, "inf", 0.0, -1.0)

# Tolerance on clipped grads between fastclip and torch. Both compute the norm
# with rounding error (torch's fp32 norm is itself off by ~1e-5 relative), so
# the coefficient, and every clipped grad, may differ by that much.
GRAD_RTOL = {torch.float64: 1e-10, torch.float32: 5e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_params(shapes, dtype=torch.float32, scale=1.0, none_every=0, seed=0, noncontiguous=False, device="cpu"):
    """Parameters with random grads on `device`. dtype: one dtype, or a list cycled over the
    tensors; none_every=k leaves every k-th grad None; noncontiguous gives 2-d grads as
    transposed or strided views."""
    gen = torch.Generator().manual_seed(seed)
    dtypes = list(dtype) if isinstance(dtype, (list, tuple)) else [dtype]
    params = []
    for i, shape in enumerate(shapes):
        dt = dtypes[i % len(dtypes)]
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dt, device=device))
        if none_every and i % none_every == none_every - 1:
            params.append(p)
            continue
        g = torch.randn(shape, generator=gen, dtype=torch.float64).mul_(scale).to(device=device, dtype=dt)
        if noncontiguous and g.dim() == 2:
            if i % 2:  # dense but permuted: a transposed view
                g = g.t().contiguous().t()
            else:  # not dense: every other column of a wider tensor
                wide = torch.zeros(shape[0], 2 * shape[1], dtype=dt, device=device)
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


def ulp_floor(dtype, magnitude):
    """Rounding slack: 1 ulp for 16-bit results (their rounding dominates), 4 for fp32/fp64
    (a few ulps of summation order, which may happen to favour torch on a given input)."""
    ulps = 1 if torch.finfo(dtype).bits == 16 else 4
    return ulps * torch.finfo(dtype).eps * abs(magnitude)


def assert_within_twice_torchs_error(before, ours, our_norm, theirs, torch_norm, max_norm, norm_type):
    """fastclip's norm and clipped grads are no further from the fp64 truth (exact_norm /
    exact_clip) than twice torch's own error on the same inputs, plus ulp_floor of the result."""
    grads_in = grads(before)
    exact = exact_norm(grads_in, norm_type)
    assert our_norm.dtype == torch_norm.dtype and our_norm.device == torch_norm.device
    our_err, torch_err = abs(float(our_norm) - exact), abs(float(torch_norm) - exact)
    assert our_err <= 2 * torch_err + ulp_floor(our_norm.dtype, exact), (float(our_norm), float(torch_norm), exact)
    for g_in, g_ours, g_torch, want in zip(
        grads_in, grads(ours), grads(theirs), exact_clip(grads_in, max_norm, norm_type)
    ):
        if not want.numel():
            continue
        our_e = (g_ours.detach().cpu().double() - want).abs().max().item()
        torch_e = (g_torch.detach().cpu().double() - want).abs().max().item()
        assert our_e <= 2 * torch_e + ulp_floor(g_in.dtype, want.abs().max().item()), (g_in.dtype, our_e, torch_e)


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
