"""GPU tests of the per-tensor CUDA kernels (csrc/cuda/norms_kernels.cu): the
CPU tests of test_local.py mirrored on the device, against the same fp64
references, plus what only the GPU has: bitwise determinism across grid sizes
and the non-cooperative fallback, CUDA graph capture, opcheck. Skipped where no
GPU is present."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: the CUDA backend needs one to run")

from test_local import (  # noqa: E402
    CNN,
    LARGE,
    MIXED,
    MLP,
    NORM_TYPES,
    SmallCNN,
    agc_params,
    agc_reference,
    assert_clipped_like,
    assert_norms_match,
    median_norm,
    per_layer_reference,
    timm_style_loop,
    torch_per_layer_loop,
)

import fastclip  # noqa: E402
from fastclip import _ops  # noqa: E402
from helpers import FUSED_DTYPES, make_params  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _cuda_kernels_built():
    # Without the kernels everything would take the reference path and pass vacuously.
    assert _ops.CUDA_BUILT, f"fastclip was built without its CUDA kernels ({_ops.LOAD_ERROR})"


def to_cuda(params):
    """The same parameters and grads on the GPU (non-contiguous grads stay so)."""
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().cuda())
        if p.grad is not None:
            if p.grad.is_contiguous():
                q.grad = p.grad.cuda()
            else:  # keep the layout: a strided view of a wider device tensor
                wide = torch.zeros(p.grad.shape[0], 2 * p.grad.shape[1], dtype=p.grad.dtype, device="cuda")
                wide[:, ::2] = p.grad.cuda()
                q.grad = wide[:, ::2]
        out.append(q)
    return out


def cpu_copy(ts):
    return [t.detach().cpu() for t in ts]


def back_to_cpu(params):
    """CPU copies of the parameters that have grads, grads included."""
    out = []
    for q in params:
        if q.grad is not None:
            b = torch.nn.Parameter(q.detach().cpu())
            b.grad = q.grad.cpu()
            out.append(b)
    return out


@pytest.mark.parametrize("dtype", FUSED_DTYPES, ids=str)
@pytest.mark.parametrize("p", NORM_TYPES, ids=repr)
@pytest.mark.parametrize("shapes", [MLP, CNN, MIXED, LARGE], ids=["mlp", "cnn", "mixed", "large"])
def test_per_tensor_norms_match_the_fp64_reference(shapes, p, dtype):
    params = to_cuda(make_params(shapes, dtype, seed=1, noncontiguous=True, scale=3.0))
    ts = [q.grad for q in params]
    norms = fastclip.per_tensor_norms(ts, p)
    assert norms.device.type == "cuda"
    assert norms.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_norms_match(norms.cpu(), cpu_copy(ts), p)


@pytest.mark.parametrize("scale", [1e30, 1e-30], ids=["overflow", "underflow"])
def test_per_tensor_norms_rescue_on_the_device(scale):
    ts = [torch.full((100000,), scale, device="cuda"), torch.randn(50, device="cuda") * scale]
    norms = fastclip.per_tensor_norms(ts, 2.0).cpu()
    assert torch.isfinite(norms).all()
    for got, t in zip(norms.tolist(), ts):
        assert got == pytest.approx(float(torch.linalg.vector_norm(t.double())), rel=1e-6)


@pytest.mark.parametrize("dtype", FUSED_DTYPES, ids=str)
@pytest.mark.parametrize("p", NORM_TYPES, ids=repr)
@pytest.mark.parametrize("shapes", [MLP, CNN, MIXED], ids=["mlp", "cnn", "mixed"])
def test_per_layer_matches_the_reference(shapes, p, dtype):
    params = to_cuda(make_params(shapes, dtype, seed=11, none_every=5, noncontiguous=True, scale=2.0))
    grads = [q.grad for q in params if q.grad is not None]
    host = cpu_copy(grads)
    max_norm = median_norm(host, p)
    expected, norms_ref = per_layer_reference(host, list(range(len(host))), max_norm, p)
    baseline = torch_per_layer_loop(host, max_norm, p)
    norms = fastclip.clip_grad_norm_per_layer_(params, max_norm, p).cpu()
    torch.testing.assert_close(norms.double(), torch.tensor(norms_ref, dtype=torch.float64), rtol=1e-5, atol=0)
    assert_clipped_like(back_to_cpu(params), expected, baseline)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_per_layer_by_module_and_repeats_on_the_device(dtype):
    # layer groups and a repeated grad take the norms launch + ATen + scale launch
    torch.manual_seed(13)
    model = SmallCNN().to(dtype)
    model(torch.randn(2, 3, 8, 8, dtype=dtype)).square().sum().backward()
    grads = [q.grad for q in model.parameters()]
    max_norm = median_norm(grads, 2.0)
    expected, norms_ref = per_layer_reference(grads, [0, 0, 1, 1, 2], max_norm, 2.0)
    model.cuda()
    norms = fastclip.clip_grad_norm_per_layer_(model, max_norm, by="module").cpu()
    torch.testing.assert_close(norms.double(), torch.tensor(norms_ref, dtype=torch.float64), rtol=1e-5, atol=0)
    assert_clipped_like(back_to_cpu(model.parameters()), expected)
    p = torch.nn.Parameter(torch.zeros(10, device="cuda"))
    p.grad = torch.full((10,), 3.0, device="cuda")
    fastclip.clip_grad_norm_per_layer_([p, p], 1.0)
    assert float(torch.linalg.vector_norm(p.grad)) == pytest.approx(1.0, rel=1e-5)  # scaled once


@pytest.mark.parametrize("dtype", FUSED_DTYPES, ids=str)
@pytest.mark.parametrize("p", NORM_TYPES, ids=repr)
@pytest.mark.parametrize("shapes", [MLP, CNN, MIXED], ids=["mlp", "cnn", "mixed"])
def test_agc_matches_the_papers_formula(shapes, p, dtype):
    host = agc_params(shapes, dtype, seed=21, noncontiguous=True)
    expected = [agc_reference(q, q.grad, 0.01, 1e-3, p) for q in host if q.grad is not None]
    baseline = timm_style_loop(host, 0.01, 1e-3, p)
    params = to_cuda(host)
    fastclip.adaptive_clip_grad_(params, 0.01, 1e-3, p)
    assert_clipped_like(back_to_cpu(params), expected, baseline)


def test_agc_long_units_and_channels_last():
    host = agc_params([(2, 70000), (150000,), (8, 4, 3, 3)], torch.float32, seed=23)
    expected = [agc_reference(q, q.grad, 0.01, 1e-3, 2.0) for q in host]
    params = to_cuda(host)
    params[2].data = params[2].data.contiguous(memory_format=torch.channels_last)
    params[2].grad = params[2].grad.contiguous(memory_format=torch.channels_last)
    fastclip.adaptive_clip_grad_(params, 0.01)
    assert_clipped_like(back_to_cpu(params), expected)


def test_bitwise_deterministic_across_grid_sizes_and_the_fallback():
    """The env knobs are read once per process: each setting runs in its own."""
    script = textwrap.dedent("""
        import sys, torch, fastclip
        sys.path.insert(0, "tests")
        from test_local import agc_params, LARGE
        host = agc_params(LARGE + [(7,), (2, 70000)], torch.float32, seed=31)
        ps = []
        for h in host:
            q = torch.nn.Parameter(h.detach().cuda()); q.grad = h.grad.cuda(); ps.append(q)
        out = [fastclip.per_tensor_norms([q.grad for q in ps])]
        fastclip.clip_grad_norm_per_layer_(ps, 1.0)
        out += [q.grad.clone() for q in ps]
        fastclip.adaptive_clip_grad_(ps, 0.01)
        out += [q.grad.clone() for q in ps]
        torch.save([t.cpu() for t in out], sys.argv[1])
    """)
    results = []
    for i, env in enumerate(
        [{}, {"FASTCLIP_CUDA_MAX_GRID": "3"}, {"FASTCLIP_CUDA_NO_COOP": "1"}, {"FASTCLIP_CUDA_MAX_GRID": "1"}]
    ):
        path = f"/tmp/fastclip_local_det_{os.getpid()}_{i}.pt"
        subprocess.run(
            [sys.executable, "-c", script, path],
            check=True,
            env={**os.environ, **env},
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        results.append(torch.load(path))
        os.remove(path)
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(r, results[0]))


def test_graph_capture_and_replay():
    params = to_cuda(agc_params(CNN, torch.float32, seed=32))
    saved = [q.grad.clone() for q in params]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture
        fastclip.clip_grad_norm_per_layer_(params, 1e-3)
        fastclip.adaptive_clip_grad_(params, 0.01)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        norms = fastclip.clip_grad_norm_per_layer_(params, 1e-3)
        fastclip.adaptive_clip_grad_(params, 0.01)
    for q, s in zip(params, saved):
        q.grad.copy_(s * 2)  # new gradients, same memory
    graph.replay()
    torch.cuda.synchronize()
    expected_norms = torch.stack([torch.linalg.vector_norm(s.double() * 2) for s in saved])
    torch.testing.assert_close(norms.double().cpu(), expected_norms.cpu(), rtol=1e-5, atol=0)
    for q in params:
        assert float(torch.linalg.vector_norm(q.grad)) <= 1e-3 * 1.001


def test_opcheck():
    gs = [
        torch.randn(5, 7, device="cuda"),
        torch.randn(3, device="cuda"),
        torch.zeros(0, device="cuda"),
        torch.randn(4, dtype=torch.float64, device="cuda") * 9,
    ]
    torch.library.opcheck(torch.ops.fastclip.per_tensor_norms.default, ([g.clone() for g in gs], 2.0))
    op = torch.ops.fastclip.clip_grad_norm_per_layer_.default
    torch.library.opcheck(op, ([g.clone() for g in gs], [], 0.5, 2.0))
    torch.library.opcheck(op, ([g.clone() for g in gs], [0, 0, 1, 1], 0.5, math.inf))
    ps = [torch.randn_like(g) for g in gs]
    torch.library.opcheck(
        torch.ops.fastclip.adaptive_clip_grad_.default, (ps, [g.clone() for g in gs], 0.01, 1e-3, 2.0)
    )


def test_several_devices_in_one_call():
    host = agc_params(MLP, torch.float32, seed=33)
    expected_agc = [agc_reference(q, q.grad, 0.01, 1e-3, 2.0) for q in host]
    grads = [q.grad for q in host]
    expected_pl, norms_ref = per_layer_reference(grads, list(range(len(grads))), median_norm(grads, 2.0), 2.0)
    for fn in ("norms", "per-layer", "agc"):
        params = to_cuda(host)
        mixed = [params[i] if i % 2 else back_to_cpu([params[i]])[0] for i in range(len(params))]
        if fn == "norms":
            norms = fastclip.per_tensor_norms([q.grad for q in mixed])
            assert norms.device == mixed[0].grad.device
            torch.testing.assert_close(
                norms.double().cpu(), torch.tensor(norms_ref, dtype=torch.float64), rtol=1e-5, atol=0
            )
        elif fn == "per-layer":
            fastclip.clip_grad_norm_per_layer_(mixed, median_norm(grads, 2.0))
            assert_clipped_like(back_to_cpu(mixed), expected_pl)
        else:
            fastclip.adaptive_clip_grad_(mixed, 0.01)
            assert_clipped_like(back_to_cpu(mixed), expected_agc)
