"""fastclip.optim.AdamW after 200 training steps of real models (the DQN Q-network
4-128-128-2 and a small CNN, both with tanh) against torch's clip_grad_norm_ + AdamW(fused=True): params and
both moments within twice the difference torch itself shows between its fused and foreach
AdamW over the same steps (measured here, on the same model, batches and device). A run with
a 1% different max_grad_norm must fall outside that bound: the comparison can fail.

tanh, not ReLU: with ReLU a unit whose input sits within an ulp of 0 may switch on in one run
and off in the other, and from then on the runs differ by far more than rounding, whichever two
implementations are compared (torch's fused and foreach runs included); the bound then measures
where such a switch happened to fall, not the implementations."""

import copy

import pytest
import torch
import torch.nn.functional as F

import fastclip
from fastclip import _ops

pytestmark = pytest.mark.skipif(not _ops.LOADED, reason="the compiled extension did not load")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]
STEPS = 200
LR = 1e-3


def dqn(gen):
    """CartPole's Q-network and a Huber TD loss against a frozen target, on random batches."""
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 128), torch.nn.Tanh(), torch.nn.Linear(128, 128), torch.nn.Tanh(), torch.nn.Linear(128, 2)
    )
    target = copy.deepcopy(net).requires_grad_(False)

    def batch(device):
        obs, nxt = torch.randn(128, 4, generator=gen), torch.randn(128, 4, generator=gen)
        act, rew = torch.randint(0, 2, (128,), generator=gen), torch.randn(128, generator=gen).sign()
        return [t.to(device) for t in (obs, act, rew, nxt)]

    def loss(model, b):
        obs, act, rew, nxt = b
        with torch.no_grad():
            td = rew + 0.99 * target.to(obs.device)(nxt).max(dim=1).values
        return F.smooth_l1_loss(model(obs).gather(1, act.unsqueeze(1)).squeeze(1), td)

    return net, batch, loss, 0.3  # max_grad_norm: below the norm of most steps, so most steps clip


def cnn(gen):
    """A small image classifier: two convolutions and a linear head, cross-entropy."""
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.Tanh(),
        torch.nn.Conv2d(8, 16, 3, stride=2),
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 6 * 6, 10),
    )

    def batch(device):
        return [
            torch.randn(32, 3, 16, 16, generator=gen).to(device),
            torch.randint(0, 10, (32,), generator=gen).to(device),
        ]

    def loss(model, b):
        return F.cross_entropy(model(b[0]), b[1])

    return net, batch, loss, 0.5  # clips every step


def train(make_model, device, run):
    """STEPS steps of one variant: "fused" / "foreach" (torch's clip + AdamW), "fastclip"
    (fastclip.optim.AdamW), "control" (fastclip's with max_grad_norm 1% off). Every variant
    sees the same initial weights and batches."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    net, batch, loss_fn, max_norm = make_model(gen)
    model = net.to(device)
    params = list(model.parameters())
    if run in ("fused", "foreach"):
        opt = torch.optim.AdamW(params, lr=LR, **{run: True})
    else:
        opt = fastclip.optim.AdamW(params, lr=LR, max_grad_norm=max_norm * (1.01 if run == "control" else 1.0))
    clipped = 0
    for _ in range(STEPS):
        loss = loss_fn(model, batch(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if run in ("fused", "foreach"):
            clipped += float(torch.nn.utils.clip_grad_norm_(params, max_norm)) > max_norm
        opt.step()
    tensors = [t for p in params for t in (p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])]
    return tensors, clipped


def difference(a, b):
    """The largest difference between two lists of tensors, each relative to the tensor's scale."""
    return max(float((x - y).abs().max()) / max(float(y.abs().max()), 1e-30) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make_model", [dqn, cnn], ids=["dqn", "cnn"])
def test_200_steps_within_twice_torchs_own_difference(make_model, device, capsys):
    fused, clipped = train(make_model, device, "fused")
    foreach, _ = train(make_model, device, "foreach")
    ours, _ = train(make_model, device, "fastclip")
    control, _ = train(make_model, device, "control")
    torch_diff = difference(foreach, fused)
    our_diff = difference(ours, fused)
    control_diff = difference(control, fused)
    with capsys.disabled():
        print(
            f"\n{make_model.__name__}/{device}: {clipped}/{STEPS} steps clipped; torch fused vs foreach "
            f"{torch_diff:.3g}, fastclip vs torch fused {our_diff:.3g}, control {control_diff:.3g}"
        )
    assert clipped > STEPS // 2  # the clip is exercised, not a no-op
    assert torch_diff > 0
    assert our_diff <= 2 * torch_diff
    assert control_diff > 2 * torch_diff
