"""fastclip.clip_and_step_ (the clip handed to a torch fused optimizer as grad_scale) against
fastclip.clip_grad_norm_ + optimizer.step() on the same (cloned) params and grads, for Adam,
AdamW and SGD with fused=True, on the CPU and, where a GPU is, on CUDA."""

import math

import pytest
import torch

import fastclip

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]
SHAPES = [(13,), (64, 4), (0,), (300, 257), (1,)]
OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True, amsgrad=True),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, fused=True),
}
# grads / float32(1 / coef) against grads * coef: an ulp or two per clipped grad, which the
# step's own rounding then carries into the params.
RTOL = 1e-6


def make_params(device="cpu", dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device=device, dtype=dtype)) for s in SHAPES]


def set_grads(params, step, scale=3.0):
    gen = torch.Generator().manual_seed(step)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * scale).to(device=p.device, dtype=p.dtype)


def assert_close_runs(ours, theirs, ours_opt, theirs_opt, rtol=RTOL):
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=rtol)
        torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=rtol)  # the step leaves them clipped
        for key, value in theirs_opt.state[q].items():
            torch.testing.assert_close(ours_opt.state[p][key], value, rtol=rtol, atol=rtol)


def run_pair(name, device="cpu", max_norm=1.0, steps=4, grad_scale=3.0, **kw):
    ours, theirs = make_params(device), make_params(device)
    ours_opt, theirs_opt = OPTIMIZERS[name](ours), OPTIMIZERS[name](theirs)
    for k in range(steps):
        set_grads(ours, k, grad_scale)
        set_grads(theirs, k, grad_scale)
        our_norm = fastclip.clip_and_step_(ours_opt, max_norm, **kw)
        their_norm = fastclip.clip_grad_norm_(theirs, max_norm, kw.get("norm_type", 2.0))
        theirs_opt.step()
        assert our_norm.dtype == their_norm.dtype and our_norm.device == their_norm.device
        assert float(our_norm) == float(their_norm)
    return ours, theirs, ours_opt, theirs_opt


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_matches_clip_then_step(name, device):
    ours, theirs, ours_opt, theirs_opt = run_pair(name, device)
    assert_close_runs(ours, theirs, ours_opt, theirs_opt)
    assert not hasattr(ours_opt, "grad_scale") and not hasattr(ours_opt, "found_inf")


@pytest.mark.parametrize("norm_type", [1.0, math.inf, "inf", 0.5])
def test_norm_types(norm_type):
    assert_close_runs(*run_pair("adam", max_norm=2.0, norm_type=norm_type))


def test_comparison_can_fail():
    """Negative control: clipping to a 1% different max_norm is caught."""
    ours, theirs = make_params(), make_params()
    ours_opt, theirs_opt = OPTIMIZERS["adam"](ours), OPTIMIZERS["adam"](theirs)
    set_grads(ours, 0)
    set_grads(theirs, 0)
    fastclip.clip_and_step_(ours_opt, 1.01)
    fastclip.clip_grad_norm_(theirs, 1.0)
    theirs_opt.step()
    with pytest.raises(AssertionError):
        assert_close_runs(ours, theirs, ours_opt, theirs_opt)


def test_no_clip_is_the_plain_step_bitwise():
    """A norm below max_norm: grad_scale is exactly 1, the step is torch's own, bit for bit."""
    ours, theirs = make_params(), make_params()
    ours_opt, theirs_opt = OPTIMIZERS["adamw"](ours), OPTIMIZERS["adamw"](theirs)
    for k in range(3):
        set_grads(ours, k)
        set_grads(theirs, k)
        fastclip.clip_and_step_(ours_opt, 1e9)
        theirs_opt.step()
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q) and torch.equal(p.grad, q.grad)


def test_max_norm_zero_zeroes_the_grads():
    assert_close_runs(*run_pair("sgd", max_norm=0.0))


def test_nonfinite_policies():
    def nan_grads(params):
        set_grads(params, 0)
        params[0].grad[3] = math.nan

    # "torch": what clip_grad_norm_ + step does, NaN params
    ours, theirs = make_params(), make_params()
    ours_opt, theirs_opt = OPTIMIZERS["adam"](ours), OPTIMIZERS["adam"](theirs)
    nan_grads(ours)
    nan_grads(theirs)
    assert math.isnan(float(fastclip.clip_and_step_(ours_opt, 1.0)))
    fastclip.clip_grad_norm_(theirs, 1.0)
    theirs_opt.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), equal_nan=True)

    # "skip": no step at all (params, state and step count), no host sync
    params = make_params()
    opt = OPTIMIZERS["adam"](params)
    set_grads(params, 1)
    fastclip.clip_and_step_(opt, 1.0)
    before = [p.detach().clone() for p in params]
    steps = [float(opt.state[p]["step"]) for p in params]
    nan_grads(params)
    fastclip.clip_and_step_(opt, 1.0, nonfinite="skip")
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert [float(opt.state[p]["step"]) for p in params] == steps

    # "error" (and error_if_nonfinite=True): raises before anything is touched
    for kw in ({"nonfinite": "error"}, {"error_if_nonfinite": True}):
        with pytest.raises(RuntimeError, match="non-finite"):
            fastclip.clip_and_step_(opt, 1.0, **kw)
        assert all(torch.equal(p, b) for p, b in zip(params, before))
    with pytest.raises(ValueError, match="contradict"):
        fastclip.clip_and_step_(opt, 1.0, 2.0, True, nonfinite="skip")


@pytest.mark.parametrize("unscale_first", [False, True])
def test_grad_scaler_composes(unscale_first):
    """With a GradScaler the norm is that of the unscaled grads and the two scales multiply,
    whether or not scaler.unscale_(optimizer) ran first; an inf grad skips the step."""
    ours, theirs = make_params(), make_params()
    ours_opt, theirs_opt = OPTIMIZERS["adam"](ours), OPTIMIZERS["adam"](theirs)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))  # a GradScaler makes its scale on first use
    for k in range(3):
        set_grads(ours, k, 3.0 * 1024.0)  # the grads the scaled loss gives
        set_grads(theirs, k, 3.0)
        if unscale_first:
            scaler.unscale_(ours_opt)
        our_norm = fastclip.clip_and_step_(ours_opt, 1.0, scaler=scaler)
        scaler.update()
        their_norm = fastclip.clip_grad_norm_(theirs, 1.0)
        theirs_opt.step()
        assert float(our_norm) == pytest.approx(float(their_norm), rel=1e-6)
    assert_close_runs(ours, theirs, ours_opt, theirs_opt, rtol=1e-5)
    assert not hasattr(ours_opt, "grad_scale") and not hasattr(ours_opt, "found_inf")

    before = [p.detach().clone() for p in ours]
    set_grads(ours, 9)
    ours[1].grad[0, 0] = math.inf
    scale = scaler.get_scale()
    fastclip.clip_and_step_(ours_opt, 1.0, scaler=scaler)
    scaler.update()
    assert scaler.get_scale() < scale
    assert all(torch.equal(p, b) for p, b in zip(ours, before))


def test_refuses_an_optimizer_that_ignores_grad_scale():
    params = make_params()
    set_grads(params, 0)
    before = [p.grad.clone() for p in params]
    for opt in (
        torch.optim.Adam(params, lr=1e-2),  # foreach: would step on unclipped grads
        torch.optim.RMSprop(params, lr=1e-2),
    ):
        with pytest.raises(TypeError, match="grad_scale"):
            fastclip.clip_and_step_(opt, 1.0)
        assert not opt.state and all(torch.equal(p.grad, b) for p, b in zip(params, before))
    opt = torch.optim.Adam(params, lr=1e-2, fused=True)
    opt.param_groups[0]["fused"] = False  # as loading an unfused state dict leaves it
    with pytest.raises(TypeError, match="grad_scale"):
        fastclip.clip_and_step_(opt, 1.0)


def test_bad_arguments():
    params = make_params()
    set_grads(params, 0)
    opt = OPTIMIZERS["adam"](params)
    with pytest.raises(ValueError, match="max_norm"):
        fastclip.clip_and_step_(opt, -1.0)
    with pytest.raises(ValueError, match="nonfinite"):
        fastclip.clip_and_step_(opt, 1.0, nonfinite="ignore")
    with pytest.raises(ValueError, match="norm_type"):
        fastclip.clip_and_step_(opt, 1.0, "two")
    assert not opt.state


def test_no_grads():
    params = make_params()
    opt = OPTIMIZERS["adam"](params)
    norm = fastclip.clip_and_step_(opt, 1.0)
    assert float(norm) == 0.0 and not opt.state


def test_bf16_params():
    ours, theirs = make_params(dtype=torch.bfloat16), make_params(dtype=torch.bfloat16)
    ours_opt = torch.optim.AdamW(ours, lr=1e-2, fused=True)
    theirs_opt = torch.optim.AdamW(theirs, lr=1e-2, fused=True)
    for k in range(3):
        set_grads(ours, k)
        set_grads(theirs, k)
        fastclip.clip_and_step_(ours_opt, 1.0)
        fastclip.clip_grad_norm_(theirs, 1.0)
        theirs_opt.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=2**-6, atol=2**-6)  # an ulp of bf16


def test_attributes_removed_when_the_step_raises():
    """grad_scale and found_inf are set for the step only, even when it raises."""
    params = make_params()
    set_grads(params, 0)
    opt = OPTIMIZERS["adam"](params)

    def failing_step(*a, **k):
        raise RuntimeError("boom")

    opt.step = failing_step
    with pytest.raises(RuntimeError, match="boom"):
        fastclip.clip_and_step_(opt, 1.0)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
