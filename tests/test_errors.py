"""Bad input gets a clear error before any gradient is touched."""

import math

import pytest
import torch

import fastclip
from helpers import clone_params, grads, make_params


def snapshot(params):
    return [g.clone() for g in grads(params)]


def assert_untouched(params, before):
    for g, b in zip(grads(params), before):
        assert torch.equal(g, b)


@pytest.mark.parametrize("max_norm", [-1.0, math.nan, -math.inf])
def test_bad_max_norm_is_a_value_error(max_norm):
    params = make_params([(3, 3), (4,)])
    before = snapshot(params)
    with pytest.raises(ValueError, match="max_norm"):
        fastclip.clip_grad_norm_(params, max_norm)
    with pytest.raises(ValueError, match="max_norm"):
        fastclip.clip_grads_with_norm_(params, max_norm, torch.tensor(1.0))
    assert_untouched(params, before)


def test_bad_clip_value_is_a_value_error():
    params = make_params([(3, 3)])
    with pytest.raises(ValueError, match="clip_value"):
        fastclip.clip_grad_value_(params, math.nan)


def test_bad_norm_type_is_a_value_error():
    params = make_params([(3,)])
    with pytest.raises(ValueError, match="norm_type"):
        fastclip.clip_grad_norm_(params, 1.0, norm_type="two")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_non_floating_grad_is_a_type_error_and_nothing_is_touched(dtype):
    params = make_params([(3, 3), (5,)])
    bad = torch.zeros(4, dtype=dtype)
    bad.grad = torch.ones(4, dtype=dtype)
    params.append(bad)  # last, so a partial clip of the first two would be visible
    before = snapshot(params)
    with pytest.raises(TypeError, match="floating point"):
        fastclip.clip_grad_norm_(params, 1e-3)
    with pytest.raises(TypeError, match="floating point"):
        fastclip.get_total_norm(grads(params))
    assert_untouched(params, before)


def test_sparse_grad_is_a_type_error():
    params = make_params([(3, 3)])
    sparse = torch.nn.Parameter(torch.zeros(4, 4))
    sparse.grad = torch.eye(4).to_sparse()
    before = snapshot(params)
    with pytest.raises(TypeError, match="sparse"):
        fastclip.clip_grad_norm_(params + [sparse], 1e-3)
    assert_untouched(params, before)


@pytest.mark.parametrize("bad", [None, 3, "w", [torch.ones(2)]])
def test_non_tensor_parameter_is_a_type_error(bad):
    params = make_params([(3, 3), (2,)])
    before = snapshot(params)
    with pytest.raises(TypeError, match=r"parameters\[2\]"):
        fastclip.clip_grad_norm_(params + [bad], 1e-3)
    assert_untouched(params, before)


def test_non_iterable_parameters_is_a_type_error():
    with pytest.raises(TypeError, match="iterable"):
        fastclip.clip_grad_norm_(42, 1.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_error_if_nonfinite_raises_like_torch_and_touches_nothing(bad):
    params = make_params([(3, 3), (5,)])
    params[1].grad[2] = bad
    before = snapshot(params)
    with pytest.raises(RuntimeError) as ours:
        fastclip.clip_grad_norm_(params, 1e-3, error_if_nonfinite=True)
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.utils.clip_grad_norm_(clone_params(params), 1e-3, error_if_nonfinite=True)
    assert str(ours.value) == str(theirs.value)
    for g, b in zip(grads(params), before):
        torch.testing.assert_close(g, b, equal_nan=True, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="non-finite"):
        fastclip.get_total_norm(grads(params), error_if_nonfinite=True)


def test_error_if_nonfinite_with_finite_grads_clips_normally():
    params = make_params([(3, 3), (5,)], scale=10.0)
    theirs = clone_params(params)
    n_ours = fastclip.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    n_torch = torch.nn.utils.clip_grad_norm_(theirs, 1.0, error_if_nonfinite=True)
    torch.testing.assert_close(n_ours, n_torch)
    torch.testing.assert_close(grads(params), grads(theirs))
