"""Every error the compiled code raises reaches Python as a clear exception, on CPU and on CUDA
tensors, with the grads untouched: each TORCH_CHECK in csrc/ (found by reading the sources, so a
new one without a case here fails test_every_check_in_csrc_has_a_case) and the eager entries of
fastclip._C. A crash here is the worst bug an extension can have: a toolchain that links a
second C++ runtime into the extension turns these errors into segfaults (tests/test_runtime_link.py).
"""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastclip
from fastclip import _ops

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CUDA = torch.cuda.is_available() and _ops.CUDA_BUILT
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a GPU and the CUDA kernels"))]

pytestmark = pytest.mark.skipif(not _ops.LOADED, reason=f"the extension is not built: {_ops.LOAD_ERROR}")
ops = torch.ops.fastclip


def grads_on(device, n=2, value=10.0):
    return [torch.full((3, 4), value, device=device) for _ in range(n)]


def other_device(device):
    """A device other than `device` that this machine has, or None."""
    if device == "cuda":
        return "cpu"
    return "cuda" if CUDA else None


# Each case: (name, a verbatim part of the C++ message's string literals, the whole message as a
# regex, with the values it formats: the static-runtime bug lost those; call(device) ->
# (function, tensors that must stay untouched), "both" or "two": needs a second device, a GPU).
def _int_grad(d):
    g = torch.ones(3, dtype=torch.int64, device=d)
    return lambda: ops.clip_grad_norm_([g], 1.0, 2.0), [g]


def _two_devices(d):
    gs = [torch.full((3,), 10.0, device=d), torch.full((3,), 10.0, device=other_device(d))]
    return lambda: ops.clip_grad_norm_(gs, 1.0, 2.0), gs


def _norm_type(d):
    gs = grads_on(d)
    return lambda: ops.clip_grad_norm_(gs, 1.0, 0.0), gs


def _max_norm(d):
    gs = grads_on(d)
    return lambda: ops.clip_grad_norm_(gs, -1.0, 2.0), gs


def _max_norm_nan(d):
    gs = grads_on(d)
    return lambda: ops.clip_grad_norm_(gs, float("nan"), 2.0), gs


def _norm_dtype(d):
    gs = grads_on(d)
    return lambda: ops.clip_grad_norm_(gs, 1.0, 2.0, torch.int32), gs


def _overlap(d):
    base = torch.full((10,), 10.0, device=d)
    gs = [base[:6], base[3:]]
    return lambda: ops.clip_grad_norm_(gs, 1.0, 2.0), [base]


def _scale_coef(d):
    gs = grads_on(d)
    return lambda: ops.scale_(gs, torch.tensor([0.5, 0.5], device=d)), gs


def _scale_coef_device(d):
    gs = grads_on(d)
    return lambda: ops.scale_(gs, torch.tensor(0.5, device=other_device(d))), gs


def _groups_size(d):
    gs = grads_on(d)
    return lambda: ops.clip_grad_norm_per_layer_(gs, [0], 1.0, 2.0), gs


def _group_id(d):
    gs = grads_on(d)
    return lambda: ops.clip_grad_norm_per_layer_(gs, [0, 2], 1.0, 2.0), gs


def _per_layer_max_norm(d):
    gs = grads_on(d)
    return lambda: ops.clip_grad_norm_per_layer_(gs, [], -0.5, 2.0), gs


def _agc_factor(d):
    ps, gs = grads_on(d, value=1.0), grads_on(d)
    return lambda: ops.adaptive_clip_grad_(ps, gs, -0.01, 1e-3, 2.0), gs


def _agc_count(d):
    ps, gs = grads_on(d, n=1, value=1.0), grads_on(d)
    return lambda: ops.adaptive_clip_grad_(ps, gs, 0.01, 1e-3, 2.0), gs


def _agc_param_dtype(d):
    ps, gs = [torch.ones(3, 4, dtype=torch.int32, device=d)] * 2, grads_on(d)
    return lambda: ops.adaptive_clip_grad_(ps, gs, 0.01, 1e-3, 2.0), gs


def _agc_param_device(d):
    ps, gs = grads_on(other_device(d), value=1.0), grads_on(d)
    return lambda: ops.adaptive_clip_grad_(ps, gs, 0.01, 1e-3, 2.0), gs


def _agc_param_shape(d):
    ps, gs = [torch.ones(4, 3, device=d)] * 2, grads_on(d)
    return lambda: ops.adaptive_clip_grad_(ps, gs, 0.01, 1e-3, 2.0), gs


def _requires_grad(d):
    gs = [g.requires_grad_() for g in grads_on(d)]  # in grad mode, as an op called outside torch.no_grad()
    return lambda: ops.clip_grad_norm_(gs, 1.0, 2.0), [g.detach() for g in gs]


def _adam(d, **change):
    """fastclip::adam_step_ on two params of device d, `change` replacing arguments by name; the
    params and steps must stay untouched."""
    ps = grads_on(d, value=1.0)
    args = {
        "params": ps,
        "grads": grads_on(d),
        "exp_avgs": [torch.zeros(3, 4, device=d) for _ in ps],
        "exp_avg_sqs": [torch.zeros(3, 4, device=d) for _ in ps],
        "max_exp_avg_sqs": [],
        "steps": [torch.zeros((), device=d) for _ in ps],
        "groups": [0, 0],
        "lrs": [1e-3],
        "beta1s": [0.9],
        "beta2s": [0.999],
        "epss": [1e-8],
        "weight_decays": [0.0],
        "lr_tensors": [],
        "amsgrad": False,
        "maximize": False,
        "decoupled_weight_decay": False,
        "max_norm": 1.0,
        "norm_type": 2.0,
        "grad_scale": None,
    }
    args.update(change)
    return lambda: ops.adam_step_(*args.values()), args["params"] + args["steps"]


CASES = [
    ("int grad", "grads must be float32, float64, float16 or bfloat16", r"bfloat16, got Long", _int_grad, "both"),
    (
        "two devices",
        "all grads must be on one device",
        r"device, got (cuda:0 and cpu|cpu and cuda:0)",
        _two_devices,
        "two",
    ),
    ("norm_type 0", "norm_type must be > 0 or inf", r"norm_type must be > 0 or inf, got 0", _norm_type, "both"),
    ("max_norm -1", "max_norm must be a non-negative number", r"number, got -1", _max_norm, "both"),
    ("max_norm nan", "max_norm must be a non-negative number", r"number, got nan", _max_norm_nan, "both"),
    (
        "norm_dtype",
        "norm_dtype must be float32, float64, float16 or bfloat16",
        r"bfloat16, got Int",
        _norm_dtype,
        "both",
    ),
    (
        "requires grad",
        "clipping is not differentiable",
        r"clip_grad_norm_: a tensor it writes in place requires grad",
        _requires_grad,
        "both",
    ),
    (
        "adam requires grad",
        "clipping is not differentiable",
        r"adam_step_: a tensor it writes in place requires grad",
        lambda d: _adam(d, params=[p.requires_grad_() for p in grads_on(d, value=1.0)]),
        "both",
    ),
    ("overlap", "share part of their memory", r"grads 0 and 1 share part of their memory", _overlap, "both"),
    ("scale_ coef", "coef must be a one-element float32/float64 tensor", r"scale_: coef must", _scale_coef, "both"),
    (
        "scale_ coef device",
        "coef must be a one-element float32/float64 tensor",
        r"on the grads' device",
        _scale_coef_device,
        "two",
    ),
    ("groups size", "groups must be empty or hold one id per grad", r"got 1 ids for 2 grads", _groups_size, "both"),
    ("group id", "group ids must be in [0, number of grads)", r"grads\), got 2", _group_id, "both"),
    ("per-layer max_norm", "max_norm must be a non-negative number", r"got -0.5", _per_layer_max_norm, "both"),
    ("agc clip_factor", "clip_factor and eps must be non-negative", r"got -0.01 and 0.001", _agc_factor, "both"),
    ("agc count", " params for ", r"got 1 params for 2 grads", _agc_count, "both"),
    ("agc param dtype", "params must be dense float32", r"bfloat16, got Int \(param 0\)", _agc_param_dtype, "both"),
    (
        "agc param device",
        ", its grad on ",
        r"param 0 is on (cpu|cuda:0), its grad on (cuda:0|cpu)",
        _agc_param_device,
        "two",
    ),
    ("agc param shape", ", its grad ", r"param 0 has shape \[4, 3\], its grad \[3, 4\]", _agc_param_shape, "both"),
    (
        "adam list lengths",
        "must have one entry per param",
        r"steps and groups must have one entry per param",
        lambda d: _adam(d, grads=grads_on(d, n=1)),
        "both",
    ),
    (
        "adam amsgrad state",
        "must hold one tensor per param with amsgrad",
        r"max_exp_avg_sqs must hold one tensor per param with amsgrad, none without",
        lambda d: _adam(d, amsgrad=True),
        "both",
    ),
    (
        "adam group values",
        "need one value per group",
        r"\(and lr_tensors, if any\) need one value per group",
        lambda d: _adam(d, lrs=[1e-3, 1e-3]),
        "both",
    ),
    ("adam group id", ": group ids must be in [0, ", r"in \[0, 1\), got 1", lambda d: _adam(d, groups=[0, 1]), "both"),
    (
        "adam param dtype",
        "params must be float32, float64, float16 or bfloat16",
        r"adam_step_: params must be .* bfloat16, got Long",
        lambda d: _adam(d, params=[torch.ones(3, 4, dtype=torch.int64, device=d)] * 2),
        "both",
    ),
    (
        "adam params on two devices",
        "all params must be on one device",
        r"all params must be on one device, got (cuda:0 and cpu|cpu and cuda:0)",
        lambda d: _adam(d, params=grads_on(d, n=1) + grads_on(other_device(d), n=1)),
        "two",
    ),
    (
        "adam state device",
        "] is on ",
        r"exp_avgs\[1\] is on (cpu|cuda:0), its param on (cuda:0|cpu)",
        lambda d: _adam(d, exp_avgs=[torch.zeros(3, 4, device=d), torch.zeros(3, 4, device=other_device(d))]),
        "two",
    ),
    (
        "adam state dtype",
        "] has dtype ",
        r"exp_avg_sqs\[1\] has dtype Double, its param Float",
        lambda d: _adam(d, exp_avg_sqs=[torch.zeros(3, 4, device=d), torch.zeros(3, 4, dtype=torch.float64, device=d)]),
        "both",
    ),
    (
        "adam state shape",
        "] has shape ",
        r"exp_avgs\[0\] has shape \[4, 3\], its param \[3, 4\]",
        lambda d: _adam(d, exp_avgs=[torch.zeros(4, 3, device=d), torch.zeros(3, 4, device=d)]),
        "both",
    ),
    (
        "adam step dtype",
        "must be a one-element float32 tensor on its param's device",
        r"steps\[0\] must be a one-element float32 tensor",
        lambda d: _adam(d, steps=[torch.zeros((), dtype=torch.float64, device=d)] * 2),
        "both",
    ),
    (
        "adam grad_scale",
        " must be a one-element floating-point tensor on the params' device or the CPU",
        r"grad_scale must be a one-element floating-point tensor",
        lambda d: _adam(d, grad_scale=torch.ones(2, device=d)),
        "both",
    ),
]
# Raised in the CUDA glue when a launch fails; reached on a GPU through FASTCLIP_CUDA_FAIL_LAUNCHES
# (test_a_failed_launch_is_an_error_and_touches_nothing).
LAUNCH_FAILED = "CUDA kernel launch failed"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, literal, message, make, where", CASES, ids=[c[0] for c in CASES])
def test_each_check_raises_and_touches_nothing(device, name, literal, message, make, where):
    if where == "two" and other_device(device) is None:
        pytest.skip("needs tensors on a second device (a GPU)")
    call, untouched = make(device)
    before = [t.clone() for t in untouched]
    with pytest.raises(RuntimeError, match=message) as raised:
        call()
    assert literal in str(raised.value)
    for t, b in zip(untouched, before):
        assert torch.equal(t, b), name


def _check_sites(csrc):
    """Every TORCH_CHECK in csrc/: (file:line, the string literals of its message, joined)."""
    token = re.compile(r'"(?:[^"\\]|\\.)*"|[()]|[^"()]+')
    sites = []
    for path in sorted(csrc.rglob("*")):
        if path.suffix not in (".h", ".cpp", ".cuh", ".cu"):
            continue
        text = path.read_text()
        for m in re.finditer(r"\bTORCH_CHECK\(", text):
            depth, literals = 1, []
            for t in token.finditer(text, m.end()):
                tok = t.group()
                if tok.startswith('"'):
                    literals.append(tok[1:-1])
                depth += {"(": 1, ")": -1}.get(tok, 0)
                if depth == 0:
                    break
            sites.append((f"{path.relative_to(csrc)}:{text.count(chr(10), 0, m.start()) + 1}", "".join(literals)))
    return sites


def untested_checks(csrc):
    literals = [c[1] for c in CASES] + [LAUNCH_FAILED]
    return [where for where, text in _check_sites(csrc) if not any(lit in text for lit in literals)]


def test_every_check_in_csrc_has_a_case():
    assert len(_check_sites(CSRC)) >= 15  # the reader finds them
    assert not untested_checks(CSRC), "TORCH_CHECKs without a case in this file"


def test_negative_control_the_coverage_check_sees_a_new_check(tmp_path):
    (tmp_path / "x.h").write_text(
        'TORCH_CHECK(a > (b), "fastclip::", op, ": a brand new rule (a > b), got ", a);\n'
        'TORCH_CHECK(n >= 0, "fastclip::", op, ": max_norm must be a non-negative number, got ", n);\n'
    )
    assert untested_checks(tmp_path) == ["x.h:1"]


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_grads_are_refused_by_the_dispatcher(device):
    """No kernel is registered for sparse layouts: torch's dispatcher says so, nothing runs."""
    dense = torch.full((3,), 10.0, device=device)
    with pytest.raises(NotImplementedError, match="Could not run 'fastclip::clip_grad_norm_'.*Sparse"):
        ops.clip_grad_norm_([dense, torch.eye(3, device=device).to_sparse()], 1.0, 2.0)
    assert torch.equal(dense, torch.full((3,), 10.0, device=device))


# ---- the eager entries of fastclip._C --------------------------------------------------------


def params_on(device, grads):
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.ones_like(g))
        p.grad = g
        params.append(p)
    return params


@pytest.mark.parametrize("device", DEVICES)
def test_eager_entries_raise_the_ops_errors(device):
    """The eager entries call the ops with the GIL released: their errors must still arrive."""
    base = torch.full((10,), 10.0, device=device)
    overlapping = params_on(device, [base[:6], base[3:]])
    with pytest.raises(RuntimeError, match="share part of their memory"):
        _ops.clip_params(overlapping, 1.0, 2.0)
    with pytest.raises(RuntimeError, match="share part of their memory"):
        _ops.per_layer_params(overlapping, 1.0, 2.0)
    assert torch.equal(base, torch.full((10,), 10.0, device=device))
    params = params_on(device, grads_on(device))
    # clip_params runs before any Python check: it declines bad scalars (None), for the
    # Python path to raise its own error.
    for max_norm, norm_type in ((1.0, -1.0), (1.0, 0.0), (-1.0, 2.0), (float("nan"), 2.0), ("one", 2.0), (True, 2.0)):
        assert _ops.clip_params(params, max_norm, norm_type) is None
    assert _ops.clip_params(iter(params), 1.0, 2.0) is None  # generators: the Python path consumes them
    with pytest.raises(RuntimeError, match="norm_type must be > 0"):
        _ops.tensor_norms([p.grad for p in params], 0.0)
    with pytest.raises(RuntimeError, match="max_norm must be a non-negative number"):
        _ops.per_layer_params(params, -1.0, 2.0)
    with pytest.raises(RuntimeError, match="clip_factor and eps must be non-negative"):
        _ops.agc_params(params, -1.0, 1e-3, 2.0)
    with pytest.raises(TypeError):  # pybind's own argument check
        _ops.per_layer_params(params, "one", 2.0)
    assert all(torch.equal(p.grad, torch.full((3, 4), 10.0, device=device)) for p in params)


@pytest.mark.parametrize("device", DEVICES)
def test_the_public_api_still_clips_after_every_error(device):
    """After all the errors above, in one process: the extension still works (no state broken)."""
    for _, _, _, make, where in CASES:
        if where == "two" and other_device(device) is None:
            continue
        call, _ = make(device)
        with pytest.raises(RuntimeError):
            call()
    params = params_on(device, grads_on(device))
    norm = fastclip.clip_grad_norm_(params, 1.0)
    assert norm.item() == pytest.approx(float(torch.full((24,), 10.0).norm()))
    assert float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params]))) == pytest.approx(1.0, 1e-4)


# ---- a failed CUDA launch ----------------------------------------------------------------------

_FAILED_LAUNCH = textwrap.dedent("""
    import torch, fastclip
    ops = torch.ops.fastclip
    g = [torch.full((3, 4), 10.0, device="cuda"), torch.full((5000,), 10.0, device="cuda").half()]
    p = [torch.ones_like(x) for x in g]
    calls = {
        "total_norm": lambda: ops.total_norm(g, 2.0),
        "clip_grad_norm_": lambda: ops.clip_grad_norm_(g, 1.0, 2.0),
        "scale_": lambda: ops.scale_(g, torch.tensor(0.5, device="cuda")),
        "per_tensor_norms": lambda: ops.per_tensor_norms(g, 2.0),
        "clip_grad_norm_per_layer_": lambda: ops.clip_grad_norm_per_layer_(g, [], 1.0, 2.0),
        "per-layer groups": lambda: ops.clip_grad_norm_per_layer_(g, [0, 0], 1.0, 2.0),
        "adaptive_clip_grad_": lambda: ops.adaptive_clip_grad_(p, g, 0.01, 1e-3, 2.0),
    }
    for name, call in calls.items():
        try:
            call()
        except RuntimeError as e:
            assert "CUDA kernel launch failed" in str(e), (name, str(e))
        else:
            raise AssertionError(name + " did not raise")
    torch.cuda.synchronize()
    assert all(bool((x == 10).all()) for x in g), "a grad was touched"
    x = torch.ones(1000, device="cuda") * 2  # the runtime's last error was cleared: torch's launches work
    assert x.sum().item() == 2000
    print("ok", len(calls))
""")


@pytest.mark.skipif(not CUDA, reason="needs a GPU and the CUDA kernels")
def test_a_failed_launch_is_an_error_and_touches_nothing():
    env = {**os.environ, "FASTCLIP_CUDA_FAIL_LAUNCHES": "1"}
    out = subprocess.run([sys.executable, "-c", _FAILED_LAUNCH], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok 7", out.stdout + out.stderr
