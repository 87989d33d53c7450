"""fastclip.optim.Adam/AdamW (the clip inside the step) against torch: clip_grad_norm_ +
torch.optim.Adam/AdamW(fused=True) on the same (cloned) params and grads, on the CPU and,
where a GPU is, on CUDA (test_cuda_optim.py has what is CUDA's own). The parity test over
200 training steps is test_optim_parity.py."""

import copy
import math

import pytest
import torch

import fastclip
from fastclip import _ops

needs_extension = pytest.mark.skipif(not _ops.LOADED, reason="the compiled extension did not load")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]

# Biases, a matrix, a zero-size tensor, one that spans several 64K-element chunks (the
# threaded path on the CPU, several tiles on CUDA), and sizes that leave vector tails.
SHAPES = [(13,), (64, 4), (0,), (7, 0), (300, 257), (1,), (3, 5, 7)]
# 16-bit: a few ulps, as torch rounds the clipped grads to the params' dtype before its step reads
# them, and fastclip's step uses them unrounded.
TOL = {torch.float32: 1e-6, torch.float64: 1e-13, torch.bfloat16: 2**-5, torch.float16: 2**-8}
STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def make_params(shapes=SHAPES, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device=device, dtype=dtype)) for s in shapes]


def set_grads(params, step, scale=1.0, seed=0):
    """Grads for one step: random, the same for every copy of the params."""
    gen = torch.Generator().manual_seed(1000 * seed + step)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * scale).to(device=p.device, dtype=p.dtype)


def torch_class(cls):
    return torch.optim.AdamW if cls is fastclip.optim.AdamW else torch.optim.Adam


def run_pair(cls, steps=5, max_norm=1.0, norm_type=2.0, dtype=torch.float32, device="cpu", grad_scale=3.0, **kw):
    """The same steps with fastclip's optimizer and with fastclip.clip_grad_norm_ + torch's
    fused one. Returns (ours, theirs, our norms, their norms)."""
    ours_p = make_params(dtype=dtype, device=device)
    theirs_p = copy.deepcopy(ours_p)
    ours = cls(ours_p, lr=1e-2, max_grad_norm=max_norm, norm_type=norm_type, **kw)
    theirs = torch_class(cls)(theirs_p, lr=1e-2, fused=True, **kw)
    our_norms, their_norms = [], []
    for k in range(steps):
        set_grads(ours_p, k, grad_scale)
        set_grads(theirs_p, k, grad_scale)
        ours.step()
        our_norms.append(ours.grad_norm)
        if max_norm is None:
            their_norms.append(fastclip.get_total_norm([p.grad for p in theirs_p], norm_type))
        else:
            their_norms.append(fastclip.clip_grad_norm_(theirs_p, max_norm, norm_type))
        theirs.step()
    return ours, theirs, our_norms, their_norms


def assert_same_state(ours, theirs, rtol):
    """Params and every state tensor close, step counts equal."""
    for p, q in zip(params_of(ours), params_of(theirs), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=rtol)
        s, t = ours.state[p], theirs.state[q]
        assert set(s) == set(t)
        for key in s:
            if key == "step":
                assert float(s[key]) == float(t[key])
            else:
                torch.testing.assert_close(s[key], t[key], rtol=rtol, atol=rtol)


def params_of(opt):
    return [p for group in opt.param_groups for p in group["params"]]


# ---- the update ------------------------------------------------------------------------


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", [fastclip.optim.Adam, fastclip.optim.AdamW])
@pytest.mark.parametrize(
    "options",
    [{}, {"amsgrad": True}, {"maximize": True}, {"weight_decay": 0.1}, {"betas": (0.2, 0.5), "eps": 1e-3}],
    ids=["default", "amsgrad", "maximize", "weight_decay", "betas"],
)
def test_matches_clip_then_torch_fused_step(device, cls, options):
    ours, theirs, our_norms, their_norms = run_pair(cls, device=device, **options)
    assert_same_state(ours, theirs, rtol=TOL[torch.float32])
    for a, b in zip(our_norms, their_norms, strict=True):
        assert a.dtype == b.dtype == torch.float32 and a.device == b.device
        assert float(a) == float(b)  # the same norm fastclip's clip computes, bitwise


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_other_dtypes(device, dtype):
    # fp16's exp_avg_sq underflows for small grads, and with eps=1e-8 one rounding then moves
    # a param by lr / 1e-8 * m: a larger eps keeps the two comparable.
    eps = 1e-3 if dtype == torch.float16 else 1e-8
    ours, theirs, *_ = run_pair(fastclip.optim.AdamW, dtype=dtype, device=device, eps=eps)
    assert_same_state(ours, theirs, rtol=TOL[dtype])


@needs_extension
@pytest.mark.parametrize("norm_type", [1.0, 3.0, math.inf])
def test_norm_types(norm_type):
    ours, theirs, our_norms, their_norms = run_pair(fastclip.optim.Adam, norm_type=norm_type, max_norm=2.0)
    assert_same_state(ours, theirs, rtol=TOL[torch.float32])
    assert [float(n) for n in our_norms] == [float(n) for n in their_norms]


@needs_extension
def test_comparison_can_fail():
    """Negative control: a 1% different max_grad_norm is caught by the same comparison."""
    ours_p = make_params()
    theirs_p = copy.deepcopy(ours_p)
    ours = fastclip.optim.AdamW(ours_p, lr=1e-2, max_grad_norm=1.01)
    theirs = torch.optim.AdamW(theirs_p, lr=1e-2, fused=True)
    for k in range(3):
        set_grads(ours_p, k, 3.0)
        set_grads(theirs_p, k, 3.0)
        ours.step()
        fastclip.clip_grad_norm_(theirs_p, 1.0)
        theirs.step()
    with pytest.raises(AssertionError):
        assert_same_state(ours, theirs, rtol=TOL[torch.float32])


@needs_extension
def test_no_clip_below_max_norm_and_without_max_norm():
    """max_grad_norm above the norm, or None: torch's fused step exactly, and the norm is still
    computed."""
    for max_norm in (1e6, None):
        ours, theirs, our_norms, their_norms = run_pair(fastclip.optim.AdamW, max_norm=max_norm)
        assert_same_state(ours, theirs, rtol=TOL[torch.float32])
        assert float(our_norms[-1]) == float(their_norms[-1]) > 0


@needs_extension
def test_grads_left_unclipped():
    params = make_params()
    set_grads(params, 0, 3.0)
    before = [p.grad.clone() for p in params]
    opt = fastclip.optim.Adam(params, max_grad_norm=0.1)
    opt.step()
    assert float(opt.grad_norm) > 0.1
    for p, g in zip(params, before):
        assert torch.equal(p.grad, g)


@needs_extension
def test_nonfinite_norm_as_torch():
    """A NaN grad makes a NaN norm: the params become NaN, as after torch's clip + step."""
    params = make_params([(5,), (3,)])
    set_grads(params, 0)
    params[0].grad[1] = math.nan
    opt = fastclip.optim.Adam(params, max_grad_norm=1.0)
    opt.step()
    assert math.isnan(float(opt.grad_norm))
    assert all(torch.isnan(p).all() for p in params)


# ---- what the step reads: groups, lr, None grads, layouts -------------------------------


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_param_groups_with_their_own_hyperparameters(device):
    def groups(params):
        return [
            {"params": params[:3], "lr": 1e-2, "betas": (0.8, 0.99), "weight_decay": 0.3},
            {"params": params[3:5], "lr": 3e-3, "eps": 1e-4},
            {"params": params[5:]},
        ]

    ours_p = make_params(device=device)
    theirs_p = copy.deepcopy(ours_p)
    ours = fastclip.optim.AdamW(groups(ours_p), lr=1e-3, max_grad_norm=1.0)
    theirs = torch.optim.AdamW(groups(theirs_p), lr=1e-3, fused=True)
    for k in range(4):
        set_grads(ours_p, k, 3.0)
        set_grads(theirs_p, k, 3.0)
        ours.step()
        fastclip.clip_grad_norm_(theirs_p, 1.0)  # one global norm over every group
        theirs.step()
    assert_same_state(ours, theirs, rtol=TOL[torch.float32])


@needs_extension
def test_lr_as_tensor_read_every_step():
    ours_p, theirs_p = make_params(), make_params()
    lr = torch.tensor(1e-2)
    ours = fastclip.optim.Adam(ours_p, lr=lr, max_grad_norm=1.0)
    theirs = torch.optim.Adam(theirs_p, lr=1e-2, fused=True)
    for k in range(4):
        if k == 2:  # a scheduler writing into the lr tensor
            lr.fill_(3e-3)
            theirs.param_groups[0]["lr"] = 3e-3
        set_grads(ours_p, k, 3.0)
        set_grads(theirs_p, k, 3.0)
        ours.step()
        fastclip.clip_grad_norm_(theirs_p, 1.0)
        theirs.step()
    assert_same_state(ours, theirs, rtol=TOL[torch.float32])


@needs_extension
def test_lr_scheduler_and_step_hooks():
    params = make_params()
    opt = fastclip.optim.Adam(params, lr=1.0, max_grad_norm=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    for k in range(2):
        set_grads(params, k)
        opt.step()
        sched.step()
    assert calls == ["pre", "post"] * 2
    assert opt.param_groups[0]["lr"] == 0.25


@needs_extension
def test_none_grads_skipped():
    params = make_params([(4,), (5,), (6,)])
    set_grads(params, 0)
    params[1].grad = None
    untouched = params[1].detach().clone()
    opt = fastclip.optim.Adam(params, max_grad_norm=1.0)
    opt.step()
    assert torch.equal(params[1], untouched) and params[1] not in opt.state
    assert float(opt.state[params[0]]["step"]) == 1.0
    assert float(opt.grad_norm) == float(fastclip.get_total_norm([params[0].grad, params[2].grad]))


@needs_extension
def test_no_grads_at_all():
    params = make_params([(4,)])
    opt = fastclip.optim.Adam(params, max_grad_norm=1.0)
    opt.step()
    assert float(opt.grad_norm) == 0.0 and not opt.state


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_params_and_grads(device):
    """A transposed param, a param that is a strided view (not dense), a grad laid out unlike
    its param: updated in place, as torch's single-tensor step updates them (torch's fused CPU
    step reads a grad laid out unlike its param in the wrong order)."""

    def params():
        gen = torch.Generator().manual_seed(3)
        base = torch.randn(40, 30, generator=gen).to(device)
        return [
            torch.nn.Parameter(torch.randn(30, 20, generator=gen).to(device).t()),  # dense, permuted
            torch.nn.Parameter(base[:, ::2]),  # not dense
            torch.nn.Parameter(torch.randn(9, 7, generator=gen).to(device)),
        ]

    ours_p, theirs_p = params(), params()
    ours = fastclip.optim.Adam(ours_p, lr=1e-2, max_grad_norm=1.0)
    theirs = torch.optim.Adam(theirs_p, lr=1e-2, foreach=False)
    storage = [p.data_ptr() for p in ours_p]
    for k in range(3):
        for ps in (ours_p, theirs_p):
            set_grads(ps, k, 3.0)
            ps[2].grad = ps[2].grad.t().contiguous().t()  # column-major grad of a row-major param
        ours.step()
        fastclip.clip_grad_norm_(theirs_p, 1.0)
        theirs.step()
    assert [p.data_ptr() for p in ours_p] == storage
    assert_same_state(ours, theirs, rtol=1e-5)


# ---- state_dict --------------------------------------------------------------------------


@needs_extension
@pytest.mark.parametrize("amsgrad", [False, True])
def test_state_dict_both_ways(amsgrad):
    """Train with one, continue with the other, against one optimizer throughout: torch's state
    loads into fastclip's and fastclip's into torch's (fused and not), same keys and layout."""
    make = {
        "ours": lambda ps: fastclip.optim.AdamW(ps, lr=1e-2, amsgrad=amsgrad),
        "fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=amsgrad, fused=True),
        "foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=amsgrad, foreach=True),
    }
    for first, second in [("fused", "ours"), ("foreach", "ours"), ("ours", "fused"), ("ours", "foreach")]:
        base = make_params()
        whole_p, a_p = copy.deepcopy(base), copy.deepcopy(base)
        whole = make[second](whole_p)
        a = make[first](a_p)
        for k in range(3):
            set_grads(whole_p, k)
            set_grads(a_p, k)
            whole.step()
            a.step()
        saved = a.state_dict()
        b_p = [torch.nn.Parameter(p.detach().clone()) for p in a_p]
        b = make[second](b_p)
        b.load_state_dict(saved)
        mine = b.state_dict()
        assert (
            set(mine["state"][0])
            == set(saved["state"][0])
            == {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad else set())
        )
        assert set(mine["param_groups"][0]) == set(saved["param_groups"][0])
        for k in range(3, 6):
            set_grads(whole_p, k)
            set_grads(b_p, k)
            whole.step()
            b.step()
        assert_same_state(b, whole, rtol=1e-5)  # foreach differs from fused by rounding


@needs_extension
def test_state_is_torch_fused_layout():
    params = make_params([(3, 4)])
    set_grads(params, 0)
    opt = fastclip.optim.Adam(params, amsgrad=True)
    opt.step()
    state = opt.state[params[0]]
    assert state["step"].dtype == torch.float32 and state["step"].dim() == 0
    for key in STATE_KEYS:
        assert state[key].shape == params[0].shape and state[key].dtype == params[0].dtype


# ---- GradScaler ----------------------------------------------------------------------------


@needs_extension
def test_grad_scaler_applied_inside_the_step():
    """GradScaler hands its scale and found_inf to the step: the same update as without a
    scaler on unscaled grads, and a step with an inf grad skipped (step count included)."""
    ours_p, plain_p = make_params(), make_params()
    ours = fastclip.optim.Adam(ours_p, lr=1e-2, max_grad_norm=1.0)
    plain = fastclip.optim.Adam(plain_p, lr=1e-2, max_grad_norm=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))  # a GradScaler makes its scale on first use
    for k in range(3):
        set_grads(plain_p, k, 3.0)
        plain.step()
        set_grads(ours_p, k, 3.0 * 1024.0)  # the same grads, as the scaled loss gives them
        scaler.step(ours)
        scaler.update()
        assert float(ours.grad_norm) == pytest.approx(float(plain.grad_norm), rel=1e-6)
    assert_same_state(ours, plain, rtol=1e-5)
    before = [p.detach().clone() for p in ours_p]
    set_grads(ours_p, 9)
    ours_p[1].grad[0] = math.inf
    scale = scaler.get_scale()
    scaler.step(ours)
    scaler.update()
    assert scaler.get_scale() < scale
    assert all(torch.equal(p, b) for p, b in zip(ours_p, before))
    assert float(ours.state[ours_p[0]]["step"]) == 3.0


# ---- bad input -----------------------------------------------------------------------------


def test_constructor_errors():
    params = make_params([(3,)])
    with pytest.raises(ValueError, match="max_grad_norm"):
        fastclip.optim.Adam(params, max_grad_norm=-1.0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        fastclip.optim.AdamW(params, max_grad_norm=math.nan)
    with pytest.raises(ValueError, match="norm_type"):
        fastclip.optim.Adam(params, norm_type="two")
    with pytest.raises(ValueError, match="differentiable"):
        fastclip.optim.Adam(params, differentiable=True)
    with pytest.raises(ValueError, match="Invalid learning rate"):  # torch's own checks run
        fastclip.optim.Adam(params, lr=-1.0)


def _snapshot(opt):
    return [p.detach().clone() for p in params_of(opt)], copy.deepcopy(opt.state_dict())


def _assert_untouched(opt, snapshot):
    params, state = snapshot
    assert all(torch.equal(p, q) for p, q in zip(params_of(opt), params))
    now = opt.state_dict()["state"]
    for i, s in state["state"].items():
        for key, value in s.items():
            assert torch.equal(now[i][key], value)


@needs_extension
def test_step_errors_before_anything_is_touched():
    params = make_params([(4,), (5,)])
    opt = fastclip.optim.Adam(
        [{"params": params[:1]}, {"params": params[1:], "amsgrad": True}], lr=1e-2, max_grad_norm=1.0
    )
    set_grads(params, 0)
    snapshot = _snapshot(opt)
    with pytest.raises(ValueError, match="the same in every param group"):
        opt.step()
    _assert_untouched(opt, snapshot)
    assert not opt.state  # no state made either

    opt = fastclip.optim.Adam(params, lr=1e-2, max_grad_norm=1.0)
    opt.step()
    snapshot = _snapshot(opt)
    params[1].grad = torch.sparse_coo_tensor([[0]], [1.0], (5,), check_invariants=True)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    _assert_untouched(opt, snapshot)


@needs_extension
def test_op_errors_before_anything_is_touched():
    """The op checks every list before it writes: a state of the wrong shape, dtype or device
    in the last entry leaves the first entries' params and steps untouched."""
    ps = [torch.randn(4), torch.randn(3)]
    gs = [torch.randn(4), torch.randn(3)]
    ms = [torch.zeros(4), torch.zeros(3)]
    steps = [torch.zeros(()), torch.zeros(())]
    good = {"exp_avg_sqs": [torch.zeros(4), torch.zeros(3)]}
    bad = {
        "shape": [torch.zeros(4), torch.zeros(2)],
        "dtype": [torch.zeros(4), torch.zeros(3, dtype=torch.float64)],
    }
    for what, vs in list(bad.items()) + [("good", good["exp_avg_sqs"])]:
        before = [p.clone() for p in ps]

        def call(vs=vs):
            return _ops.adam_step_(
                ps, gs, ms, vs, [], steps, [0, 0], [1e-2], [0.9], [0.999], [1e-8], [0.0], [], False, False, False,
                1.0, 2.0,
            )  # fmt: skip

        if what == "good":
            call()
            assert not torch.equal(ps[0], before[0]) and float(steps[0]) == 1.0
        else:
            with pytest.raises(RuntimeError, match=f"exp_avg_sqs\\[1\\] has {what}"):
                call()
            assert all(torch.equal(p, b) for p, b in zip(ps, before)) and float(steps[0]) == 0.0
    with pytest.raises(RuntimeError, match="group ids"):
        _ops.adam_step_(
            ps, gs, ms, good["exp_avg_sqs"], [], steps, [0, 1], [1e-2], [0.9], [0.999], [1e-8], [0.0], [], False,
            False, False, 1.0, 2.0,
        )  # fmt: skip
    with pytest.raises(RuntimeError, match="max_exp_avg_sqs"):
        _ops.adam_step_(
            ps, gs, ms, good["exp_avg_sqs"], [], steps, [0, 0], [1e-2], [0.9], [0.999], [1e-8], [0.0], [], True,
            False, False, 1.0, 2.0,
        )  # fmt: skip


# ---- the other paths ----------------------------------------------------------------------


@needs_extension
def test_python_path_matches_the_eager_entry():
    """A tensor lr sends the step through the Python gather (_fused_args): the same result."""
    a_p, b_p = make_params(), make_params()
    a = fastclip.optim.Adam(a_p, lr=1e-2, max_grad_norm=1.0)
    b = fastclip.optim.Adam(b_p, lr=torch.tensor(1e-2, dtype=torch.float64), max_grad_norm=1.0)
    for k in range(3):
        set_grads(a_p, k, 3.0)
        set_grads(b_p, k, 3.0)
        a.step()
        b.step()
    for p, q in zip(a_p, b_p):
        assert torch.equal(p, q)


def test_reference_path_without_the_extension(monkeypatch):
    """Without the extension (or for what the op does not take): fastclip's clip, then torch's
    own step; the same result as the two calls made by hand."""
    monkeypatch.setattr(_ops, "LOADED", False)
    monkeypatch.setattr(_ops, "adam_groups", None)
    ours_p, theirs_p = make_params(), make_params()
    ours = fastclip.optim.AdamW(ours_p, lr=1e-2, max_grad_norm=1.0)
    theirs = torch.optim.AdamW(theirs_p, lr=1e-2)
    for k in range(3):
        set_grads(ours_p, k, 3.0)
        set_grads(theirs_p, k, 3.0)
        ours.step()
        norm = fastclip.clip_grad_norm_(theirs_p, 1.0)
        theirs.step()
        assert float(ours.grad_norm) == float(norm)
    for p, q in zip(ours_p, theirs_p):
        assert torch.equal(p, q)


def test_closure():
    params = make_params([(3,)])
    opt = fastclip.optim.Adam(params, max_grad_norm=1.0)

    def closure():
        opt.zero_grad()
        loss = (params[0] ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.requires_grad and float(opt.grad_norm) > 0


@needs_extension
@pytest.mark.parametrize("amsgrad", [False, True])
def test_opcheck(amsgrad):
    params = make_params([(5, 3), (4,), (0,)])
    set_grads(params, 0)
    n = len(params)
    zeros = lambda: [torch.zeros_like(p.detach()) for p in params]
    args = (
        [p.detach().clone() for p in params],
        [p.grad for p in params],
        zeros(),
        zeros(),
        zeros() if amsgrad else [],
        [torch.zeros(()) for _ in range(n)],
        [0] * n,
        [1e-2],
        [0.9],
        [0.999],
        [1e-8],
        [0.1],
        [],
        amsgrad,
        False,
        True,
        1.0,
        2.0,
    )
    torch.library.opcheck(torch.ops.fastclip.adam_step_.default, args)
