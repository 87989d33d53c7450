"""fastclip.GradMonitor: per-parameter norms against an fp64 reference, a planted
explosion found in the right layer and step (and nothing found without it),
non-finite norms, CSV / TensorBoard / PNG output, bad input, and
torch.compile(fullgraph=True) of the per-step call."""

import csv
import math

import numpy as np
import pytest
import torch

import fastclip
from helpers import DEVICES


def small_model(seed=0, device="cpu"):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)
    ).to(device)


def backward(model, step, seed=0):
    gen = torch.Generator().manual_seed(seed * 7919 + step)
    model.zero_grad()
    x, y = torch.randn(32, 8, generator=gen), torch.randn(32, 2, generator=gen)
    device = next(model.parameters()).device
    torch.nn.functional.mse_loss(model(x.to(device)), y.to(device)).backward()


def reference_norms(model):
    return np.array([float(torch.linalg.vector_norm(p.grad.double())) for p in model.parameters()])


def run(model, steps, monitor, plant=None):
    """Train-like loop; plant=(step, layer name, factor) multiplies that layer's grad."""
    expected = []
    params = dict(model.named_parameters())
    for step in range(steps):
        backward(model, step)
        if plant and step == plant[0]:
            params[plant[1]].grad.mul_(plant[2])
        expected.append(reference_norms(model))
        monitor.record()
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.01 * p.grad)
    return np.array(expected)


@pytest.mark.parametrize("device", DEVICES)
def test_norms_match_fp64_reference_and_csv(tmp_path, device):
    model = small_model(device=device)
    monitor = fastclip.GradMonitor(model, every=4, log_dir=str(tmp_path))
    expected = run(model, 10, monitor)  # two full flushes and 2 rows left for close()
    assert len(monitor.steps) == 8
    monitor.close()
    steps, norms = monitor.norms()
    assert steps.tolist() == list(range(10))
    np.testing.assert_allclose(norms, expected, rtol=1e-6)
    with open(tmp_path / "grad_norms.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", *[n for n, _ in model.named_parameters()]]
    np.testing.assert_allclose(np.array(rows[1:], dtype=float)[:, 1:], expected, rtol=1e-6)
    assert monitor.explosions == []


@pytest.mark.parametrize("device", DEVICES)
def test_comparison_can_fail(device):
    """Control: the reference of another step does not match the recorded norms."""
    model = small_model(device=device)
    monitor = fastclip.GradMonitor(model, every=3)
    expected = run(model, 3, monitor)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(monitor.norms()[1][1:], expected[:-1], rtol=1e-6)


def test_planted_explosion_names_layer_and_step(tmp_path):
    model, found = small_model(), []
    monitor = fastclip.GradMonitor(model, every=16, log_dir=str(tmp_path), on_explosion=found.append)
    run(model, 60, monitor, plant=(41, "2.weight", 300.0))
    monitor.close()
    assert [(e.step, e.layer, e.kind) for e in monitor.explosions] == [(41, "2.weight", "spike")]
    assert found == monitor.explosions
    e = monitor.explosions[0]
    assert e.norm > 10 * e.median and "2.weight" in str(e) and "step 41" in str(e)
    with open(tmp_path / "explosions.csv") as f:
        assert list(csv.reader(f))[1][:3] == ["41", "2.weight", "spike"]
    png = monitor.plot(str(tmp_path / "grads.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_no_plant_no_explosion():
    """Control for the test above: the same run unplanted flags nothing."""
    model = small_model()
    monitor = fastclip.GradMonitor(model, every=16)
    run(model, 60, monitor)
    monitor.close()
    assert monitor.explosions == []


def test_nonfinite_and_missing_grads():
    model = small_model()
    monitor = fastclip.GradMonitor(model, every=5)
    for step in range(7):
        backward(model, step)
        if step == 3:
            model[4].bias.grad[0] = math.nan
        if step == 5:
            model[0].weight.grad = None  # no gradient: recorded as missing, not as an explosion
        monitor.record()
    monitor.close()
    assert [(e.step, e.layer, e.kind) for e in monitor.explosions] == [(3, "4.bias", "nonfinite")]
    steps, norms = monitor.norms()
    assert math.isnan(norms[5, 0]) and np.isfinite(norms[5, 1:]).all()


def test_overwritten_rows_are_reported():
    """With no flush for more than `every` steps (as inside a compiled step), the lost rows are counted."""
    model = small_model()
    monitor = fastclip.GradMonitor(model, every=4)
    monitor._unflushed = -100  # stand-in for record() running inside a compiled step
    run(model, 6, monitor)
    with pytest.warns(RuntimeWarning, match="2 steps were overwritten"):
        monitor.flush()
    assert monitor.norms()[0].tolist() == [2, 3, 4, 5]


def test_tensorboard_when_installed(monkeypatch, tmp_path):
    events = []

    class FakeWriter:
        def add_scalar(self, tag, value, step):
            events.append((tag, step))

        def add_text(self, tag, text, step):
            events.append((tag, step))

        def close(self):
            events.append("closed")

    monkeypatch.setattr(fastclip.monitor, "_tensorboard_writer", lambda log_dir: FakeWriter())
    model = small_model()
    monitor = fastclip.GradMonitor(model, every=2, log_dir=str(tmp_path))
    run(model, 2, monitor)
    monitor.close()
    assert ("grad_norm/0.weight", 1) in events and len(events) == 2 * 6 + 1 and events[-1] == "closed"


def test_record_compiles_fullgraph():
    """No host sync in the per-step call: it compiles as one graph and records the same norms."""
    torch._dynamo.reset()
    model = small_model()
    monitor = fastclip.GradMonitor(model, every=8)
    step_fn = torch.compile(monitor.record, fullgraph=True, backend="aot_eager")
    expected = []
    for step in range(8):
        backward(model, step)
        expected.append(reference_norms(model))
        step_fn()
    monitor.flush()  # a compiled record() does not flush: the caller does
    np.testing.assert_allclose(monitor.norms()[1], np.array(expected), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(every=0), ValueError, "every"),
        (dict(window=0), ValueError, "window"),
        (dict(k=1.0), ValueError, "k must be"),
        (dict(norm_type="x"), ValueError, "norm_type"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastclip.GradMonitor(small_model(), **kwargs)


def test_bad_model():
    with pytest.raises(TypeError, match="nn.Module or an iterable"):
        fastclip.GradMonitor(3)
    with pytest.raises(TypeError, match="not a Tensor"):
        fastclip.GradMonitor([torch.zeros(2), "w"])
    with pytest.raises(ValueError, match="no parameters"):
        fastclip.GradMonitor(torch.nn.ReLU())
