"""GPU tests of what is CUDA's own (csrc/cuda): the raw ops, graph capture and
replay, misaligned views, thousands of tensors (the descriptor table), int64
sizes, bitwise determinism across grid sizes and the fallback path, a refused
cooperative launch, no deadlock beside a busy stream, opcheck, one launch per
call. Parity with torch over dtypes and norm types, and the numerics edge cases,
run on CUDA from test_parity.py and test_numerics.py (their `device` fixtures).
Skipped where no GPU is present.
"""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: the CUDA backend needs one to run")

import fastclip  # noqa: E402
import helpers  # noqa: E402
from fastclip import _ops  # noqa: E402
from helpers import assert_within_twice_torchs_error, clone_params, exact_norm, grads  # noqa: E402

# A mix of sizes: scalars, biases, a tensor spanning many 32 KiB tiles with a
# short last tile, and one a little over a tile.
SHAPES = [(), (7,), (64,), (64, 4), (300, 257), (3, 5, 7), (8193,), (1,)]
MLP = [(64, 4), (64,), (64, 64), (64,), (2, 64), (2,)]  # CartPole's Q-network: the one-block kernel


@pytest.fixture(scope="module", autouse=True)
def _cuda_kernels_built():
    # A GPU without the CUDA kernels would send everything through the reference
    # path and every parity test would pass vacuously: fail loudly instead.
    assert _ops.CUDA_BUILT, f"fastclip was built without its CUDA kernels ({_ops.LOAD_ERROR})"


def make_params(shapes, dtypes, seed=0, scale=1.0):
    return helpers.make_params(shapes, dtypes, scale=scale, seed=seed, device="cuda")


def run_both(params, max_norm_factor, norm_type, **kw):
    """Clip clones with fastclip and with torch; max_norm = factor * true norm."""
    max_norm = max_norm_factor * exact_norm(grads(params), norm_type)
    fc, tc = clone_params(params), clone_params(params)
    fc_norm = fastclip.clip_grad_norm_(fc, max_norm, norm_type=norm_type, **kw)
    torch_norm = torch.nn.utils.clip_grad_norm_(tc, max_norm, norm_type=norm_type, **kw)
    torch.cuda.synchronize()
    return fc, fc_norm, tc, torch_norm, max_norm


def test_backend_is_cuda():
    assert fastclip.backend() == "cuda"


def test_raw_ops():
    params = make_params(SHAPES, [torch.float32, torch.float16], seed=4)
    grads = [p.grad for p in params]
    norm64 = exact_norm(grads, 2.0)

    norm = torch.ops.fastclip.total_norm(grads, 2.0)
    assert norm.dtype == torch.float32 and norm.dim() == 0 and norm.is_cuda
    assert abs(norm.item() - norm64) <= 1e-5 * norm64
    norm_d = torch.ops.fastclip.total_norm(grads + [torch.ones(3, dtype=torch.float64, device="cuda")], 2.0)
    assert norm_d.dtype == torch.float64

    for coef_dtype in (torch.float32, torch.float64):
        gs = [g.clone() for g in grads]
        torch.ops.fastclip.scale_(gs, torch.tensor(0.25, dtype=coef_dtype, device="cuda"))
        for g, g0 in zip(gs, grads):
            torch.testing.assert_close(g, (g0.float() * 0.25).to(g0.dtype), rtol=0, atol=0)
    gs = [g.clone() for g in grads]
    torch.ops.fastclip.scale_(gs, torch.tensor(1.0, device="cuda"))
    assert all(torch.equal(g, g0) for g, g0 in zip(gs, grads))

    gs = [g.clone() for g in grads]
    n = torch.ops.fastclip.clip_grad_norm_(gs, 0.5 * norm64, 2.0)
    assert abs(n.item() - norm64) <= 1e-5 * norm64
    coef = 0.5 * norm64 / (n.item() + 1e-6)
    for g, g0 in zip(gs, grads):
        torch.testing.assert_close(g.double(), g0.double() * coef, rtol=2e-3, atol=1e-6)


def test_misaligned_views_and_layouts():
    """Views at odd element offsets (misaligned 16-byte loads), permuted dense
    tensors, strided views; memory around each view must stay untouched."""
    bases, params = [], []
    for i, (dtype, n) in enumerate(
        [
            (torch.float16, 3 * 16384 + 5),
            (torch.bfloat16, 9),
            (torch.float32, 8192 + 3),
            (torch.float64, 4096 * 2 + 1),
            (torch.float32, 1),
            (torch.float16, 7),
        ]
    ):
        base = torch.randn(n + 9, device="cuda").to(dtype)
        bases.append((base, base.clone(), 1 + i % 3, n))
        p = torch.nn.Parameter(torch.empty(n, dtype=dtype, device="cuda"))
        p.grad = base[1 + i % 3 : 1 + i % 3 + n]
        params.append(p)
    t = torch.nn.Parameter(torch.empty(40, 30, device="cuda"))
    t.grad = torch.randn(30, 40, device="cuda").t()  # dense, permuted
    s = torch.nn.Parameter(torch.empty(50, 20, device="cuda"))
    parent = torch.randn(50, 40, device="cuda")
    parent_before = parent.clone()
    s.grad = parent[:, ::2]  # not dense: copied, then written back
    params += [t, s]
    before, want = clone_params(params), clone_params(params)
    max_norm = 0.25 * exact_norm([p.grad for p in params], 2.0)
    fc_norm = fastclip.clip_grad_norm_(params, max_norm)
    torch_norm = torch.nn.utils.clip_grad_norm_(want, max_norm)
    assert_within_twice_torchs_error(before, params, fc_norm, want, torch_norm, max_norm, 2.0)
    for base, base0, off, n in bases:
        assert torch.equal(base[:off], base0[:off]) and torch.equal(base[off + n :], base0[off + n :])
    assert torch.equal(parent[:, 1::2], parent_before[:, 1::2])


@pytest.mark.parametrize("n", [16, 17, 1000, 1001, 2500])
def test_many_tensors(n):
    """Both parameter-space descriptor sizes and the uploaded device table."""
    gen = torch.Generator().manual_seed(n)
    shapes = [(int(torch.randint(1, 300, (1,), generator=gen)),) for _ in range(n)]
    params = make_params(shapes, [torch.float32, torch.bfloat16], seed=n)
    fc, fc_norm, tc, torch_norm, max_norm = run_both(params, 0.3, 2.0)
    assert_within_twice_torchs_error(params, fc, fc_norm, tc, torch_norm, max_norm, 2.0)


@pytest.mark.parametrize("shapes", [MLP, SHAPES[:6], [(i % 97 + 1,) for i in range(1500)]], ids=["mlp", "6", "1500"])
def test_graph_capture_and_replay(shapes):
    params = make_params(shapes, [torch.float32, torch.float16], seed=5)
    max_norm = 0.3 * exact_norm([p.grad for p in params], 2.0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside capture, as torch requires
        fastclip.clip_grad_norm_(clone_params(params), max_norm)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_norm = fastclip.clip_grad_norm_(params, max_norm)
    for step in range(3):
        fresh = make_params(shapes, [torch.float32, torch.float16], seed=100 + step)
        for p, f in zip(params, fresh):
            p.grad.copy_(f.grad)  # new values, same storage
        want = clone_params(fresh)
        want_norm = torch.nn.utils.clip_grad_norm_(want, max_norm)
        graph.replay()
        torch.cuda.synchronize()
        assert_within_twice_torchs_error(fresh, params, out_norm, want, want_norm, max_norm, 2.0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_devices():
    params = make_params(SHAPES, [torch.float32], seed=6)
    for i, p in enumerate(params):
        if i % 2:
            p.data, p.grad = p.data.to("cuda:1"), p.grad.to("cuda:1")
    fc, fc_norm, tc, torch_norm, max_norm = run_both(params, 0.3, 2.0)
    assert fc_norm.device == torch_norm.device
    for p_fc, p_t in zip(fc, tc):
        assert p_fc.grad.device == p_t.grad.device
        torch.testing.assert_close(p_fc.grad, p_t.grad, rtol=1e-5, atol=1e-7)


def test_int64_sizes():
    """A tensor of more than 2**31 elements (4 GiB as bf16)."""
    n = 2**31 + 4099
    if torch.cuda.get_device_properties(0).total_memory < 3 * 2 * n:
        pytest.skip("needs ~13 GB of GPU memory")
    g = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    g[-1] = 64.0
    norm = torch.ops.fastclip.total_norm([g], 2.0)
    assert abs(norm.item() - math.sqrt(n - 1 + 64.0**2)) <= 1e-6 * math.sqrt(n)
    assert torch.ops.fastclip.total_norm([g], math.inf).item() == 64.0
    torch.ops.fastclip.scale_([g], torch.tensor(0.5, device="cuda"))
    assert g[-1].item() == 32.0 and g[2**31 + 7].item() == 0.5 and g[0].item() == 0.5
    del g
    torch.cuda.empty_cache()


# Run in subprocesses: the grid-size knobs are read once per process, and a
# deadlock must fail the test (timeout) rather than hang the suite.
_DRIVER = textwrap.dedent("""
    import sys, torch, fastclip
    torch.manual_seed(7)
    # an RL MLP (the one-block small kernel by default), fp32 and bf16
    mlp = [torch.randn(s, device="cuda") for s in [(64, 4), (64,), (64, 64), (64,), (2, 64), (2,)]]
    mlp_bf16 = [g.bfloat16() for g in mlp]
    small = [torch.randn(s, device="cuda") for s in [(64, 4), (64,), (300, 257), (8193,)]]  # 14 tiles
    big = [torch.randn(35_000_000, device="cuda"), torch.randn(513, device="cuda").half()]  # > 4096 tiles
    # fp32 squares overflow: the one-block rescue pass, on each grid and on the fallback
    exploding = [torch.randn(7000, device="cuda") * 3e19, torch.randn(300, device="cuda")]
    out = []
    for grads in (mlp, mlp_bf16, small, big, exploding):
        out.append(torch.ops.fastclip.total_norm(grads, 2.0).cpu())
        gs = [g.clone() for g in grads]
        out.append(torch.ops.fastclip.clip_grad_norm_(gs, 1.0, 2.0).cpu())
        out += [g.cpu() for g in gs]
    torch.save(out, sys.argv[1])
""")


def _run_driver(tmp_path, name, env):
    path = tmp_path / f"{name}.pt"
    subprocess.run([sys.executable, "-c", _DRIVER, str(path)], env={**os.environ, **env}, check=True, timeout=300)
    return torch.load(path)


def test_bitwise_deterministic_across_runs_grids_and_fallback(tmp_path):
    base = _run_driver(tmp_path, "default", {})
    variants = {
        "again": {},
        "grid1": {"FASTCLIP_CUDA_MAX_GRID": "1"},
        "grid7": {"FASTCLIP_CUDA_MAX_GRID": "7"},
        "fallback": {"FASTCLIP_CUDA_NO_COOP": "1"},
        "no small kernel": {"FASTCLIP_CUDA_SMALL_BYTES": "0"},
        "small kernel up to 16 tiles": {"FASTCLIP_CUDA_SMALL_BYTES": "1000000000"},
    }
    for name, env in variants.items():
        other = _run_driver(tmp_path, name, env)
        for a, b in zip(base, other):
            assert a.dtype == b.dtype and torch.equal(
                a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
            ), name


_BUSY = textwrap.dedent("""
    import torch, fastclip
    a = torch.randn(4096, 4096, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # `a` was made on the default stream
    with torch.cuda.stream(side):
        for _ in range(200):
            a = torch.tanh(a @ a)  # keeps every SM busy while we launch
    params = [torch.nn.Parameter(torch.empty(s, device="cuda")) for s in [(3000, 1000), (64,), (512, 3136)]]
    for p in params:
        p.grad = torch.randn_like(p)
    for _ in range(50):
        norm = fastclip.clip_grad_norm_(params, 1.0)
    torch.cuda.synchronize()
    assert abs(norm.item() - 1.0) < 1e-3, norm.item()
""")


def test_no_deadlock_beside_busy_stream():
    subprocess.run([sys.executable, "-c", _BUSY], check=True, timeout=240)


def test_opcheck():
    grads = [p.grad for p in make_params([(33,), (4, 5)], [torch.float32, torch.bfloat16], seed=8)]
    torch.library.opcheck(torch.ops.fastclip.total_norm.default, ([g.clone() for g in grads], 2.0))
    torch.library.opcheck(torch.ops.fastclip.clip_grad_norm_.default, ([g.clone() for g in grads], 0.1, 2.0))
    torch.library.opcheck(
        torch.ops.fastclip.scale_.default, ([g.clone() for g in grads], torch.tensor(0.5, device="cuda"))
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "shapes, kernel", [(MLP, "small_kernel"), ([(256, 1024), (1024,)] * 3, "fused_kernel")], ids=["mlp", "3M"]
)
def test_one_kernel_launch_per_call(dtype, shapes, kernel):
    """The point of fastclip: one launch, no memset, no copy, even when the norm
    is returned in the grads' half-precision dtype. An RL-sized set takes the
    one-block kernel (no grid barrier, no workspace), a larger one the fused
    cooperative kernel."""
    params = make_params(shapes, [dtype])
    fastclip.clip_grad_norm_(params, 0.1)  # warm: caching allocator, attribute caches
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        norm = fastclip.clip_grad_norm_(params, 0.1)
        torch.cuda.synchronize()
    assert norm.dtype == dtype
    gpu_events = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(gpu_events) == 1 and kernel in gpu_events[0], gpu_events


_REFUSED = textwrap.dedent("""
    import torch, fastclip
    torch.manual_seed(3)
    grads = [torch.randn(35_000_000, device="cuda"), torch.randn(4097, device="cuda")]  # > 4000 tiles
    want = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads])).item()
    for _ in range(3):  # the first call is refused (TooLarge) and falls back; later ones go straight there
        gs = [g.clone() for g in grads]
        norm = torch.ops.fastclip.clip_grad_norm_(gs, 1.0, 2.0)
        assert abs(norm.item() - want) <= 1e-5 * want, (norm.item(), want)
        got = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in gs])).item()
        assert abs(got - 1.0) < 1e-4, got
    # The refusal must not be left as the runtime's last error: torch checks it after
    # its own launches and would report fastclip's error as its own.
    x = torch.ones(1000, device="cuda") * 2
    torch.cuda.synchronize()
    assert x.sum().item() == 2000
    print("ok")
""")


def test_refused_cooperative_launch_falls_back_and_clears_the_error():
    """FASTCLIP_CUDA_FORCE_GRID asks for more blocks than can be co-resident, as MPS or a
    green context would make the device do: the cooperative launch is refused."""
    env = {**os.environ, "FASTCLIP_CUDA_FORCE_GRID": "100000"}
    out = subprocess.run([sys.executable, "-c", _REFUSED], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


_ONE_BLOCK = textwrap.dedent("""
    import torch, fastclip
    torch.manual_seed(4)
    grads = [torch.randn(3_000_000, device="cuda"), torch.randn(77, device="cuda").half()]  # ~370 tiles
    want = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads])).item()
    for _ in range(30):  # the race read a partial before it was written, now and then
        norm = torch.ops.fastclip.total_norm(grads, 2.0).item()
        assert abs(norm - want) <= 1e-5 * want, (norm, want)
    print("ok")
""")


def test_single_block_reads_every_partial_after_it_is_written():
    """One block walking many tiles: thread 0 stores each tile's partial, every thread reads
    them in the reduction; without a barrier between the two the norm was sometimes wrong."""
    env = {**os.environ, "FASTCLIP_CUDA_MAX_GRID": "1"}
    out = subprocess.run([sys.executable, "-c", _ONE_BLOCK], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
