"""GPU tests of what is CUDA's own in fastclip.optim and clip_and_step_ (csrc/cuda/adam_*):
graph capture and replay (lr tensor included), no host sync, one launch per step, the
descriptor table, the many-partials path, bitwise the same over grid sizes, the fallback and
the small kernel, GradScaler's found_inf on the device, state from torch's unfused CUDA Adam,
opcheck. Parity with torch over dtypes, options, groups and layouts runs on CUDA from
test_optim.py and test_clip_and_step.py (their `device` parameters). Skipped without a GPU."""

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: the CUDA backend needs one to run")

import fastclip  # noqa: E402
from fastclip import _ops  # noqa: E402

MLP = [(64, 4), (64,), (64, 64), (64,), (2, 64), (2,)]  # the one-block kernel
MEDIUM = [(256, 1024), (1024,)] * 3  # the cooperative kernel, a few tiles per SM


@pytest.fixture(scope="module", autouse=True)
def _cuda_kernels_built():
    # Without the CUDA kernels everything would take the fallback and pass vacuously.
    assert _ops.CUDA_BUILT, f"fastclip was built without its CUDA kernels ({_ops.LOAD_ERROR})"


def make_params(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to("cuda", dtype)) for s in shapes]


def set_grads(params, step, scale=3.0):
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        grad = (torch.randn(p.shape, generator=gen) * scale).to("cuda", p.dtype)
        if p.grad is None:
            p.grad = grad
        else:
            p.grad.copy_(grad)  # same storage: what a captured graph reads


def assert_same(a, b):
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p.detach(), q.detach())


@pytest.mark.parametrize("shapes", [MLP, MEDIUM, [(i % 97 + 1,) for i in range(300)]], ids=["mlp", "medium", "300"])
def test_graph_capture_and_replay(shapes):
    """opt.step() captured once and replayed with new grads (and a new lr in the lr tensor)
    gives the eager steps' results bit for bit."""
    lr = torch.tensor(1e-2, dtype=torch.float64, device="cuda")  # the eager run's lr, exactly
    graphed_p, eager_p = make_params(shapes), make_params(shapes)
    graphed = fastclip.optim.AdamW(graphed_p, lr=lr, max_grad_norm=1.0)
    eager = fastclip.optim.AdamW(eager_p, lr=1e-2, max_grad_norm=1.0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside capture (the state is made), as torch requires
        set_grads(graphed_p, 0)
        graphed.step()
    torch.cuda.current_stream().wait_stream(side)
    set_grads(eager_p, 0)
    eager.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step()
    norm = graphed.grad_norm
    for k in range(1, 4):
        if k == 3:
            lr.fill_(3e-3)
            eager.param_groups[0]["lr"] = 3e-3
        set_grads(graphed_p, k)
        set_grads(eager_p, k)
        graph.replay()
        eager.step()
        torch.cuda.synchronize()
        assert torch.equal(norm, eager.grad_norm)
        assert_same(graphed_p, eager_p)
    for p, q in zip(graphed_p, eager_p):
        assert float(graphed.state[p]["step"]) == float(eager.state[q]["step"]) == 4.0


def test_no_host_sync():
    """fastclip.optim's step and clip_and_step_ never wait for the device, GradScaler included."""
    params = make_params(MEDIUM)
    opt = fastclip.optim.Adam(params, max_grad_norm=1.0)
    fused = torch.optim.Adam(make_params(MEDIUM), fused=True)
    scaler = torch.amp.GradScaler("cuda")
    scaler.scale(torch.ones((), device="cuda"))
    set_grads(params, 0)
    set_grads(params_of(fused), 0)
    opt.step()  # the state is made outside the check
    fastclip.clip_and_step_(fused, 1.0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            opt.step()
            fastclip.clip_and_step_(fused, 1.0)
            fastclip.clip_and_step_(fused, 1.0, nonfinite="skip")
            scaler.step(opt)
            scaler.update()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def params_of(opt):
    return [p for group in opt.param_groups for p in group["params"]]


@pytest.mark.parametrize("shapes, kernel", [(MLP, "small_adam_kernel"), (MEDIUM, "fused_adam_kernel")])
def test_one_launch_per_step(shapes, kernel):
    params = make_params(shapes)
    opt = fastclip.optim.AdamW(params, max_grad_norm=0.1)
    set_grads(params, 0)
    opt.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    gpu_events = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(gpu_events) == 1 and kernel in gpu_events[0], gpu_events


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_partials_and_the_descriptor_table(dtype):
    """> 4096 tiles (block 0 reduces and publishes) and > 200 params (the device table), against
    fastclip's clip + torch's fused AdamW."""
    shapes = [(9_000_000,), (4097,)] + [(i % 31 + 1,) for i in range(250)]
    ours_p, theirs_p = make_params(shapes, dtype), make_params(shapes, dtype)
    ours = fastclip.optim.AdamW(ours_p, lr=1e-2, max_grad_norm=1.0)
    theirs = torch.optim.AdamW(theirs_p, lr=1e-2, fused=True)
    for k in range(2):
        set_grads(ours_p, k)
        set_grads(theirs_p, k)
        ours.step()
        norm = fastclip.clip_grad_norm_(theirs_p, 1.0)
        theirs.step()
        assert torch.equal(ours.grad_norm, norm)
    tol = 1e-6 if dtype == torch.float32 else 2**-5
    for p, q in zip(ours_p, theirs_p):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol)


_DRIVER = textwrap.dedent("""
    import sys, torch, fastclip
    out = []
    for shapes in ([(64, 4), (64,), (64, 64), (64,), (2, 64), (2,)], [(3_000_000,), (300, 257), (7,)]):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).cuda()) for s in shapes]
        opt = fastclip.optim.AdamW(params, lr=1e-2, max_grad_norm=1.0, amsgrad=True)
        for k in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).cuda() * 3
            opt.step()
            out.append(opt.grad_norm.cpu())
        out += [p.detach().cpu() for p in params]
        out += [opt.state[p][key].cpu() for p in params for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")]
    torch.save(out, sys.argv[1])
""")


def test_bitwise_the_same_over_grids_fallback_and_small_kernel(tmp_path):
    def run(name, env):
        path = tmp_path / f"{name}.pt"
        subprocess.run([sys.executable, "-c", _DRIVER, str(path)], env={**os.environ, **env}, check=True, timeout=300)
        return torch.load(path)

    base = run("default", {})
    for name, env in {
        "grid1": {"FASTCLIP_CUDA_MAX_GRID": "1"},
        "grid7": {"FASTCLIP_CUDA_MAX_GRID": "7"},
        "fallback": {"FASTCLIP_CUDA_NO_COOP": "1"},
        "no small kernel": {"FASTCLIP_CUDA_SMALL_BYTES": "0"},
    }.items():
        for a, b in zip(base, run(name, env), strict=True):
            assert torch.equal(a, b), name


def test_grad_scaler_found_inf_on_the_device():
    params = make_params(MLP)
    opt = fastclip.optim.Adam(params, max_grad_norm=1.0)
    scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
    scaler.scale(torch.ones((), device="cuda"))
    set_grads(params, 0, 3.0 * 1024)
    scaler.step(opt)
    scaler.update()
    before = [p.detach().clone() for p in params]
    set_grads(params, 1)
    params[2].grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 1024.0
    assert_same(params, before)
    assert float(opt.state[params[0]]["step"]) == 1.0


def test_state_of_torchs_unfused_cuda_adam_loads():
    """torch's foreach Adam keeps the step on the CPU; loaded into fastclip's, it moves to the
    device (float32), and the two continue alike."""
    base = make_params(MLP)
    theirs_p, whole_p = copy.deepcopy(base), copy.deepcopy(base)
    theirs = torch.optim.Adam(theirs_p, lr=1e-2, foreach=True)
    whole = torch.optim.Adam(whole_p, lr=1e-2, foreach=True)
    for k in range(2):
        set_grads(theirs_p, k)
        set_grads(whole_p, k)
        theirs.step()
        whole.step()
    ours_p = [torch.nn.Parameter(p.detach().clone()) for p in theirs_p]
    ours = fastclip.optim.Adam(ours_p, lr=1e-2)
    ours.load_state_dict(theirs.state_dict())
    assert all(s["step"].device.type == "cuda" and s["step"].dtype == torch.float32 for s in ours.state.values())
    for k in range(2, 4):
        set_grads(ours_p, k)
        set_grads(whole_p, k)
        ours.step()
        whole.step()
    for p, q in zip(ours_p, whole_p):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_opcheck():
    params = make_params([(5, 3), (4,), (0,)])
    set_grads(params, 0)
    zeros = lambda: [torch.zeros_like(p.detach()) for p in params]
    args = (
        [p.detach().clone() for p in params],
        [p.grad for p in params],
        zeros(),
        zeros(),
        [],
        [torch.zeros((), device="cuda") for _ in params],
        [0] * len(params),
        [1e-2],
        [0.9],
        [0.999],
        [1e-8],
        [0.1],
        [torch.tensor(1e-2, device="cuda")],
        False,
        False,
        True,
        1.0,
        2.0,
    )
    torch.library.opcheck(torch.ops.fastclip.adam_step_.default, args)
