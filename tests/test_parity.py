"""fastclip.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_ on the same (cloned) inputs,
on every device present (the `device` fixture: CPU, and CUDA where a GPU is)."""

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import fastclip
from helpers import DEVICES, FUSED_DTYPES, NORM_TYPES, assert_grads_close, clone_params, exact_norm, grads, make_params

MLP_SHAPES = [(64, 4), (64,), (64, 64), (64,), (2, 64), (2,)]
MIXED_SHAPES = [(3, 5), (0,), (7,), (0, 4), (17, 33), (1,), (100, 1000), (5, 0, 2), (70001,)]
NONEMPTY_SHAPES = [s for s in MIXED_SHAPES if 0 not in s]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def run_both(params, max_norm, norm_type=2.0, oracle=False):
    """Clip `params` with fastclip and a clone with torch. Returns both norms,
    both param lists, and the fp64 norm of the grads before clipping. With
    oracle=True the expected grads are the pre-clip grads scaled in fp64 by the
    exact coefficient (for mixed precisions, where torch's per-dtype norms are
    less accurate than the comparison's tolerance)."""
    exact = exact_norm(grads(params), norm_type) if float(norm_type) > 0 else None
    before, theirs = clone_params(params), clone_params(params)
    n_ours = fastclip.clip_grad_norm_(params, max_norm, norm_type)
    n_torch = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    overflowed = exact is not None and math.isfinite(exact) and not torch.isfinite(n_torch)
    if overflowed:
        # torch's half-precision norm overflowed: its coefficient is 0 and it
        # zeroed the grads. fastclip accumulates in fp32 and clips by the true norm.
        assert all(not g.any() for g in grads(theirs))
    if overflowed or oracle:
        coef = min(max_norm / (exact + 1e-6), 1.0)
        for g in grads(before):
            g.copy_(g.double() * coef)
        theirs = before
    return n_ours, n_torch, params, theirs, exact


def _numel(params):
    return sum(g.numel() for g in grads(params))


def assert_norm_as_good_as_torch(n_ours, n_torch, exact, dtype, numel):
    """Our norm is no further from the fp64 norm than 2x torch's own error, plus
    what rounding alone allows: one ulp of the returned dtype and sqrt(numel)
    ulps of the accumulator (torch sums with a cascade, we with vector lanes)."""
    assert n_ours.dtype == n_torch.dtype and n_ours.device == n_torch.device and n_ours.dim() == 0
    ours, theirs = float(n_ours), float(n_torch)
    if not math.isfinite(exact):
        assert math.isnan(ours) == math.isnan(exact) and (math.isnan(ours) or ours == exact)
        return
    acc_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    slack = (torch.finfo(dtype).eps + acc_eps * math.sqrt(numel)) * abs(exact) + torch.finfo(dtype).tiny
    assert abs(ours - exact) <= 2 * abs(theirs - exact) + slack, (ours, theirs, exact)


@pytest.mark.parametrize("dtype", FUSED_DTYPES, ids=str)
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=repr)
def test_matches_torch_over_dtypes_and_norm_types(device, dtype, norm_type):
    # torch raises for inf and negative norms of zero-size grads (tested below)
    shapes = MIXED_SHAPES if 0 <= float(norm_type) < math.inf else NONEMPTY_SHAPES
    params = make_params(shapes, dtype, none_every=4, seed=1, device=device)
    n_ours, n_torch, ours, theirs, exact = run_both(params, max_norm=0.5, norm_type=norm_type)
    if exact is None:  # p <= 0: torch's own definition (norm of per-tensor norms), via the reference path
        torch.testing.assert_close(n_ours, n_torch, rtol=1e-3, atol=0)
    else:
        assert_norm_as_good_as_torch(n_ours, n_torch, exact, dtype, _numel(ours))
    assert_grads_close(ours, theirs)


@pytest.mark.parametrize("dtype", FUSED_DTYPES, ids=str)
def test_large_set_takes_the_parallel_path(device, dtype):
    # > 2^18 elements and several chunks per tensor: the multi-threaded path
    params = make_params([(300, 1000), (513,), (1000, 70)], dtype, seed=2, device=device)
    n_ours, n_torch, ours, theirs, exact = run_both(params, max_norm=1.0)
    assert_norm_as_good_as_torch(n_ours, n_torch, exact, dtype, _numel(ours))
    assert_grads_close(ours, theirs)


def test_thousands_of_tiny_tensors(device):
    params = make_params([(3,)] * 3000 + [(2, 2)] * 100, seed=3, device=device)
    n_ours, n_torch, ours, theirs, exact = run_both(params, max_norm=1.0)
    torch.testing.assert_close(n_ours, n_torch, rtol=1e-5, atol=0)
    assert_grads_close(ours, theirs)


@pytest.mark.parametrize("dtype", FUSED_DTYPES, ids=str)
def test_noncontiguous_grads_scaled_in_place(device, dtype):
    params = make_params([(40, 30), (30, 40), (5, 7), (8, 9)], dtype, noncontiguous=True, seed=4, device=device)
    before = [(p.grad, p.grad.data_ptr(), p.grad.stride()) for p in params]
    assert not all(g.is_contiguous() for g, _, _ in before)
    n_ours, n_torch, ours, theirs, exact = run_both(params, max_norm=0.1)
    assert_norm_as_good_as_torch(n_ours, n_torch, exact, dtype, _numel(ours))
    for p, (g, ptr, stride) in zip(ours, before):
        assert p.grad is g and g.data_ptr() == ptr and g.stride() == stride  # same object, storage, layout
    assert_grads_close(ours, theirs)


def test_zero_size_grads_with_inf_and_negative_norms(device):
    params = make_params([(0,), (4, 3)], seed=16, device=device)
    with pytest.raises(RuntimeError, match="empty tensor"):
        torch.nn.utils.clip_grad_norm_(clone_params(params), 1.0, math.inf)
    # fastclip: a zero-size grad adds nothing to the max over all elements
    assert float(fastclip.clip_grad_norm_(clone_params(params), 1.0, math.inf)) == exact_norm(grads(params), math.inf)
    with pytest.raises(RuntimeError, match="empty tensor"):  # like torch: no identity for p < 0
        fastclip.clip_grad_norm_(params, 1.0, -1.0)


def test_mixed_dtypes_in_one_call(device):
    params = (
        make_params([(10, 10)], torch.float16, seed=5, device=device)
        + make_params([(20,)], torch.bfloat16, seed=6, device=device)
        + make_params([(30, 3)], torch.float32, seed=7, device=device)
    )
    n_ours, n_torch, ours, theirs, exact = run_both(params, max_norm=0.3, oracle=True)
    assert n_ours.dtype == n_torch.dtype == torch.float32
    torch.testing.assert_close(n_ours, n_torch, rtol=2e-3, atol=0)
    assert_grads_close(ours, theirs)


def test_mixed_with_float64_returns_float64(device):
    params = make_params([(10, 10)], torch.float64, seed=8, device=device) + make_params(
        [(20,)], torch.float32, seed=9, device=device
    )
    n_ours, n_torch, ours, theirs, exact = run_both(params, max_norm=0.3, oracle=True)
    assert n_ours.dtype == n_torch.dtype == torch.float64
    # the float32 grads' partial is accumulated in float32: that bounds the precision
    torch.testing.assert_close(n_ours, n_torch, rtol=1e-6, atol=0)
    for a, e in zip(grads(ours), grads(theirs)):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", FUSED_DTYPES, ids=str)
def test_no_clip_leaves_grads_bitwise_unchanged(device, dtype):
    params = make_params(MIXED_SHAPES, dtype, seed=10, device=device)
    before = [g.clone() for g in grads(params)]
    norm = fastclip.clip_grad_norm_(params, max_norm=1e30 if dtype != torch.float16 else 6e4)
    assert float(norm) > 0
    for g, b in zip(grads(params), before):
        assert torch.equal(g.view(torch.int8), b.view(torch.int8))  # bitwise, not just ==


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
def test_nonfinite_grads_behave_like_torch(device, bad, norm_type):
    params = make_params([(5, 5), (7,)], seed=11, device=device)
    params[1].grad[3] = bad
    n_ours, n_torch, ours, theirs, exact = run_both(params, max_norm=1.0, norm_type=norm_type)
    torch.testing.assert_close(n_ours, n_torch, equal_nan=True)
    for a, b in zip(grads(ours), grads(theirs)):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=5e-5, atol=1e-6)


def test_single_tensor_and_generator_inputs(device):
    p = make_params([(6, 6)], seed=12, device=device)[0]
    (q,) = clone_params([p])
    torch.testing.assert_close(fastclip.clip_grad_norm_(p, 0.1), torch.nn.utils.clip_grad_norm_(q, 0.1))
    torch.testing.assert_close(p.grad, q.grad)
    params = make_params(MLP_SHAPES, seed=13, device=device)
    theirs = clone_params(params)
    torch.testing.assert_close(
        fastclip.clip_grad_norm_(iter(params), 0.1), torch.nn.utils.clip_grad_norm_((t for t in theirs), 0.1)
    )
    assert_grads_close(params, theirs)


def test_all_grads_none_returns_zero():
    params = [torch.nn.Parameter(torch.ones(3)) for _ in range(2)]
    for result in (fastclip.clip_grad_norm_(params, 1.0), fastclip.clip_grad_norm_([], 1.0)):
        assert torch.equal(result, torch.nn.utils.clip_grad_norm_(params, 1.0))
        assert result.dtype == torch.float32


def test_returned_norm_is_the_pre_clip_norm_and_clipping_reaches_max_norm(device):
    params = make_params(MLP_SHAPES, scale=10.0, seed=14, device=device)
    norm = fastclip.clip_grad_norm_(params, 1.0)
    assert float(norm) > 10
    assert abs(exact_norm(grads(params), 2) - 1.0) < 1e-5


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 40), min_size=0, max_size=3).map(tuple), min_size=1, max_size=12),
    dtype=st.sampled_from(FUSED_DTYPES),
    norm_type=st.sampled_from([0.5, 1.0, 2.0, 3.0, math.inf]),
    max_norm=st.floats(0.0, 50.0),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
    none_every=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_property_matches_torch(shapes, dtype, norm_type, max_norm, scale, none_every, seed):
    assume(norm_type != math.inf or all(0 not in s for s in shapes))  # torch raises there
    params = make_params(shapes, dtype, scale=scale, none_every=none_every, seed=seed)
    assume(grads(params))
    exact = exact_norm(grads(params), norm_type)
    oracle = [g.double() * min(max_norm / (exact + 1e-6), 1.0) for g in grads(params)]
    n_ours, n_torch, ours, theirs, _ = run_both(params, max_norm, norm_type)
    assert_norm_as_good_as_torch(n_ours, n_torch, exact, dtype, _numel(ours))
    # Grads: no further from the fp64 result than 2x torch's error, plus one
    # rounding to the dtype and the norm's accumulation slack (as in
    # assert_norm_as_good_as_torch). torch's fp16 coefficient can under- or
    # overflow where ours does not, so "close to torch" alone is the wrong oracle.
    acc_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    slack = torch.finfo(dtype).eps + acc_eps * math.sqrt(_numel(ours))
    for g_ours, g_torch, o in zip(grads(ours), grads(theirs), oracle):
        if not o.numel():
            continue
        err_ours, err_torch = (g_ours.double() - o).abs().max(), (g_torch.double() - o).abs().max()
        allowed = 2 * err_torch + float(o.abs().max()) * slack + torch.finfo(dtype).tiny
        assert err_ours <= allowed, (float(err_ours), float(err_torch))


def test_negative_control_the_comparison_can_fail(device):
    """A result off by 0.1% (a wrong coefficient, a wrong norm) must be caught."""
    n_ours, n_torch, ours, theirs, exact = run_both(make_params(MLP_SHAPES, seed=15, device=device), 0.5)
    ours[2].grad.mul_(1.001)
    with pytest.raises(AssertionError):
        assert_grads_close(ours, theirs)
    with pytest.raises(AssertionError):
        assert_norm_as_good_as_torch(n_ours * 1.001, n_torch, exact, torch.float32, _numel(ours))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("seed", range(4))
def test_half_precision_error_within_twice_torchs(device, dtype, seed):
    """Against fp64 (norm and coefficient exact, one rounding to the dtype),
    fastclip's clipped grads are no further off than 2x torch's."""
    params = make_params([(300, 200), (77,), (64, 64)], dtype, scale=3.0, seed=seed, device=device)
    exact = exact_norm(grads(params), 2.0)
    oracle = [g.double() * min(0.5 / (exact + 1e-6), 1.0) for g in grads(params)]
    n_ours, n_torch, ours, theirs, _ = run_both(params, max_norm=0.5)

    def err(ps):
        return max(float((g.double() - o).abs().max()) for g, o in zip(grads(ps), oracle))

    half_ulp = max(float(o.abs().max()) for o in oracle) * torch.finfo(dtype).eps / 2
    assert err(ours) <= 2 * err(theirs) + half_ulp, (err(ours), err(theirs))
    assert abs(float(n_ours) - exact) <= 2 * abs(float(n_torch) - exact) + exact * torch.finfo(dtype).eps


def test_half_norm_overflow_does_not_zero_the_grads(device):
    """fp16 norm > 65504: torch's coefficient becomes 0 and wipes the grads;
    fastclip accumulates in fp32 and clips by the true norm."""
    params = make_params([(1000, 100)], torch.float16, scale=300.0, seed=21, device=device)
    n_ours, n_torch, ours, theirs, exact = run_both(params, max_norm=1.0)
    assert math.isinf(float(n_torch)) and math.isfinite(exact) and exact > 65504
    assert math.isinf(float(n_ours))  # the returned norm is fp16, like torch's
    assert abs(exact_norm(grads(ours), 2.0) - 1.0) < 1e-2  # clipped to max_norm, not zeroed
    assert_grads_close(ours, theirs)  # theirs: the exact-coefficient expectation (see run_both)
