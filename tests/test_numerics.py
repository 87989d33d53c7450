"""Exploding gradients, the case clipping exists for: a finite gradient set is
never zeroed or wrongly scaled. Each test runs on every path: the fused op on
each device present, and the pure-torch reference path (forced in-process).
The oracle is helpers.exact_norm / exact_clip (fp64, overflow-safe)."""

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastclip
from fastclip import _ops, _reference
from helpers import DEVICES, FUSED_DTYPES, clone_params, exact_clip, exact_norm, grads

PATHS = [("fused", d) for d in DEVICES] + [("reference", "cpu")]


@pytest.fixture(params=PATHS, ids=lambda p: f"{p[0]}-{p[1]}")
def device(request, monkeypatch):
    """The device to test on; on the reference path the fused ops are switched off."""
    path, dev = request.param
    if path == "reference":
        monkeypatch.setattr(_ops, "clip_params", None)
        monkeypatch.setattr(_ops, "has_kernels", lambda device_type: False)
    elif fastclip.backend() == "python":
        pytest.skip("extension not built: only the reference path exists")
    return dev


@pytest.fixture(params=DEVICES)
def fused_device(request):
    """The fused op's devices only: for what the reference path does not do."""
    if fastclip.backend() == "python":
        pytest.skip("extension not built")
    return request.param


def param_with_grad(grad):
    p = torch.nn.Parameter(torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device))
    p.grad = grad
    return p


def accumulation_eps(tensors):
    """Relative rounding of the fused sum: fp32 accumulation unless every grad is fp64,
    growing like sqrt(n) (vector lanes, then chunk partials in fp64)."""
    acc = torch.float64 if all(t.dtype == torch.float64 for t in tensors) else torch.float32
    return torch.finfo(acc).eps * math.sqrt(max(1, sum(t.numel() for t in tensors)))


def norm_rtol(tensors, norm_type):
    """Relative error a correct fused norm may have: a few roundings of the accumulator, and
    for p other than 1, 2, inf the root pow(sum, 1/p), whose rounded exponent 1/p errs by
    about |ln(norm)| * eps (torch's norm has the same term)."""
    rtol = 4 * accumulation_eps(tensors)
    if float(norm_type) not in (1.0, 2.0, math.inf):
        norm = exact_norm(tensors, norm_type)
        rtol += abs(math.log(norm)) * torch.finfo(torch.float64).eps if 0 < norm < math.inf else 0.0
    return rtol


def assert_clipped_like_oracle(after, before, max_norm, norm_type=2.0):
    """Each clipped grad equals the fp64 oracle's, rounded once to its dtype: 2 ulps, plus
    the coefficient's error from the norm's (norm_rtol), plus the dtype's subnormal spacing."""
    want = exact_clip(before, max_norm, norm_type)
    coef_rtol = norm_rtol(before, norm_type)
    for g, w in zip(after, want):
        info = torch.finfo(g.dtype)
        err = (g.detach().cpu().double() - w).abs()
        allowed = (2 * info.eps + coef_rtol) * w.abs() + info.tiny * info.eps
        assert bool((err <= allowed).all()), (g.dtype, float(err.max()), float((err - allowed).max()))


# ---- exploding-gradient repros ------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_strided_half_grads_get_the_accurate_coefficient(device, dtype):
    buf = torch.full((4096,), 2000.0, dtype=dtype, device=device)
    p = param_with_grad(buf[::2])
    before = [p.grad.clone()]
    fastclip.clip_grad_norm_([p], 0.01)
    contiguous = param_with_grad(before[0].clone())
    fastclip.clip_grad_norm_([contiguous], 0.01)
    assert torch.equal(p.grad, contiguous.grad)  # strided and contiguous: the same bits
    assert_clipped_like_oracle([p.grad], before, 0.01)
    assert bool((buf[1::2] == 2000.0).all())  # the elements between the view's are untouched


def test_tiny_coefficient_does_not_zero_strided_fp16_grads(device):
    # an fp16 norm of 64,000 with max_norm 1e-3: coefficient ~1.6e-8, below fp16's range
    buf = torch.full((8192,), 1000.0, dtype=torch.float16, device=device)
    p = param_with_grad(buf[::2])
    before = [p.grad.clone()]
    fastclip.clip_grad_norm_([p], 1e-3)
    assert bool((p.grad != 0).all())
    assert_clipped_like_oracle([p.grad], before, 1e-3)


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, 0.5], ids=repr)
@pytest.mark.parametrize("dtype,big", [(torch.float32, 2e19), (torch.bfloat16, 1e30), (torch.float64, 1e160)], ids=str)
def test_sums_that_overflow_still_give_the_norm(device, dtype, big, norm_type):
    g = torch.tensor([big, 1.0, -3.0, big / 7], dtype=dtype, device=device)
    p = param_with_grad(g)
    before = [g.clone()]
    exact = exact_norm(before, norm_type)
    norm = fastclip.clip_grad_norm_([p], 1.0, norm_type)
    assert math.isfinite(exact) and norm.dtype == dtype
    assert abs(float(norm) - exact) <= 4 * torch.finfo(dtype).eps * exact
    assert_clipped_like_oracle([p.grad], before, 1.0, norm_type)
    assert abs(exact_norm([p.grad], norm_type) - 1.0) < 1e-2  # clipped to max_norm, not zeroed


def test_norm_above_float_max_is_returned_inf_but_clips_correctly(device):
    # fp32 grads whose norm (4.2e38) exceeds FLT_MAX: the returned fp32 norm is inf
    # (torch returns the grads' dtype), the clip is by the finite norm.
    p = param_with_grad(torch.tensor([3e38, -3e38, 5.0], device=device))
    before = [p.grad.clone()]
    norm = fastclip.clip_grad_norm_([p], 2.0)
    assert math.isinf(float(norm))
    assert_clipped_like_oracle([p.grad], before, 2.0)
    assert float(fastclip.get_total_norm([before[0].double()])) == pytest.approx(exact_norm(before, 2), rel=1e-12)


def test_tiny_grads_get_an_accurate_norm(device):
    # squares below fp32's normal range: the fast sum loses them, the rescue does not
    g = torch.full((1000,), 1e-22, device=device)
    g[0] = 3e-21
    norm = fastclip.get_total_norm([g])
    assert float(norm) == pytest.approx(exact_norm([g], 2), rel=1e-6)
    assert float(fastclip.get_total_norm([torch.zeros(7, device=device)])) == 0.0


@pytest.mark.parametrize("dtype,value", [(torch.float16, 4e4), (torch.float32, 3e38)], ids=str)
def test_error_if_nonfinite_raises_when_the_returned_norm_overflows(device, dtype, value):
    """The contract: raise when the norm as returned (in the grads' dtype) is non-finite,
    as torch does, even where fastclip's own norm is finite; nothing is touched."""
    p = param_with_grad(torch.full((4,), value, dtype=dtype, device=device))
    before = p.grad.clone()
    with pytest.raises(RuntimeError, match="is finite, but it overflows"):
        fastclip.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
    assert torch.equal(p.grad, before)
    with pytest.raises(RuntimeError, match="non-finite"):
        fastclip.get_total_norm([p.grad], error_if_nonfinite=True)
    norm = fastclip.clip_grad_norm_([p], 1.0)  # without the check: clipped by the finite norm
    assert math.isinf(float(norm))
    assert_clipped_like_oracle([p.grad], [before], 1.0)


def test_clip_grad_value_bound_too_large_for_a_dtype(device):
    a = param_with_grad(torch.tensor([1e30, -1e30, 5.0], dtype=torch.float64, device=device))
    b = param_with_grad(torch.tensor([65504.0, -3.0, math.inf], dtype=torch.float16, device=device))
    b_before = b.grad.clone()
    fastclip.clip_grad_value_([a, b], 1e20)
    assert a.grad.tolist() == [1e20, -1e20, 5.0]
    assert torch.equal(b.grad, b_before)  # 1e20 rounds to inf in fp16: nothing to clamp


def test_clip_grad_value_rejects_complex_before_touching_anything(device):
    a = param_with_grad(torch.tensor([3.0, -3.0], device=device))
    c = param_with_grad(torch.tensor([1 + 1j], dtype=torch.complex64, device=device))
    with pytest.raises(TypeError, match="complex"):
        fastclip.clip_grad_value_([a, c], 1.0)
    assert a.grad.tolist() == [3.0, -3.0]


def test_inf_norm_of_zero_size_grads(device):
    gs = [torch.zeros(0, device=device), torch.tensor([2.0, -5.0], device=device)]
    assert float(fastclip.get_total_norm(gs, math.inf)) == 5.0
    assert float(fastclip.get_total_norm(gs[:1], math.inf)) == 0.0
    assert float(_reference.total_norm(gs[:1], math.inf)) == 0.0


def test_clip_grads_with_norm_keeps_a_float64_norm(device):
    p = param_with_grad(torch.tensor([3e38, 1.0], device=device))
    before = p.grad.clone()
    fastclip.clip_grads_with_norm_([p], 1.0, torch.tensor(1e39, dtype=torch.float64, device=device))
    want = before.double() * (1.0 / (1e39 + 1e-6))
    assert float(p.grad[0]) == pytest.approx(float(want[0]), rel=1e-6)
    assert float(p.grad[1]) == pytest.approx(float(want[1]), rel=1e-3)  # an fp32 subnormal: few bits


# ---- the same memory listed twice ------------------------------------------------


def test_a_grad_listed_twice_is_counted_and_scaled_once(device):
    p = param_with_grad(torch.full((4,), 3.0, device=device))
    norm = fastclip.clip_grad_norm_([p, p], 1.0)
    assert float(norm) == pytest.approx(6.0)
    assert torch.allclose(p.grad, torch.full((4,), 0.5, device=device))  # c, not c^2


def test_views_of_the_same_memory_are_one_grad(fused_device):
    """The fused ops' grad checks see memory; the reference path sees only tensor objects."""
    device = fused_device
    g = torch.full((6,), 2.0, device=device)
    a, b = param_with_grad(g), param_with_grad(g.view(2, 3))
    norm = fastclip.clip_grad_norm_([a, b], 1.0)
    assert float(norm) == pytest.approx(math.sqrt(24.0))
    assert torch.allclose(g, torch.full((6,), 2.0 / math.sqrt(24.0), device=device))


def test_partly_overlapping_grads_are_an_error_before_anything_is_touched(fused_device):
    device = fused_device
    buf = torch.arange(10.0, device=device)
    before = buf.clone()
    ps = [param_with_grad(buf[:6]), param_with_grad(buf[4:])]
    with pytest.raises(RuntimeError, match="share part of their memory"):
        fastclip.clip_grad_norm_(ps, 0.1)
    assert torch.equal(buf, before)


def test_interleaved_views_are_separate_grads(device):
    buf = torch.randn(100, device=device, generator=None)
    before = [buf.clone()]
    ps = [param_with_grad(buf[::2]), param_with_grad(buf[1::2])]
    fastclip.clip_grad_norm_(ps, 0.5)
    assert_clipped_like_oracle([buf], before, 0.5)


def test_the_oracle_comparison_can_fail(device):
    """Negative control: a clip that is 1 ulp-ish wrong (x 1.001) or zeroed is caught."""
    g = torch.tensor([2e19, 1.0, -3.0], device=device)
    before = [g.clone()]
    good = exact_clip(before, 1.0, 2.0)[0].float()
    with pytest.raises(AssertionError):
        assert_clipped_like_oracle([good * 1.001], before, 1.0)
    with pytest.raises(AssertionError):
        assert_clipped_like_oracle([torch.zeros(3)], before, 1.0)


# ---- property: random sets against the oracle and torch -------------------------

EXAMPLES = int(os.environ.get("FASTCLIP_PROPERTY_EXAMPLES", "150"))
LAYOUTS = ("contiguous", "step", "permuted", "offset")
SENTINEL = -7.25  # written in the gaps of strided views: it must survive


@st.composite
def grad_specs(draw):
    dtype = draw(st.sampled_from(FUSED_DTYPES))
    max_exp = math.log10(torch.finfo(dtype).max) if dtype != torch.float64 else 300.0
    return dict(
        dtype=dtype,
        n=draw(st.integers(0, 40)),
        layout=draw(st.sampled_from(LAYOUTS)),
        exp=draw(st.floats(-30.0, max_exp)),
        special=draw(st.sampled_from(["none"] * 8 + ["nan", "inf"])),
    )


def build(spec, gen, device):
    """A grad as the spec says, the buffer it lives in, and the mask of that buffer's
    elements outside the view (by construction: a value may equal the sentinel by chance)."""
    dtype, n = spec["dtype"], spec["n"]
    scale = min(10.0 ** spec["exp"], torch.finfo(dtype).max)
    values = ((torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * scale).to(dtype)
    if spec["special"] != "none" and n:
        values[int(torch.randint(n, (1,), generator=gen))] = math.nan if spec["special"] == "nan" else -math.inf
    layout = spec["layout"]
    if layout == "step":
        buf = torch.full((2 * n,), SENTINEL, dtype=dtype)
        buf[::2] = values
        buf, gaps = buf.to(device), torch.arange(2 * n, device=device) % 2 == 1
        return buf[::2], buf, gaps
    if layout == "offset":  # misaligned start inside a larger buffer
        buf = torch.full((n + 3,), SENTINEL, dtype=dtype)
        buf[1 : n + 1] = values
        buf, gaps = buf.to(device), torch.ones(n + 3, dtype=torch.bool, device=device)
        gaps[1 : n + 1] = False
        return buf[1 : n + 1], buf, gaps
    if layout == "permuted" and n % 2 == 0 and n:
        g = values.reshape(2, n // 2).t().contiguous().t().to(device)  # dense, not contiguous
        return g, g, None
    g = values.to(device)
    return g, g, None


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    specs=st.lists(grad_specs(), min_size=1, max_size=6),
    norm_type=st.sampled_from([1.0, 2.0, 3.0, math.inf]),
    max_norm_exp=st.floats(-6.0, 6.0),
    seed=st.integers(0, 2**16),
)
def test_property_never_zeroed_or_wrongly_scaled(device, specs, norm_type, max_norm_exp, seed):
    gen = torch.Generator().manual_seed(seed)
    built = [build(s, gen, device) for s in specs]
    params = [param_with_grad(g) for g, _, _ in built]
    before = [g.clone() for g, _, _ in built]
    gaps = [(buf, mask) for _, buf, mask in built if mask is not None]
    max_norm = 10.0**max_norm_exp
    exact = exact_norm(before, norm_type)
    theirs = clone_params(params)

    norm = fastclip.clip_grad_norm_(params, max_norm, norm_type)
    if norm_type == math.inf:  # torch has no inf-norm of an empty grad (it raises); fastclip skips them
        theirs = [p for p in theirs if p.grad.numel()] or clone_params(params)[:0]
    torch_norm = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type) if theirs else norm.clone()

    for buf, mask in gaps:  # the elements between a view's are never written
        assert bool((buf[mask] == SENTINEL).all())
    promoted = before[0].dtype
    for g in before:
        promoted = torch.promote_types(promoted, g.dtype)
    assert norm.dtype == promoted
    if not math.isfinite(exact):  # NaN or inf in the grads: torch's behaviour exactly
        assert math.isnan(float(norm)) == math.isnan(exact) == math.isnan(float(torch_norm))
        nonempty = [g for g in grads(params) if g.numel()]
        for ours, t in zip(nonempty, [g for g in grads(theirs) if g.numel()]):
            torch.testing.assert_close(ours, t, equal_nan=True, rtol=0, atol=0)
        return
    dtype = norm.dtype
    fits = exact <= torch.finfo(dtype).max
    if fits:
        slack = (2 * torch.finfo(dtype).eps + norm_rtol(before, norm_type)) * exact + torch.finfo(dtype).tiny
        assert abs(float(norm) - exact) <= slack, (float(norm), exact)
        if math.isfinite(float(torch_norm)):
            assert abs(float(norm) - exact) <= 2 * abs(float(torch_norm) - exact) + slack
    else:
        assert math.isinf(float(norm))
    assert_clipped_like_oracle(grads(params), before, max_norm, norm_type)
