"""fastclip.AutoClip and fastclip.ZClip against their papers' algorithms
(tests/adaptive_reference.py, host-side with .item()) on recorded norm sequences:
warm-up and first steps included, every fused dtype, state round trips, the
non-finite policies, bad input, and torch.compile(fullgraph=True) as the proof
that a step reads nothing back to the host."""

import copy
import io
import math

import numpy as np
import pytest
import torch
from adaptive_reference import ReferenceAutoClip, ReferenceZClip

import fastclip
from helpers import DEVICES, FUSED_DTYPES

SHAPES = [(16, 8), (8,), (4, 4, 3), (5,)]


@pytest.fixture(params=["host", "tensor"])
def path(request, monkeypatch):
    """Both implementations of a step on CPU grads: Python floats on the host (the eager
    default there) and the device tensor ops (what CUDA, torch.compile and graphs run)."""
    monkeypatch.setattr(fastclip.thresholds._AdaptiveClipper, "_HOST_PATH_ON_CPU", request.param == "host")
    return request.param


@pytest.fixture(params=["host", "tensor"] + [d for d in DEVICES if d != "cpu"])
def where(request, monkeypatch):
    """The device a step runs on: CPU grads by either implementation (as `path`), or a GPU's
    grads (the tensor ops on the device). Returns the device."""
    monkeypatch.setattr(fastclip.thresholds._AdaptiveClipper, "_HOST_PATH_ON_CPU", request.param == "host")
    return request.param if request.param not in ("host", "tensor") else "cpu"


def norm_sequence(steps, seed, spikes=()):
    """Log-normal norms around 1 with planted spikes {step: factor}."""
    seq = np.exp(np.random.default_rng(seed).normal(0.0, 0.3, steps))
    for step, factor in dict(spikes).items():
        seq[step] *= factor
    return seq


def make_params(dtype, device="cpu"):
    return [torch.nn.Parameter(torch.zeros(s, dtype=dtype, device=device)) for s in SHAPES]


def set_grads(params, step, norm, seed=0):
    """Grads pointing a fresh random way each step, scaled to the given global norm."""
    gen = torch.Generator().manual_seed(seed * 100003 + step)
    dirs = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    scale = norm / math.sqrt(sum(float(d.square().sum()) for d in dirs))
    for p, d in zip(params, dirs):
        p.grad = (d * scale).to(p.device, p.dtype)


def copy_grads(src, dst, dtype=None):
    """dst's grads become copies of src's, on dst's device (in `dtype` if given)."""
    for s, d in zip(src, dst):
        d.grad = s.grad.to(d.device, dtype or s.grad.dtype, copy=True)


def run_against_reference(make_fast, make_ref, dtype, seq, seed=0, device="cpu"):
    """Run fastclip's clipper on `dtype` grads on `device`, the reference on the same grads (on
    the CPU), and the reference on their exact fp64 copies. Returns the per-step records and the
    grads errors (max relative to the largest exact grad) of fastclip and of the reference."""
    fast_p, ref_p, exact_p = make_params(dtype, device), make_params(dtype), make_params(torch.float64)
    fast, ref, exact = make_fast(), make_ref(), make_ref()
    rows, err_fast, err_ref = [], 0.0, 0.0
    for step, target in enumerate(seq):
        set_grads(fast_p, step, float(target), seed)
        copy_grads(fast_p, ref_p)
        copy_grads(fast_p, exact_p, torch.float64)
        norm = fast(fast_p)
        ref.step(ref_p)
        exact_norm, exact_threshold = exact.step(exact_p)
        rows.append((float(norm), exact_norm, float(fast.threshold), exact_threshold))
        top = max(float(p.grad.abs().max()) for p in exact_p)
        if math.isfinite(top) and top > 0:
            for f, r, e in zip(fast_p, ref_p, exact_p):
                err_fast = max(err_fast, float((f.grad.cpu().double() - e.grad).abs().max()) / top)
                err_ref = max(err_ref, float((r.grad.double() - e.grad).abs().max()) / top)
    return rows, err_fast, err_ref


THRESHOLD_RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-6, torch.bfloat16: 2e-6}


def assert_matches(rows, dtype, err_fast, err_ref):
    norms, exact_norms, thresholds, exact_thresholds = map(np.array, zip(*rows))
    rtol = THRESHOLD_RTOL[dtype]
    # The returned norm is in the grads' dtype: compare it at that precision.
    norm_rtol = max(rtol, float(torch.finfo(dtype).eps))
    np.testing.assert_allclose(norms, exact_norms, rtol=norm_rtol, equal_nan=True)
    np.testing.assert_allclose(thresholds, exact_thresholds, rtol=rtol, equal_nan=True)
    # flash-attention's rule: no more than 2x torch's own error against the fp64 result
    # (a few ulps allowed where torch's error is 0: fp64, where reference and exact coincide).
    assert err_fast <= max(2 * err_ref, 4 * float(torch.finfo(dtype).eps)), (err_fast, err_ref)


# ---- the papers' algorithms, warm-up and first steps included ------------------------

AUTOCLIP_CASES = [
    dict(),
    dict(percentile=50.0),
    dict(percentile=100.0),
    dict(percentile=10.0, history=7),
    dict(percentile=90.0, history=1),
]


@pytest.mark.parametrize("dtype", FUSED_DTYPES, ids=str)
@pytest.mark.parametrize("kwargs", AUTOCLIP_CASES, ids=repr)
def test_autoclip_matches_the_paper(dtype, kwargs, where):
    seq = norm_sequence(40, seed=1, spikes={0: 30.0, 3: 50.0, 20: 1e3, 21: 1e-3})
    rows, err_fast, err_ref = run_against_reference(
        lambda: fastclip.AutoClip(**kwargs), lambda: ReferenceAutoClip(**kwargs), dtype, seq, device=where
    )
    assert_matches(rows, dtype, err_fast, err_ref)
    # The clip really happened (a history of 1 clips each norm to itself: no count there).
    if kwargs.get("percentile", 10.0) < 100 and kwargs.get("history") != 1:
        assert sum(t < n for n, _, t, _ in rows) >= 10


ZCLIP_CASES = [
    dict(),
    dict(warmup_steps=1),
    dict(warmup_steps=5, z_thresh=1.0, alpha=0.9),
    dict(warmup_steps=5, max_grad_norm=1.2),
    dict(warmup_steps=3, max_grad_norm=0.5, alpha=0.5),
]


@pytest.mark.parametrize("dtype", FUSED_DTYPES, ids=str)
@pytest.mark.parametrize("kwargs", ZCLIP_CASES, ids=repr)
def test_zclip_matches_the_paper(dtype, kwargs, where):
    w = kwargs.get("warmup_steps", 25)
    # Spikes inside the warm-up, on its last step, right after it, and twice in a row later.
    seq = norm_sequence(w + 40, seed=2, spikes={0: 5.0, w - 1: 8.0, w: 20.0, w + 1: 6.0, w + 15: 100.0, w + 16: 50.0})
    rows, err_fast, err_ref = run_against_reference(
        lambda: fastclip.ZClip(**kwargs), lambda: ReferenceZClip(**kwargs), dtype, seq, device=where
    )
    assert_matches(rows, dtype, err_fast, err_ref)
    spikes = [k for k, (n, _, t, _) in enumerate(rows) if t < n]
    assert w in spikes and w + 15 in spikes  # the planted spikes after warm-up were clipped


def test_comparison_can_fail(path):
    """Negative controls: a wrong percentile, and ZClip's EMA fed the raw norm, are caught."""
    seq = norm_sequence(40, seed=1, spikes={20: 1e3})
    rows, ef, er = run_against_reference(
        lambda: fastclip.AutoClip(percentile=10.0), lambda: ReferenceAutoClip(percentile=20.0), torch.float64, seq
    )
    with pytest.raises(AssertionError):
        assert_matches(rows, torch.float64, ef, er)
    seq = norm_sequence(45, seed=2, spikes={30: 100.0})
    rows, ef, er = run_against_reference(
        lambda: fastclip.ZClip(warmup_steps=5),
        lambda: ReferenceZClip(warmup_steps=5, update_ema_with_raw_norm=True),
        torch.float64,
        seq,
    )
    with pytest.raises(AssertionError):
        assert_matches(rows, torch.float64, ef, er)


def test_autoclip_unbounded_history_grows_on_the_device(monkeypatch, path):
    """history=None keeps every norm: the buffer doubles (from 4 here) and still matches."""
    monkeypatch.setattr(fastclip.AutoClip, "_INITIAL_CAPACITY", 4)
    seq = norm_sequence(37, seed=3, spikes={2: 40.0})
    clipper = []
    rows, ef, er = run_against_reference(
        lambda: clipper.append(fastclip.AutoClip(percentile=30.0)) or clipper[0],
        lambda: ReferenceAutoClip(percentile=30.0),
        torch.float64,
        seq,
    )
    assert_matches(rows, torch.float64, ef, er)
    assert clipper[0].state_dict()["state"]["norms"].numel() == 64


def test_mixed_dtypes_and_missing_grads(path):
    """A model mixing fp32 and bf16 grads, one param without a grad: as the reference on fp64 copies."""
    params = [
        torch.nn.Parameter(torch.zeros(6, 4)),
        torch.nn.Parameter(torch.zeros(5, dtype=torch.bfloat16)),
        torch.nn.Parameter(torch.zeros(3)),
    ]
    clipper, ref = fastclip.ZClip(warmup_steps=2), ReferenceZClip(warmup_steps=2)
    for step, target in enumerate(norm_sequence(12, seed=4, spikes={6: 30.0})):
        set_grads(params[:2], step, float(target))
        exact = [torch.nn.Parameter(p.detach().double()) for p in params[:2]]
        copy_grads(params[:2], exact, torch.float64)
        clipper(params)
        _, t = ref.step(exact)
        assert float(clipper.threshold) == pytest.approx(t, rel=2e-6)
        for p, e in zip(params[:2], exact):
            torch.testing.assert_close(p.grad.double(), e.grad, rtol=1e-2, atol=1e-2 * float(e.grad.abs().max()))
    assert params[2].grad is None


def test_no_grads_changes_nothing():
    clipper = fastclip.AutoClip()
    assert float(clipper([torch.nn.Parameter(torch.zeros(3))])) == 0.0
    assert clipper.state_dict()["state"] is None


# ---- state_dict: a resumed run continues identically -----------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: fastclip.AutoClip(percentile=25.0),
        lambda: fastclip.AutoClip(history=5),
        lambda: fastclip.ZClip(warmup_steps=4),
    ],
    ids=["autoclip", "autoclip-ring", "zclip"],
)
@pytest.mark.parametrize("resume_at", [0, 2, 9])
def test_state_dict_round_trip(make, resume_at, path):
    seq = norm_sequence(20, seed=5, spikes={12: 50.0})
    params, resumed_params = make_params(torch.float32), make_params(torch.float32)
    original = make()
    for step in range(resume_at):
        set_grads(params, step, float(seq[step]))
        original(params)
    buf = io.BytesIO()
    torch.save(original.state_dict(), buf)
    resumed = make()
    resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    for step in range(resume_at, len(seq)):
        set_grads(params, step, float(seq[step]))
        copy_grads(params, resumed_params)
        assert torch.equal(original(params), resumed(resumed_params))
        assert torch.equal(original.threshold, resumed.threshold)
        for a, b in zip(params, resumed_params):
            assert torch.equal(a.grad, b.grad)


def test_load_state_dict_rejects_other_hyperparameters():
    with pytest.raises(ValueError, match="hyperparameters"):
        fastclip.ZClip(alpha=0.9).load_state_dict(fastclip.ZClip(alpha=0.97).state_dict())


def test_load_state_dict_keeps_found_inf_object(path):
    """Loading in place keeps the tensors a fused optimizer (or a CUDA graph) points at."""
    params = make_params(torch.float32)
    clipper = fastclip.ZClip(warmup_steps=2)
    set_grads(params, 0, 1.0)
    clipper(params)
    found_inf, saved = clipper.found_inf, clipper.state_dict()
    set_grads(params, 1, 1.0)
    clipper(params)
    clipper.load_state_dict(saved)
    assert clipper.found_inf is found_inf and int(clipper.state_dict()["state"]["count"]) == 1


# ---- the non-finite policies ---------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize(
    "make_pair",
    [
        lambda: (fastclip.AutoClip(percentile=50.0, history=6), ReferenceAutoClip(percentile=50.0, history=6)),
        lambda: (fastclip.ZClip(warmup_steps=3), ReferenceZClip(warmup_steps=3)),
    ],
    ids=["autoclip", "zclip"],
)
def test_torch_policy_follows_the_reference(bad, make_pair, path):
    """Default: the non-finite norm goes through the paper's algorithm and torch's formula."""
    seq = norm_sequence(16, seed=6)
    seq[5] = bad
    fast, ref = make_pair()
    params, ref_params = make_params(torch.float64), make_params(torch.float64)
    for step, target in enumerate(seq):
        set_grads(params, step, float(target))
        copy_grads(params, ref_params)
        fast(params)
        _, t = ref.step(ref_params)
        np.testing.assert_allclose(float(fast.threshold), t, rtol=1e-12, equal_nan=True)
        assert float(fast.found_inf) == float(not math.isfinite(target))
        for a, b in zip(params, ref_params):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    "make",
    [lambda **k: fastclip.AutoClip(history=6, **k), lambda **k: fastclip.ZClip(warmup_steps=3, **k)],
    ids=["autoclip", "zclip"],
)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_skip_policy_leaves_grads_and_state_untouched(make, bad, path):
    """nonfinite='skip': the bad step changes nothing and sets found_inf; the run then
    continues exactly as a run that never saw that step."""
    seq = norm_sequence(14, seed=7, spikes={9: 30.0})
    skipping, clean = make(nonfinite="skip"), make(nonfinite="skip")
    params, clean_params = make_params(torch.float32), make_params(torch.float32)
    for step, target in enumerate(seq):
        if step == 4:  # the bad step, seen only by `skipping`
            set_grads(params, 99, bad)
            before = [p.grad.clone() for p in params]
            state = copy.deepcopy(skipping.state_dict())
            norm = skipping(params)
            assert not math.isfinite(float(norm)) and float(skipping.found_inf) == 1.0
            for p, b in zip(params, before):
                assert torch.equal(p.grad, b) or torch.equal(p.grad.isnan(), b.isnan())
            after = skipping.state_dict()
            for k, v in state["state"].items():
                assert torch.equal(v, after["state"][k]), k
        set_grads(params, step, float(target))
        copy_grads(params, clean_params)
        assert torch.equal(skipping(params), clean(clean_params))
        assert float(skipping.found_inf) == 0.0
        assert torch.equal(skipping.threshold, clean.threshold)
        for a, b in zip(params, clean_params):
            assert torch.equal(a.grad, b.grad)


def test_skip_leaves_grads_bitwise_untouched_with_inf(path):
    """An inf grad is not multiplied (inf * coef would turn the zeros' neighbours... into NaN)."""
    params = make_params(torch.float32)
    set_grads(params, 0, 1.0)
    params[0].grad[0, 0] = math.inf
    before = [p.grad.clone() for p in params]
    fastclip.AutoClip(nonfinite="skip")(params)
    for p, b in zip(params, before):
        assert torch.equal(p.grad, b)


@pytest.mark.parametrize(
    "make",
    [lambda: fastclip.AutoClip(nonfinite="error"), lambda: fastclip.ZClip(warmup_steps=2, nonfinite="error")],
    ids=["autoclip", "zclip"],
)
def test_error_policy_raises_before_touching_anything(make, path):
    clipper = make()
    params = make_params(torch.float32)
    for step in range(3):
        set_grads(params, step, 1.0 + step)
        clipper(params)
    set_grads(params, 9, math.nan)
    state = copy.deepcopy(clipper.state_dict())
    with pytest.raises(RuntimeError, match="non-finite"):
        clipper(params)
    for k, v in state["state"].items():
        assert torch.equal(v, clipper.state_dict()["state"][k]), k


def test_skip_policy_drives_a_fused_optimizer(path):
    """optimizer.found_inf = clipper.found_inf: Adam(fused=True) skips its step on the
    device when the norm was non-finite (params, moments and step count unchanged) and
    steps normally otherwise, exactly as an Adam that only saw the finite steps."""
    torch.manual_seed(0)
    model, twin = torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)
    twin.load_state_dict(model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=0.1, fused=True)
    clipper, twin_clipper = fastclip.AutoClip(nonfinite="skip"), fastclip.AutoClip(nonfinite="skip")
    for step in range(6):
        x = torch.randn(4, 6)
        if step in (0, 3):  # non-finite gradients, seen only by `model`
            model(x * math.nan).sum().backward()
            clipper(model.parameters())
            assert float(clipper.found_inf) == 1.0
            snapshot = [p.detach().clone() for p in model.parameters()]
            opt.found_inf = clipper.found_inf
            opt.step()
            opt.zero_grad()
            for p, s in zip(model.parameters(), snapshot):
                assert torch.equal(p, s)
            continue
        for net, o, c in ((model, opt, clipper), (twin, twin_opt, twin_clipper)):
            net(x).sum().backward()
            c(net.parameters())
            o.found_inf = c.found_inf
            o.step()
            o.zero_grad()
        assert float(clipper.found_inf) == 0.0
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q)
    steps = [float(opt.state[p]["step"]) for p in model.parameters()]
    assert steps == [4.0, 4.0]  # the two skipped steps were not counted


def test_found_inf_control_a_plain_adam_would_step():
    """Control for the test above: without found_inf a NaN gradient does reach the params."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
    model(torch.full((1, 3), math.nan)).sum().backward()
    fastclip.AutoClip(nonfinite="skip")(model.parameters())
    opt.step()
    assert torch.isnan(model.weight).all()


# ---- clip_grad_norm_'s keyword-only policy ---------------------------------------------------


def test_clip_grad_norm_skip_and_found_inf():
    params = make_params(torch.float32)
    set_grads(params, 0, 5.0)
    twin = make_params(torch.float32)
    copy_grads(params, twin)
    found_inf = torch.tensor(7.0)
    norm = fastclip.clip_grad_norm_(params, 1.0, nonfinite="skip", found_inf=found_inf)
    torch_norm = torch.nn.utils.clip_grad_norm_(twin, 1.0)
    torch.testing.assert_close(norm, torch_norm)
    for a, b in zip(params, twin):
        torch.testing.assert_close(a.grad, b.grad)
    assert float(found_inf) == 0.0
    params[1].grad[0] = math.nan
    before = [p.grad.clone() for p in params]
    norm = fastclip.clip_grad_norm_(params, 1.0, nonfinite="skip", found_inf=found_inf)
    assert math.isnan(float(norm)) and float(found_inf) == 1.0
    for p, b in zip(params, before):
        assert torch.equal(p.grad.nan_to_num(), b.nan_to_num())
    # torch's default on the same grads: every grad becomes NaN.
    fastclip.clip_grad_norm_(params, 1.0)
    assert all(torch.isnan(p.grad).all() for p in params)


def test_clip_grad_norm_error_policy():
    params = make_params(torch.float32)
    set_grads(params, 0, math.inf)
    before = [p.grad.clone() for p in params]
    with pytest.raises(RuntimeError, match="non-finite"):
        fastclip.clip_grad_norm_(params, 1.0, nonfinite="error")
    for p, b in zip(params, before):
        assert torch.equal(p.grad, b)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(nonfinite="ignore"), ValueError, "nonfinite must be one of"),
        (dict(nonfinite="skip", error_if_nonfinite=True), ValueError, "contradict"),
        (dict(found_inf=torch.zeros(())), ValueError, "only with nonfinite='skip'"),
        (dict(nonfinite="skip", found_inf=torch.zeros(2)), TypeError, "0-dim"),
        (dict(nonfinite="skip", found_inf=1.0), TypeError, "0-dim"),
    ],
)
def test_clip_grad_norm_policy_bad_input(kwargs, exc, match):
    params = make_params(torch.float32)
    set_grads(params, 0, 5.0)
    before = [p.grad.clone() for p in params]
    with pytest.raises(exc, match=match):
        fastclip.clip_grad_norm_(params, 1.0, **kwargs)
    for p, b in zip(params, before):
        assert torch.equal(p.grad, b)


# ---- bad input: clear errors, nothing touched ----------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: fastclip.AutoClip(percentile=0.0), r"percentile must be in \(0.0, 100.0\]"),
        (lambda: fastclip.AutoClip(percentile=100.5), "percentile"),
        (lambda: fastclip.AutoClip(percentile=-5), "percentile"),
        (lambda: fastclip.AutoClip(percentile=math.nan), "percentile"),
        (lambda: fastclip.AutoClip(history=0), "history must be an integer >= 1"),
        (lambda: fastclip.AutoClip(history=2.5), "history"),
        (lambda: fastclip.AutoClip(history=True), "history"),
        (lambda: fastclip.AutoClip(nonfinite="zero"), "nonfinite"),
        (lambda: fastclip.AutoClip(norm_type="two"), "norm_type"),
        (lambda: fastclip.ZClip(alpha=0.0), r"alpha must be in \(0.0, 1.0\)"),
        (lambda: fastclip.ZClip(alpha=1.0), "alpha"),
        (lambda: fastclip.ZClip(alpha=1.5), "alpha"),
        (lambda: fastclip.ZClip(z_thresh=0.0), "z_thresh"),
        (lambda: fastclip.ZClip(z_thresh=math.inf), "z_thresh"),
        (lambda: fastclip.ZClip(warmup_steps=0), "warmup_steps"),
        (lambda: fastclip.ZClip(max_grad_norm=-1.0), "max_grad_norm"),
        (lambda: fastclip.ZClip(max_grad_norm=math.nan), "max_grad_norm"),
    ],
)
def test_bad_hyperparameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("make", [fastclip.AutoClip, fastclip.ZClip], ids=["autoclip", "zclip"])
def test_bad_grads_raise_before_state_exists(make):
    clipper = make()
    good = make_params(torch.float32)
    set_grads(good, 0, 1.0)
    before = [g.grad.clone() for g in good]
    bad = torch.zeros(4, dtype=torch.int32)
    bad.grad = torch.ones(4, dtype=torch.int32)
    with pytest.raises(TypeError, match="floating point"):
        clipper([*good, bad])
    for g, b in zip(good, before):
        assert torch.equal(g.grad, b)
    with pytest.raises(TypeError, match="not a Tensor"):
        clipper([3.0])
    assert clipper.state_dict()["state"] is None


# ---- no host sync: a step compiles as one graph ---------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: fastclip.AutoClip(percentile=20.0, history=16),
        lambda: fastclip.ZClip(warmup_steps=3, max_grad_norm=2.0),
        lambda: fastclip.ZClip(warmup_steps=3, nonfinite="skip"),
    ],
    ids=["autoclip", "zclip", "zclip-skip"],
)
def test_step_compiles_fullgraph(make, path):
    """torch.compile(fullgraph=True) fails on any host read (.item(), bool(tensor),
    indexing with a 0-dim tensor...): the compiled step (the tensor path) matches the
    eager one (either path)."""
    torch._dynamo.reset()
    compiled_clipper, eager = make(), make()
    params, eager_params = make_params(torch.float32), make_params(torch.float32)
    step_fn = torch.compile(lambda: compiled_clipper(params), fullgraph=True, backend="aot_eager")
    seq = norm_sequence(12, seed=8, spikes={6: 40.0})
    for step, target in enumerate(seq):
        set_grads(params, step, float(target))
        copy_grads(params, eager_params)
        torch.testing.assert_close(step_fn(), eager(eager_params), rtol=1e-6, atol=0)
        torch.testing.assert_close(compiled_clipper.threshold, eager.threshold, rtol=1e-6, atol=0)
        for a, b in zip(params, eager_params):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


def test_unbounded_history_refuses_to_compile():
    torch._dynamo.reset()
    clipper, params = fastclip.AutoClip(), make_params(torch.float32)
    set_grads(params, 0, 1.0)
    with pytest.raises(Exception, match="history=N"):
        torch.compile(lambda: clipper(params), fullgraph=True, backend="aot_eager")()


def test_compile_control_a_host_read_breaks_the_graph():
    """Control: the same harness rejects a step that reads the norm back (as the references do)."""
    torch._dynamo.reset()
    params = make_params(torch.float32)
    set_grads(params, 0, 1.0)
    ref = ReferenceAutoClip()
    with pytest.raises(torch._dynamo.exc.Unsupported):  # the graph break fullgraph forbids
        torch.compile(lambda: ref.step(params), fullgraph=True, backend="aot_eager")()


def test_clip_grad_norm_skip_compiles_fullgraph():
    """The function's skip policy reads nothing back either."""
    torch._dynamo.reset()
    params, twin = make_params(torch.float32), make_params(torch.float32)
    found_inf = torch.zeros(())
    step_fn = torch.compile(
        lambda: fastclip.clip_grad_norm_(params, 1.0, nonfinite="skip", found_inf=found_inf),
        fullgraph=True,
        backend="aot_eager",
    )
    for step, target in enumerate([5.0, math.nan, 0.5]):
        set_grads(params, step, target)
        copy_grads(params, twin)
        torch.testing.assert_close(step_fn(), fastclip.clip_grad_norm_(twin, 1.0, nonfinite="skip"), equal_nan=True)
        assert float(found_inf) == float(not math.isfinite(target))
        for a, b in zip(params, twin):
            torch.testing.assert_close(a.grad, b.grad, equal_nan=True)
