"""Per-tensor norms, local (per-layer) clipping and AGC against independent
references written here from the definitions (fp64, one tensor or unit at a
time, with .item() where convenient), on model-shaped sets, every dtype."""

import math

import pytest
import torch

import fastclip
from helpers import DEVICES, FUSED_DTYPES, make_params

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
    """What rounding alone allows, relative: one ulp of the result plus
    4 sqrt(numel) ulps of the accumulator (both fp32; fp64 for fp64 tensors)."""
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    return eps * (1 + 4 * math.sqrt(max(numel, 1)))


def assert_norms_match(norms, tensors, p):
    """Each norm within accumulator rounding of the fp64 norm: stricter than
    "2x torch's own error", since torch's fp16/bf16 norm is rounded to 8-11 bits."""
    assert norms.dim() == 1 and norms.numel() == len(tensors)
    for got, t in zip(norms.tolist(), tensors):
        exact = exact_norm(t, p)
        if not math.isfinite(exact):
            assert (math.isnan(got) and math.isnan(exact)) or got == exact, (got, exact)
            continue
        assert abs(got - exact) <= acc_slack(t.dtype, t.numel()) * exact + 1e-300, (got, exact, t.shape, t.dtype)


def model_grads(shapes, dtype, seed=0, noncontiguous=False, scale=1.0, device="cpu"):
    params = make_params(shapes, dtype, seed=seed, noncontiguous=noncontiguous, scale=scale, device=device)
    return [p.grad for p in params]


# ---- per_tensor_norms -------------------------------------------------------


@needs_extension
@pytest.mark.parametrize("dtype", FUSED_DTYPES, ids=str)
@pytest.mark.parametrize("p", NORM_TYPES, ids=repr)
@pytest.mark.parametrize("shapes", [MLP, CNN, MIXED], ids=["mlp", "cnn", "mixed"])
@pytest.mark.parametrize("device", DEVICES)
def test_per_tensor_norms_match_the_fp64_reference(device, shapes, p, dtype):
    ts = model_grads(shapes, dtype, seed=1, noncontiguous=True, scale=3.0, device=device)
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


# ---- shared by the clipping tests -------------------------------------------

GRAD_RTOL = {torch.float64: 1e-10, torch.float32: 5e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def snapshot(params):
    return [None if p.grad is None else p.grad.clone() for p in params]


def assert_clipped_like(params, expected, baseline=None):
    """Each grad equals the fp64 reference `expected` to within rounding of
    its dtype and, when `baseline` (the same clip done by a plain torch loop
    in the grads' dtype) is given, is no further from it than twice the loop's
    own error plus one rounding of the dtype."""
    got = [p.grad for p in params if p.grad is not None]
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        if g.numel() == 0:
            continue
        scale = float(e.abs().max())
        fi = torch.finfo(g.dtype)
        step = fi.tiny * fi.eps  # the dtype's resolution near 0 (one subnormal step)
        torch.testing.assert_close(
            g.double(), e, rtol=GRAD_RTOL[g.dtype], atol=GRAD_RTOL[g.dtype] * scale + step, equal_nan=True
        )
        if baseline is not None:
            ours = float((g.double() - e).abs().max())
            theirs = float((baseline[i].double() - e).abs().max())
            # plus one rounding of the result and the coefficient's accumulator rounding
            slack = (fi.eps + acc_slack(g.dtype, g.numel())) * scale + step
            assert ours <= 2 * theirs + slack, (i, ours, theirs)


# ---- local (per-layer) clipping ---------------------------------------------


def per_layer_reference(grads, layers, max_norm, p):
    """fp64 grads after local clipping, and each grad's layer norm, from the
    definition: one norm over all elements of a layer's grads."""
    flat = {}
    for g, layer in zip(grads, layers):
        flat.setdefault(layer, []).append(g.detach().double().reshape(-1))
    layer_norm = {k: exact_norm(torch.cat(v), p) for k, v in flat.items()}
    norms = [layer_norm[layer] for layer in layers]
    clipped = [g.double() * min(max_norm / (n + 1e-6), 1.0) for g, n in zip(grads, norms)]
    return clipped, norms


def torch_per_layer_loop(grads, max_norm, p):
    """The plain torch loop users write today (the benchmark's baseline)."""
    out = [g.clone() for g in grads]
    for g in out:
        if g.numel() == 0:  # torch has no inf-norm of an empty tensor
            continue
        n = torch.linalg.vector_norm(g, p)
        g.mul_(torch.clamp(max_norm / (n + 1e-6), max=1.0))
    return out


def median_norm(grads, p):
    return sorted(exact_norm(g, p) for g in grads)[len(grads) // 2]


@needs_extension
@pytest.mark.parametrize("dtype", FUSED_DTYPES, ids=str)
@pytest.mark.parametrize("p", NORM_TYPES, ids=repr)
@pytest.mark.parametrize("shapes", [MLP, CNN, MIXED], ids=["mlp", "cnn", "mixed"])
@pytest.mark.parametrize("device", DEVICES)
def test_per_layer_matches_the_reference(device, shapes, p, dtype):
    params = make_params(shapes, dtype, seed=11, none_every=5, noncontiguous=True, scale=2.0, device=device)
    grads = [q.grad for q in params if q.grad is not None]
    max_norm = median_norm(grads, p)  # about half the tensors clipped, half untouched
    expected, norms_ref = per_layer_reference(grads, list(range(len(grads))), max_norm, p)
    baseline = torch_per_layer_loop(grads, max_norm, p)
    before = snapshot(params)
    norms = fastclip.clip_grad_norm_per_layer_(params, max_norm, p)
    assert norms.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and norms.shape == (len(grads),)
    for got, exact, g in zip(norms.tolist(), norms_ref, grads):
        assert abs(got - exact) <= acc_slack(dtype, g.numel()) * exact + 1e-300
    assert_clipped_like(params, expected, baseline)
    # a grad under its threshold is left bitwise untouched
    kept = [(g, b) for g, b, n in zip(grads, [b for b in before if b is not None], norms_ref) if n * 1.001 < max_norm]
    assert kept and all(torch.equal(g, b) for g, b in kept)


def test_per_layer_comparison_can_fail():
    # Negative control: clipping to 1% less than asked is caught.
    params = make_params(MLP, seed=12, scale=2.0)
    grads = [q.grad for q in params]
    max_norm = median_norm(grads, 2.0)
    expected, _ = per_layer_reference(grads, list(range(len(grads))), max_norm, 2.0)
    fastclip.clip_grad_norm_per_layer_(params, max_norm * 0.99)
    with pytest.raises(AssertionError):
        assert_clipped_like(params, expected)


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.fc = torch.nn.Linear(8 * 6 * 6, 4)
        self.head = torch.nn.Linear(4, 2, bias=False)

    def forward(self, x):
        return self.head(self.fc(torch.relu(self.conv(x)).flatten(1)))


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_per_layer_by_module_shares_one_norm_per_layer(dtype):
    torch.manual_seed(13)
    model = SmallCNN().to(dtype)
    model(torch.randn(2, 3, 8, 8, dtype=dtype)).square().sum().backward()
    params = list(model.parameters())
    grads = [q.grad for q in params]
    layers = [0, 0, 1, 1, 2]  # conv.weight, conv.bias, fc.weight, fc.bias, head.weight
    expected, norms_ref = per_layer_reference(grads, layers, median_norm(grads, 2.0), 2.0)
    norms = fastclip.clip_grad_norm_per_layer_(model, median_norm(grads, 2.0), by="module")
    assert norms.shape == (5,) and norms[0] == norms[1] and norms[2] == norms[3]
    torch.testing.assert_close(norms.double(), torch.tensor(norms_ref, dtype=torch.float64), rtol=1e-6, atol=0)
    assert_clipped_like(params, expected)


@needs_extension
def test_per_layer_large_set_and_thread_count_determinism():
    base = make_params(LARGE + [(7,)], seed=14)
    grads0 = [q.grad for q in base]
    max_norm = median_norm(grads0, 2.0)
    expected, _ = per_layer_reference(grads0, list(range(4)), max_norm, 2.0)
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            params = [torch.nn.Parameter(q.detach().clone()) for q in base]
            for q, b in zip(params, base):
                q.grad = b.grad.clone()
            results.append((fastclip.clip_grad_norm_per_layer_(params, max_norm), [q.grad for q in params]))
    finally:
        torch.set_num_threads(old)
    assert_clipped_like(params, expected)
    # the pre-clip norms are bitwise per_tensor_norms' (same chunk partials, same order)
    assert torch.equal(results[0][0], fastclip.per_tensor_norms(grads0))
    for norms, gs in results[1:]:
        assert torch.equal(norms, results[0][0]) and all(torch.equal(a, b) for a, b in zip(gs, results[0][1]))


@needs_extension
def test_per_layer_half_precision_norm_above_fp16_range():
    # fp16 norms > 65504: torch's fp16 loop gets inf and zeroes the grad; the
    # fp32 accumulator clips it to max_norm.
    params = [torch.nn.Parameter(torch.zeros(4096, dtype=torch.float16))]
    params[0].grad = torch.full((4096,), 2000.0, dtype=torch.float16)
    norms = fastclip.clip_grad_norm_per_layer_(params, 1.0)
    assert norms.item() == pytest.approx(2000.0 * 64)
    assert float(torch.linalg.vector_norm(params[0].grad.float())) == pytest.approx(1.0, rel=1e-3)


def test_per_layer_inputs_and_bad_input():
    t = torch.nn.Parameter(torch.zeros(3))
    t.grad = torch.ones(3)
    assert fastclip.clip_grad_norm_per_layer_(t, 1.0).shape == (1,)  # a single Tensor
    assert fastclip.clip_grad_norm_per_layer_((q for q in [t]), 1.0).shape == (1,)  # a generator
    assert fastclip.clip_grad_norm_per_layer_([torch.nn.Parameter(torch.zeros(2))], 1.0).shape == (0,)
    with pytest.warns(UserWarning, match="empty generator"):
        fastclip.clip_grad_norm_per_layer_((x for x in []), 1.0)
    good = torch.nn.Parameter(torch.zeros(4))
    good.grad = torch.full((4,), 10.0)
    cases = [
        (TypeError, "parameters\\[1\\] is a str", dict(parameters=[good, "w"], max_norm=1.0)),
        (ValueError, "max_norm", dict(parameters=[good], max_norm=-1.0)),
        (ValueError, "max_norm", dict(parameters=[good], max_norm=float("nan"))),
        (ValueError, "norm_type", dict(parameters=[good], max_norm=1.0, norm_type="x")),
        (ValueError, "by must be", dict(parameters=[good], max_norm=1.0, by="row")),
        (ValueError, "needs an nn.Module", dict(parameters=[good], max_norm=1.0, by="module")),
    ]
    for exc, match, kwargs in cases:
        with pytest.raises(exc, match=match):
            fastclip.clip_grad_norm_per_layer_(**kwargs)
        assert torch.equal(good.grad, torch.full((4,), 10.0))  # untouched


def test_per_layer_rejects_integer_and_sparse_grads_before_touching():
    good = torch.nn.Parameter(torch.zeros(4))
    good.grad = torch.full((4,), 10.0)
    other = torch.nn.Parameter(torch.zeros(4))
    for bad_grad, match in [(torch.ones(4).to_sparse(), "sparse")]:
        other.grad = bad_grad
        with pytest.raises(TypeError, match=match):
            fastclip.clip_grad_norm_per_layer_([good, other], 1.0)
        assert torch.equal(good.grad, torch.full((4,), 10.0))
    with pytest.raises(TypeError, match="floating point"):
        fastclip.per_tensor_norms([good.grad, torch.ones(2, dtype=torch.int32)])


@needs_extension
def test_per_layer_repeated_grad_is_scaled_once():
    p = torch.nn.Parameter(torch.zeros(10))
    p.grad = torch.full((10,), 3.0)
    norms = fastclip.clip_grad_norm_per_layer_([p, p], 1.0)
    assert torch.equal(norms[0], norms[1])
    assert float(torch.linalg.vector_norm(p.grad)) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("p", [0.0, -1.0])
def test_per_layer_nonpositive_p_takes_the_reference_path(p):
    params = make_params(MLP, seed=15, scale=3.0)
    grads = [q.grad for q in params]
    norms_torch = torch.stack([torch.linalg.vector_norm(g, p) for g in grads])
    expected = [g * torch.clamp(1.0 / (n + 1e-6), max=1.0) for g, n in zip(grads, norms_torch)]
    norms = fastclip.clip_grad_norm_per_layer_(params, 1.0, p)
    torch.testing.assert_close(norms, norms_torch)
    for q, e in zip(params, expected):
        torch.testing.assert_close(q.grad, e)


@needs_extension
def test_per_layer_opcheck():
    gs = [g.clone() for g in model_grads([(5, 7), (3,), (0,)], torch.float32, seed=16, scale=4.0)]
    gs.append(torch.randn(4, dtype=torch.float64) * 9)
    op = torch.ops.fastclip.clip_grad_norm_per_layer_.default
    torch.library.opcheck(op, (gs, [], 0.5, 2.0))
    torch.library.opcheck(op, (gs, [0, 0, 1, 1], 0.5, math.inf))


@needs_extension
def test_per_layer_traces_under_torch_compile():
    params = make_params(MLP, seed=17, scale=3.0)
    theirs = [torch.nn.Parameter(q.detach().clone()) for q in params]
    for q, r in zip(params, theirs):
        r.grad = q.grad.clone()

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(ps):
        return fastclip.clip_grad_norm_per_layer_(ps, 1.0)

    torch.testing.assert_close(step(params), fastclip.clip_grad_norm_per_layer_(theirs, 1.0))
    for q, r in zip(params, theirs):
        torch.testing.assert_close(q.grad, r.grad)


# ---- adaptive (unit-wise) clipping --------------------------------------------


def agc_reference(param, grad, clip_factor, eps, p):
    """The paper's formula (Brock et al. 2021, eq. 3) in fp64, one unit at a
    time: a unit is a row (index 0) of a >= 2-D tensor, a <= 1-D tensor is one
    unit; where ||G_i|| / max(||W_i||, eps) > clip_factor, G_i is scaled by
    clip_factor * max(||W_i||, eps) / ||G_i||. As in timm, the division is by
    max(||G_i||, 1e-6) (a guard against 0 / 0 that only matters when the
    threshold itself is below 1e-6: never with the default eps and clip_factor)."""
    g = grad.detach().double().clone()
    if g.numel() == 0:
        return g
    w = param.detach().double()
    g = g.contiguous()
    rows_g = g.view(g.shape[0], -1) if g.dim() > 1 else g.view(1, -1)
    rows_w = w.reshape(rows_g.shape)
    for i in range(rows_g.shape[0]):
        w_norm = max(exact_norm(rows_w[i], p), eps)
        g_norm = exact_norm(rows_g[i], p)
        if g_norm / w_norm > clip_factor:
            rows_g[i] *= clip_factor * w_norm / max(g_norm, 1e-6)
    return g


def timm_style_loop(params, clip_factor, eps, p):
    """The plain torch loop users write today (timm's adaptive_clip_grad, in
    the grads' dtype): the benchmark's baseline. Returns new grads."""
    out = []
    for q in params:
        if q.grad is None:
            continue
        g = q.grad.clone()
        if g.numel():
            dims = tuple(range(1, g.dim())) if g.dim() > 1 else None
            w_norm = torch.linalg.vector_norm(q.detach(), p, dim=dims, keepdim=g.dim() > 1)
            g_norm = torch.linalg.vector_norm(g, p, dim=dims, keepdim=g.dim() > 1)
            max_norm = w_norm.clamp(min=eps).mul_(clip_factor)
            g = torch.where(g_norm < max_norm, g, g * (max_norm / g_norm.clamp(min=1e-6)))
        out.append(g)
    return out


def agc_params(shapes, dtype, seed, noncontiguous=False, device="cpu"):
    """Random weights and grads whose rows straddle AGC's threshold: each
    row's grad is scaled by 10^U(-3.3, -1.3) against clip_factor 0.01, so about
    half the units are clipped. Biases (1-D) start at zero, as they do in
    models: their threshold comes from eps."""
    gen = torch.Generator().manual_seed(seed)
    params = make_params(shapes, dtype, seed=seed, noncontiguous=noncontiguous, device=device)
    for q in params:
        if q.grad is None:
            continue
        if q.dim() > 1:
            with torch.no_grad():
                q.copy_(torch.randn(q.shape, generator=gen, dtype=torch.float64))
        rows = q.shape[0] if q.dim() > 1 and q.numel() else 1
        factor = (10 ** (torch.rand(rows, generator=gen, dtype=torch.float64) * 2 - 3.3)).to(device)
        factor = factor.view(-1, *([1] * (q.dim() - 1))) if q.dim() > 1 else factor * 1e-2
        q.grad.copy_((q.grad.double() * factor).to(dtype))
    return params


@needs_extension
@pytest.mark.parametrize("dtype", FUSED_DTYPES, ids=str)
@pytest.mark.parametrize("p", NORM_TYPES, ids=repr)
@pytest.mark.parametrize("shapes", [MLP, CNN, MIXED], ids=["mlp", "cnn", "mixed"])
@pytest.mark.parametrize("device", DEVICES)
def test_agc_matches_the_papers_formula(device, shapes, p, dtype):
    params = agc_params(shapes, dtype, seed=21, noncontiguous=True, device=device)
    expected = [agc_reference(q, q.grad, 0.01, 1e-3, p) for q in params if q.grad is not None]
    baseline = timm_style_loop(params, 0.01, 1e-3, p)
    before = snapshot(params)
    assert fastclip.adaptive_clip_grad_(params, 0.01, 1e-3, p) is None
    assert_clipped_like(params, expected, baseline)
    # units under the threshold are bitwise untouched, and some units are clipped
    clipped = untouched = 0
    for q, b, e in zip(params, before, expected):
        if b is None or b.numel() == 0:
            continue
        rows = lambda t: t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
        for g_row, b_row, e_row in zip(rows(q.grad), rows(b), rows(e)):
            if torch.equal(e_row, b_row.double()):
                assert torch.equal(g_row, b_row)
                untouched += 1
            else:
                clipped += 1
    assert clipped and untouched


def test_agc_comparison_can_fail():
    # Negative control: a reference with a 5% larger clip_factor is caught.
    params = agc_params(MLP, torch.float32, seed=22)
    expected = [agc_reference(q, q.grad, 0.0105, 1e-3, 2.0) for q in params]
    fastclip.adaptive_clip_grad_(params, 0.01)
    with pytest.raises(AssertionError):
        assert_clipped_like(params, expected)


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_agc_long_units_and_layouts(dtype):
    # Rows over 64Ki elements and a big 1-D tensor (the chunked path), a
    # channels_last conv weight, a transposed weight, and a strided grad view.
    params = agc_params([(2, 70000), (150000,), (8, 4, 3, 3), (30, 20)], dtype, seed=23)
    conv = params[2]
    conv.data = conv.data.contiguous(memory_format=torch.channels_last)
    conv.grad = conv.grad.contiguous(memory_format=torch.channels_last)
    params[3].data = params[3].data.t().contiguous().t()
    wide = torch.zeros(30, 40, dtype=dtype)
    wide[:, ::2] = params[3].grad
    params[3].grad = wide[:, ::2]
    for p in (2.0, math.inf):
        qs = [torch.nn.Parameter(q.detach().clone()) for q in params]
        for q, r in zip(qs, params):
            q.grad = r.grad.clone()
        expected = [agc_reference(q, q.grad, 0.01, 1e-3, p) for q in qs]
        fastclip.adaptive_clip_grad_(qs, 0.01, 1e-3, p)
        assert_clipped_like(qs, expected)
    fastclip.adaptive_clip_grad_(params, 0.01)
    assert wide[:, 1::2].abs().sum() == 0  # the view's neighbours are not written


@needs_extension
def test_agc_large_set_is_bitwise_deterministic_across_thread_counts():
    base = agc_params(LARGE + [(2, 70000)], torch.float32, seed=24)
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            qs = [torch.nn.Parameter(q.detach().clone()) for q in base]
            for q, r in zip(qs, base):
                q.grad = r.grad.clone()
            fastclip.adaptive_clip_grad_(qs, 0.01)
            results.append([q.grad for q in qs])
    finally:
        torch.set_num_threads(old)
    expected = [agc_reference(q, q.grad, 0.01, 1e-3, 2.0) for q in base]
    assert_clipped_like(qs, expected)
    assert all(torch.equal(a, b) for r in results[1:] for a, b in zip(r, results[0]))


@needs_extension
def test_agc_units_are_overflow_safe_in_half_precision():
    # fp16 unit norms above 65504: the fp32 accumulator still finds the right
    # threshold (a norm in fp16 would be inf and clip to NaN or 0).
    q = torch.nn.Parameter(torch.full((2, 4096), 1000.0, dtype=torch.float16))
    q.grad = torch.full((2, 4096), 100.0, dtype=torch.float16)
    expected = agc_reference(q, q.grad, 0.01, 1e-3, 2.0)
    fastclip.adaptive_clip_grad_([q], 0.01)
    assert_clipped_like([q], [expected])


@needs_extension
@pytest.mark.parametrize("scale", [1e25, 1e-25], ids=["overflow", "underflow"])
def test_agc_unit_norms_outside_float_range_take_the_rescue_pass(scale):
    # fp32 sums of squares of these rows leave float's range (short rows and a
    # long 1-D unit); the norms must still be right, so the threshold is.
    params = agc_params([(4, 300), (70000,)], torch.float32, seed=28)
    for q in params:
        with torch.no_grad():
            q.mul_(scale)
        q.grad.mul_(scale)
    expected = [agc_reference(q, q.grad, 0.01, 1e-3 * scale, 2.0) for q in params]
    fastclip.adaptive_clip_grad_(params, 0.01, 1e-3 * scale)
    assert_clipped_like(params, expected)


def test_agc_inputs_and_bad_input():
    w = torch.nn.Parameter(torch.ones(3, 4))
    w.grad = torch.full((3, 4), 5.0)
    fastclip.adaptive_clip_grad_(w, 0.01)  # a single Tensor
    torch.testing.assert_close(w.grad, torch.full((3, 4), 0.01))  # every row held to 0.01 * ||W_i||
    w.grad.fill_(5.0)
    fastclip.adaptive_clip_grad_((q for q in [w]), 0.01)  # a generator
    torch.testing.assert_close(w.grad, torch.full((3, 4), 0.01))
    fastclip.adaptive_clip_grad_([torch.nn.Parameter(torch.zeros(2))])  # no grads: nothing to do
    with pytest.warns(UserWarning, match="empty generator"):
        fastclip.adaptive_clip_grad_(x for x in [])
    w.grad.fill_(5.0)
    for exc, match, kwargs in [
        (TypeError, "parameters\\[1\\] is a int", dict(parameters=[w, 3])),
        (ValueError, "clip_factor", dict(parameters=[w], clip_factor=-0.1)),
        (ValueError, "eps", dict(parameters=[w], eps=float("nan"))),
        (ValueError, "norm_type", dict(parameters=[w], norm_type=None)),
    ]:
        with pytest.raises(exc, match=match):
            fastclip.adaptive_clip_grad_(**kwargs)
        assert torch.equal(w.grad, torch.full((3, 4), 5.0))


@pytest.mark.parametrize("p", [0.0, -1.0])
def test_agc_nonpositive_p_takes_the_reference_path(p):
    params = agc_params(MLP, torch.float32, seed=25)
    expected = timm_style_loop(params, 0.01, 1e-3, p)
    fastclip.adaptive_clip_grad_(params, 0.01, 1e-3, p)
    for q, e in zip(params, expected):
        torch.testing.assert_close(q.grad, e)


@needs_extension
def test_agc_opcheck():
    params = agc_params([(5, 7), (3,), (0,), (4, 2, 3)], torch.float32, seed=26)
    ps = [q.detach().clone() for q in params]
    gs = [q.grad.clone() for q in params]
    torch.library.opcheck(torch.ops.fastclip.adaptive_clip_grad_.default, (ps, gs, 0.01, 1e-3, 2.0))
    torch.library.opcheck(torch.ops.fastclip.adaptive_clip_grad_.default, (ps, gs, 0.01, 1e-3, math.inf))


@needs_extension
def test_agc_traces_under_torch_compile():
    params = agc_params(CNN, torch.float32, seed=27)
    theirs = [torch.nn.Parameter(q.detach().clone()) for q in params]
    for q, r in zip(params, theirs):
        r.grad = q.grad.clone()

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(ps):
        fastclip.adaptive_clip_grad_(ps, 0.01)

    step(params)
    fastclip.adaptive_clip_grad_(theirs, 0.01)
    for q, r in zip(params, theirs):
        torch.testing.assert_close(q.grad, r.grad)


# ---- trainers: --clip-mode ---------------------------------------------------


@needs_extension
@pytest.mark.parametrize("mode", ["per-layer", "agc"])
@pytest.mark.parametrize("algo", ["dqn", "a2c", "reinforce"])
def test_trainers_run_each_clip_mode(algo, mode, tmp_path, monkeypatch):
    pytest.importorskip("gymnasium")
    from test_examples import _run

    runs = {}
    for clip in ("fastclip", "torch"):
        (tmp_path / clip).mkdir()
        runs[clip] = s = _run(algo, clip, tmp_path / clip, monkeypatch, extra=("--clip-mode", mode))
        assert s["clip_mode"] == mode and s["clip_calls"] == s["updates"] > 0
        assert s["clip_fraction"] == -1.0  # the global norm cannot tell what a local clip did
        assert math.isfinite(s["eval_return_mean"]) and 0 < s["grad_norm_p50"] <= s["grad_norm_p99"]
        with open(tmp_path / clip / "runs" / f"{algo}_{clip}" / "metrics.csv") as f:
            rows = f.read().strip().splitlines()
        assert rows[1].split(",")[rows[0].split(",").index("clipped")] == "-1"
    # the same seed and the same clip, fused or looped (they differ only by rounding): the runs'
    # median pre-clip norms agree
    assert runs["fastclip"]["grad_norm_p50"] == pytest.approx(runs["torch"]["grad_norm_p50"], rel=1e-2)
