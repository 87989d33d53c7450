"""GPU tests of AutoClip, ZClip and GradMonitor: the clippers on CUDA grads against the
papers' references (fp64 copies on the host), a training step captured in a CUDA
graph (clipper + Adam(fused=True, capturable=True) reading found_inf) replayed against
the same step run eagerly, non-finite steps skipped inside the graph, and fullgraph
compile. Their cost on CUDA: python -m bench.bench_adaptive --device cuda. Skipped where no
GPU is present."""

import math

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

from adaptive_reference import ReferenceAutoClip, ReferenceZClip  # noqa: E402
from test_adaptive import SHAPES, norm_sequence, set_grads  # noqa: E402

import fastclip  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "make_pair",
    [
        lambda: (fastclip.AutoClip(percentile=20.0, history=9), ReferenceAutoClip(percentile=20.0, history=9)),
        lambda: (fastclip.ZClip(warmup_steps=4, max_grad_norm=3.0), ReferenceZClip(warmup_steps=4, max_grad_norm=3.0)),
    ],
    ids=["autoclip", "zclip"],
)
def test_cuda_clippers_match_the_papers(dtype, make_pair):
    fast, ref = make_pair()
    params = [torch.nn.Parameter(torch.zeros(s, dtype=dtype, device="cuda")) for s in SHAPES]
    exact = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in SHAPES]
    for step, target in enumerate(norm_sequence(30, seed=11, spikes={4: 40.0, 12: 100.0})):
        set_grads(exact, step, float(target))
        for p, e in zip(params, exact):
            p.grad = e.grad.to("cuda", dtype)
            e.grad = p.grad.double().cpu()  # the reference sees the same rounded values
        fast(params)
        _, t = ref.step(exact)
        assert float(fast.threshold) == pytest.approx(t, rel=2e-6)
        for p, e in zip(params, exact):
            tol = 1e-12 if dtype == torch.float64 else float(torch.finfo(dtype).eps) * 2
            torch.testing.assert_close(p.grad.double().cpu(), e.grad, rtol=tol, atol=tol * float(e.grad.abs().max()))


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4)).cuda()


@pytest.mark.parametrize(
    "make",
    [
        lambda: fastclip.AutoClip(percentile=30.0, history=16, nonfinite="skip"),
        lambda: fastclip.ZClip(warmup_steps=3, nonfinite="skip"),
    ],
    ids=["autoclip", "zclip"],
)
def test_training_step_in_a_cuda_graph(make):
    """forward + backward + clipper + fused Adam captured once, replayed on new batches:
    the same parameters as the eager loop, and a NaN batch skipped inside the graph."""
    graphed_model, eager_model = _model(), _model()
    g_opt = torch.optim.Adam(graphed_model.parameters(), lr=1e-2, fused=True, capturable=True)
    e_opt = torch.optim.Adam(eager_model.parameters(), lr=1e-2, fused=True, capturable=True)
    g_clip, e_clip = make(), make()
    static_x = torch.zeros(16, 32, device="cuda")
    batches = [torch.randn(16, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(i)) for i in range(12)]
    batches[7] = batches[7] * math.nan

    def step(model, opt, clipper, x):
        opt.zero_grad(set_to_none=False)
        model(x).square().mean().backward()
        clipper(model.parameters())
        opt.found_inf = clipper.found_inf
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch's capture recipe says
        for x in batches[:3]:
            static_x.copy_(x)
            step(graphed_model, g_opt, g_clip, static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(graphed_model, g_opt, g_clip, static_x)
    for x in batches[:3]:
        step(eager_model, e_opt, e_clip, x)
    for i, x in enumerate(batches[3:], start=3):
        before = [p.detach().clone() for p in graphed_model.parameters()]
        static_x.copy_(x)
        graph.replay()
        step(eager_model, e_opt, e_clip, x)
        assert float(g_clip.found_inf) == float(i == 7)
        for p, q, b in zip(graphed_model.parameters(), eager_model.parameters(), before):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
            if i == 7:
                assert torch.equal(p, b)


def test_cuda_step_and_monitor_compile_fullgraph():
    torch._dynamo.reset()
    model = _model()
    clipper, monitor = fastclip.ZClip(warmup_steps=2), fastclip.GradMonitor(model, every=4)
    compiled = torch.compile(
        lambda: (monitor.record(), clipper(list(model.parameters()))), fullgraph=True, backend="aot_eager"
    )
    for _ in range(4):
        model.zero_grad()
        model(torch.randn(8, 32, device="cuda")).square().mean().backward()
        compiled()
    monitor.flush()
    assert len(monitor.steps) == 4 and np.isfinite(monitor.norms()[1]).all()
