"""Clipping in place bumps each grad's version counter, as torch's own in-place ops (the mul_ of
torch.nn.utils.clip_grad_norm_) do: autograd relies on it to detect a saved tensor modified
after it was saved. The ops' Autograd-key kernels (csrc/autograd.cpp) do it."""

import pytest
import torch

import fastclip
from fastclip import _ops
from helpers import DEVICES

pytestmark = pytest.mark.skipif(not _ops.LOADED, reason=f"the extension is not built: {_ops.LOAD_ERROR}")


def params_on(device):
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in [(8, 4), (8,)]]
    for p in params:
        p.grad = torch.randn_like(p) * 100
    return params


CLIPS = {
    "clip_grad_norm_": lambda ps: fastclip.clip_grad_norm_(ps, 1.0),
    "clip_grad_norm_per_layer_": lambda ps: fastclip.clip_grad_norm_per_layer_(ps, 1.0),
    "adaptive_clip_grad_": lambda ps: fastclip.adaptive_clip_grad_(ps, 0.01),
    "scale_": lambda ps: torch.ops.fastclip.scale_([p.grad for p in ps], torch.tensor(0.5, device=ps[0].device)),
    "torch (the control)": lambda ps: torch.nn.utils.clip_grad_norm_(ps, 1.0),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("clip", CLIPS.values(), ids=CLIPS.keys())
def test_a_clip_bumps_every_grads_version(device, clip):
    params = params_on(device)
    before = [p.grad._version for p in params]
    clip(params)
    assert [p.grad._version for p in params] == [v + 1 for v in before]


@pytest.mark.parametrize("device", DEVICES)
def test_the_fused_adam_step_bumps_what_it_writes_as_torch_adam_does(device):
    """Params, moments and steps are written in place by the step, as by torch's default (foreach)
    Adam. (torch's fused=True Adam bumps only the steps: a param modified after autograd saved it
    then goes unnoticed.)"""
    for make in (torch.optim.Adam, lambda ps: fastclip.optim.Adam(ps, max_grad_norm=1.0)):
        params = params_on(device)
        opt = make(params)
        opt.step()  # makes the state
        state = [t for p in params for t in opt.state[p].values()]
        before = [t._version for t in params + state]
        opt.step()
        assert all(t._version > v for t, v in zip(params + state, before)), type(opt)


@pytest.mark.filterwarnings(r"ignore:Using backward\(\) with create_graph=True")
def test_a_modified_saved_grad_is_caught_by_autograd():
    """What the counter is for: a grad saved for a second backward (create_graph) and then
    clipped in place makes that backward fail, as it does after torch's clip."""
    for clip in (torch.nn.utils.clip_grad_norm_, fastclip.clip_grad_norm_):
        w = torch.nn.Parameter(torch.randn(5))
        (w**3).sum().backward(create_graph=True)
        penalty = (w.grad**2).sum()  # saves w.grad
        clip([w], 1e-3)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            penalty.backward()
