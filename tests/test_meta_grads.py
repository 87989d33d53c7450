"""Grads on the meta device (a shape, no data): where their norm cannot be
computed, a fastclip error names the grad before anything is touched; among
themselves they behave as in torch."""

import pytest
import torch

import fastclip
from helpers import grads, make_params


def meta_param(shape, dtype=torch.float32):
    p = torch.nn.Parameter(torch.empty(shape, device="meta", dtype=dtype))
    p.grad = torch.empty(shape, device="meta", dtype=dtype)
    return p


def snapshot(params):
    return [g.clone() for g in grads(params) if not g.is_meta]


def assert_untouched(params, before):
    for g, b in zip([g for g in grads(params) if not g.is_meta], before):
        assert torch.equal(g, b)


def test_meta_grad_among_cpu_grads_is_named_and_nothing_is_touched():
    cpu = make_params([(4, 3), (5,)], scale=10.0)
    no_grad = torch.nn.Parameter(torch.zeros(2))  # grad None: counted in the index, skipped
    params = cpu + [no_grad, meta_param((7, 2))]
    before = snapshot(params)
    with pytest.raises(
        RuntimeError, match=r"clip_grad_norm_: parameters\[3\]\.grad \(shape \(7, 2\)\) is on the meta device"
    ):
        fastclip.clip_grad_norm_(params, 1e-3)
    assert_untouched(params, before)
    # Control: the same CPU grads without the meta one are clipped, which the
    # untouched check above would have seen.
    fastclip.clip_grad_norm_(cpu, 1e-3)
    with pytest.raises(AssertionError):
        assert_untouched(cpu, before)


def test_meta_grad_first_names_the_cpu_device_it_cannot_join():
    params = [meta_param((3,))] + make_params([(2, 2)])
    with pytest.raises(RuntimeError, match=r"parameters\[0\]\.grad .*combined with that of the grads on cpu"):
        fastclip.clip_grad_norm_(params, 1.0)


def test_get_total_norm_names_the_meta_tensor():
    tensors = [torch.ones(3), torch.empty(4, device="meta")]
    with pytest.raises(RuntimeError, match=r"get_total_norm: tensors\[1\] \(shape \(4,\)\) is on the meta device"):
        fastclip.get_total_norm(tensors)


def test_error_if_nonfinite_cannot_check_meta_grads():
    params = [meta_param((3,)), meta_param((2, 2))]
    with pytest.raises(RuntimeError, match=r"parameters\[0\]\.grad .*error_if_nonfinite=True cannot check"):
        fastclip.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_only_meta_grads_give_a_meta_norm_like_torch(dtype):
    ours = [meta_param((3, 4), dtype), meta_param((5,), dtype)]
    norm = fastclip.clip_grad_norm_(ours, 1.0)
    expected = torch.nn.utils.clip_grad_norm_(ours, 1.0)
    assert (norm.device, norm.dtype, norm.shape) == (expected.device, expected.dtype, expected.shape)
    assert norm.is_meta
