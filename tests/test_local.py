"""Per-tensor norms, local (per-layer) clipping and AGC against independent
references written here from the definitions (fp64, one tensor or unit at a
time, with .item() where convenient), on model-shaped sets, every dtype."""
import math

import pytest
import torch

import fastclip
from helpers import FUSED_DTYPES, make_params

needs_extension = pytest.mark.skipif(not fastclip._ops.LOADED, reason="the compiled extension did not load")

# Model-shaped sets: an MLP, a small CNN (conv weights are 4-D), GPT-2-like
# pieces with zero-size and 1-element tensors, and one set big enough (> 2^18
# elements, tensors of several 64Ki chunks) to take the multi-threaded path.
MLP = [(64, 4), (64,), (64, 64), (64,), (2, 64), (2,)]
CNN = [(8, 4, 5, 5), (8,), (16, 8, 3, 3), (16,), (10, 16 * 4), (10,)]
MIXED = [(3, 5), (0,), (7,), (0, 4), (17, 33), (1,), (100, 300), (5, 0, 2), (70001,)]
LARGE = [(300, 1000), (513,), (1000, 70)]
NORM_TYPES = (1.0, 2.0, math.inf, 3.0)


def exact_norm(t, p):
    """The reference: fp64 p-norm of one tensor, from the definition."""
    x = t.detach().double().reshape(-1)
    if x.numel() == 0:
        return 0.0
    if math.isinf(p):
        return x.abs().max().item()
    return (x.abs() ** p).sum().item() ** (1.0 / p)


def acc_slack(dtype, numel):
    """What accumulator rounding alone allows, relative: one fp32 ulp of the
    result plus sqrt(numel) ulps of the accumulator (fp64 for fp64 tensors)."""
    acc_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    out_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    return out_eps + 4 * acc_eps * math.sqrt(max(numel, 1))


def assert_norms_match(norms, tensors, p):
    """Each norm within accumulator rounding of the fp64 norm, and no further
    from it than twice the error of torch's own norm in the tensor's dtype."""
    assert norms.dim() == 1 and norms.numel() == len(tensors)
    for got, t in zip(norms.tolist(), tensors):
        exact = exact_norm(t, p)
        if not math.isfinite(exact):
            assert (math.isnan(got) and math.isnan(exact)) or got == exact, (got, exact)
            continue
        err = abs(got - exact)
        assert err <= acc_slack(t.dtype, t.numel()) * exact + 1e-300, (got, exact, t.shape, t.dtype)
        theirs = float(torch.linalg.vector_norm(t, p)) if t.numel() else 0.0
        assert err <= 2 * abs(theirs - exact) + acc_slack(t.dtype, t.numel()) * exact + 1e-300


def model_grads(shapes, dtype, seed=0, noncontiguous=False, scale=1.0):
    return [p.grad for p in make_params(shapes, dtype, seed=seed, noncontiguous=noncontiguous, scale=scale)]


# ---- per_tensor_norms -------------------------------------------------------


@needs_extension
@pytest.mark.parametrize("dtype", FUSED_DTYPES, ids=str)
@pytest.mark.parametrize("p", NORM_TYPES, ids=repr)
@pytest.mark.parametrize("shapes", [MLP, CNN, MIXED], ids=["mlp", "cnn", "mixed"])
def test_per_tensor_norms_match_the_fp64_reference(shapes, p, dtype):
    ts = model_grads(shapes, dtype, seed=1, noncontiguous=True, scale=3.0)
    norms = fastclip.per_tensor_norms(ts, p)
    assert norms.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert norms.device == ts[0].device
    assert_norms_match(norms, ts, p)


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_per_tensor_norms_large_set_takes_the_parallel_path(dtype):
    ts = model_grads(LARGE, dtype, seed=2)
    for p in (2.0, math.inf):
        assert_norms_match(fastclip.per_tensor_norms(ts, p), ts, p)


def test_per_tensor_norms_comparison_can_fail():
    # Negative control: the same check rejects norms that are off by 1e-4 relative.
    ts = model_grads(MLP, torch.float32, seed=3)
    norms = fastclip.per_tensor_norms(ts, 2.0)
    wrong = norms.clone()
    wrong[2] *= 1 + 1e-4
    with pytest.raises(AssertionError):
        assert_norms_match(wrong, ts, 2.0)


@needs_extension
def test_per_tensor_norms_mixed_dtypes_and_fp64_result():
    ts = [torch.randn(5, 3), torch.randn(7, dtype=torch.float64), torch.randn(4, 4).half(), torch.zeros(0)]
    norms = fastclip.per_tensor_norms(ts)
    assert norms.dtype == torch.float64 and norms[3].item() == 0.0
    assert_norms_match(norms, ts, 2.0)


@needs_extension
@pytest.mark.parametrize("p", [2.0, 3.0, 1.0])
@pytest.mark.parametrize("scale", [1e30, 1e-30], ids=["overflow", "underflow"])
def test_per_tensor_norms_are_overflow_and_underflow_safe(p, scale):
    # fp32 sums of |x|^p leave float's range here; the rescue pass redoes them.
    ts = [torch.full((1000,), scale), torch.randn(50) * scale, torch.randn(20)]
    norms = fastclip.per_tensor_norms(ts, p)
    assert torch.isfinite(norms).all() and (norms > 0).all()
    for got, t in zip(norms.tolist(), ts):
        assert got == pytest.approx(exact_norm(t, p), rel=1e-6)


@needs_extension
def test_per_tensor_norms_nonfinite():
    ts = [torch.tensor([1.0, float("nan")]), torch.tensor([float("inf"), 2.0]), torch.ones(3)]
    for p in (2.0, math.inf, 1.0):
        n = fastclip.per_tensor_norms(ts, p).tolist()
        assert math.isnan(n[0]) and n[1] == math.inf and n[2] == pytest.approx(exact_norm(ts[2], p))


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_per_tensor_norms_bitwise_deterministic_across_thread_counts(dtype):
    ts = model_grads(LARGE + [(7,)], dtype, seed=4)
    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(fastclip.per_tensor_norms(ts, 2.0))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(r, results[0]) for r in results[1:])


def test_per_tensor_norms_inputs():
    t = torch.randn(3, 4)
    assert fastclip.per_tensor_norms(t).shape == (1,)  # a single Tensor
    gen = (x for x in [t, t[0]])
    assert fastclip.per_tensor_norms(gen).shape == (2,)  # a generator, consumed once
    empty = fastclip.per_tensor_norms([])
    assert empty.shape == (0,) and empty.dtype == torch.float32
    # the same tensor twice: read-only, so simply two norms
    assert torch.equal(*fastclip.per_tensor_norms([t, t]).unbind())


@pytest.mark.parametrize("p", [0.0, -1.0, 0.5])
def test_per_tensor_norms_other_p_match_torch(p):
    # p <= 0 takes the reference path; 0.5 the fused one
    ts = model_grads(MLP, torch.float32, seed=5)
    expected = torch.stack([torch.linalg.vector_norm(t, p) for t in ts])
    torch.testing.assert_close(fastclip.per_tensor_norms(ts, p), expected, rtol=1e-5, atol=0)


def test_per_tensor_norms_bad_input():
    with pytest.raises(TypeError, match=r"tensors\[1\] is a str"):
        fastclip.per_tensor_norms([torch.ones(2), "x"])
    with pytest.raises(TypeError, match="floating point"):
        fastclip.per_tensor_norms([torch.ones(2, dtype=torch.int64)])
    with pytest.raises(TypeError, match="sparse"):
        fastclip.per_tensor_norms([torch.ones(2).to_sparse()])
    with pytest.raises(ValueError, match="norm_type"):
        fastclip.per_tensor_norms([torch.ones(2)], "two")
    with pytest.raises(TypeError, match="iterable"):
        fastclip.per_tensor_norms(3)


@needs_extension
def test_per_tensor_norms_opcheck():
    ts = model_grads([(5, 7), (3,), (0,)], torch.float32, seed=6) + [torch.randn(4, dtype=torch.float64)]
    torch.library.opcheck(torch.ops.fastclip.per_tensor_norms.default, (ts, 2.0))
    torch.library.opcheck(torch.ops.fastclip.per_tensor_norms.default, (ts[:2], math.inf))


@needs_extension
def test_per_tensor_norms_trace_under_torch_compile():
    ts = model_grads(MLP, torch.float32, seed=7)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def norms(xs):
        return fastclip.per_tensor_norms(xs, 2.0) * 2

    torch.testing.assert_close(norms(ts), fastclip.per_tensor_norms(ts, 2.0) * 2)
