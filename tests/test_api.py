"""The rest of the contract: signatures, the companion functions, patch(),
backend(), the ops themselves, tracing, determinism, the fallback path."""

import inspect
import math
import subprocess
import sys
import warnings

import pytest
import torch

import fastclip
from helpers import assert_grads_close, clone_params, grads, make_params

SHAPES = [(64, 4), (64,), (64, 64), (64,), (2, 64), (2,)]
needs_extension = pytest.mark.skipif(fastclip.backend() == "python", reason="extension not built")


@pytest.mark.parametrize("name", ["clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_", "clip_grad_value_"])
def test_signatures_match_torch(name):
    """torch's parameters, in torch's order, with its defaults and kinds; fastclip's own
    additions (group=, nonfinite=, found_inf=) only keyword-only, with a default, after them."""
    ours = list(inspect.signature(getattr(fastclip, name)).parameters.values())
    theirs = list(inspect.signature(getattr(torch.nn.utils, name)).parameters.values())
    assert [p.name for p in ours[: len(theirs)]] == [p.name for p in theirs]
    for a, b in zip(ours, theirs):
        assert a.default == b.default and a.kind == b.kind
    for extra in ours[len(theirs) :]:
        assert extra.kind == inspect.Parameter.KEYWORD_ONLY and extra.default is not inspect.Parameter.empty


def test_clip_is_an_alias_and_keywords_work():
    assert fastclip.clip_ is fastclip.clip_grad_norm_
    params = make_params(SHAPES, scale=5.0)
    theirs = clone_params(params)
    kw = dict(max_norm=1.0, norm_type="inf", error_if_nonfinite=False, foreach=None)
    torch.testing.assert_close(
        fastclip.clip_(parameters=params, **kw), torch.nn.utils.clip_grad_norm_(parameters=theirs, **kw)
    )
    assert_grads_close(params, theirs)


def test_get_total_norm_and_clip_grads_with_norm_compose_like_torch():
    params = make_params(SHAPES, scale=3.0)
    theirs = clone_params(params)
    n_ours = fastclip.get_total_norm(grads(params), 3.0)
    n_torch = torch.nn.utils.get_total_norm(grads(theirs), 3.0)
    torch.testing.assert_close(n_ours, n_torch)
    fastclip.clip_grads_with_norm_(params, 0.7, n_ours)
    torch.nn.utils.clip_grads_with_norm_(theirs, 0.7, n_torch)
    assert_grads_close(params, theirs)
    assert torch.equal(fastclip.get_total_norm([]), torch.nn.utils.get_total_norm([]))


def test_clip_grad_value_matches_torch():
    params = make_params(SHAPES + [(0,)], scale=3.0) + make_params([(5,)], torch.float16)
    theirs = clone_params(params)
    fastclip.clip_grad_value_(params, 0.5)
    torch.nn.utils.clip_grad_value_(theirs, 0.5)
    for a, b in zip(grads(params), grads(theirs)):
        assert torch.equal(a, b)


def test_empty_generator_warns_like_torch():
    with pytest.warns(UserWarning, match="empty generator"):
        result = fastclip.clip_grad_norm_((p for p in []), 1.0)
    assert torch.equal(result, torch.tensor(0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastclip.clip_grad_norm_([], 1.0)  # an empty list does not warn


def test_grads_that_require_grad_are_clipped_without_autograd():
    # create_graph=True leaves grads that require grad; clipping must not be recorded
    model = torch.nn.Linear(4, 3)
    model(torch.randn(8, 4)).pow(2).sum().backward(create_graph=True)
    assert all(p.grad.requires_grad for p in model.parameters())
    theirs = clone_params(list(model.parameters()))
    torch.testing.assert_close(
        fastclip.clip_grad_norm_(model.parameters(), 0.1), torch.nn.utils.clip_grad_norm_(theirs, 0.1)
    )
    assert_grads_close(list(model.parameters()), theirs)


def test_patch_as_context_manager_and_plain_call():
    original = torch.nn.utils.clip_grad_norm_
    with fastclip.patch():
        assert torch.nn.utils.clip_grad_norm_ is fastclip.clip_grad_norm_
        assert torch.nn.utils.clip_grad.clip_grad_norm_ is fastclip.clip_grad_norm_
        with fastclip.patch():  # nested: the inner exit keeps the outer patch
            pass
        assert fastclip.is_patched()
        params = make_params(SHAPES, scale=4.0)
        theirs = clone_params(params)
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)  # runs fastclip
        torch.testing.assert_close(norm, original(theirs, 1.0))
    assert torch.nn.utils.clip_grad_norm_ is original
    assert torch.nn.utils.clip_grad.clip_grad_norm_ is original
    fastclip.patch()
    assert torch.nn.utils.clip_grad_norm_ is fastclip.clip_grad_norm_
    fastclip.unpatch()
    assert torch.nn.utils.clip_grad_norm_ is original and not fastclip.is_patched()


def test_backend_and_info():
    assert fastclip.backend() in ("cpu", "cuda", "python")
    out = subprocess.run([sys.executable, "-m", "fastclip.info"], capture_output=True, text=True, check=True).stdout
    assert f"backend             {fastclip.backend()}" in out and "torch" in out


@needs_extension
def test_backend_is_compiled_after_a_plain_install():
    assert fastclip.backend() == ("cuda" if torch.cuda.is_available() and fastclip._ops.CUDA_BUILT else "cpu")


@needs_extension
@pytest.mark.parametrize("case", ["total_norm", "clip_grad_norm_", "clip_grad_norm_/bf16", "scale_"])
def test_opcheck(case):
    gs = [g.clone() for g in grads(make_params([(5, 7), (3,), (0,)], scale=4.0))] + [
        torch.randn(4, dtype=torch.float64)
    ]
    args = {
        "total_norm": (gs, 2.0),
        "clip_grad_norm_": (gs, 0.5, 2.0),
        "clip_grad_norm_/bf16": (gs, 0.5, 2.0, torch.bfloat16),  # the norm returned in bf16
        "scale_": (gs, torch.tensor(0.5, dtype=torch.float64)),
    }[case]
    torch.library.opcheck(getattr(torch.ops.fastclip, case.split("/")[0]).default, args)


@needs_extension
def test_ops_agree_with_the_reference_path():
    from fastclip import _reference

    gs = grads(make_params(SHAPES + [(300, 700)], scale=2.0, seed=7))
    for p in (1.0, 2.0, 3.0, math.inf):
        fused, reference = torch.ops.fastclip.total_norm(gs, p), _reference.total_norm(gs, p)
        assert fused.dtype == reference.dtype == torch.float32
        exact = float(torch.linalg.vector_norm(torch.cat([g.double().view(-1) for g in gs]), p))
        # torch's fp32 vector_norm is off by up to ~1e-5 here; the fused sum is closer
        assert abs(float(fused) - exact) <= max(abs(float(reference) - exact), 1e-7 * exact)


@needs_extension
def test_traces_under_torch_compile():
    params = make_params(SHAPES, scale=4.0)
    theirs = clone_params(params)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(ps):
        return fastclip.clip_grad_norm_(ps, 1.0)

    torch.testing.assert_close(step(params), torch.nn.utils.clip_grad_norm_(theirs, 1.0))
    assert_grads_close(params, theirs)


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_deterministic_across_thread_counts(dtype):
    # several chunks per tensor and > 2^18 elements: the parallel path
    base = make_params([(700, 1000), (333,), (1000, 90)], dtype, seed=11)
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3, 2):
            torch.set_num_threads(threads)
            params = clone_params(base)
            results.append((fastclip.clip_grad_norm_(params, 1.0), grads(params)))
    finally:
        torch.set_num_threads(old)
    norm0, grads0 = results[0]
    for norm, gs in results[1:]:
        assert torch.equal(norm, norm0)
        assert all(torch.equal(a, b) for a, b in zip(gs, grads0))


def test_reference_fallback_when_the_extension_is_missing():
    """Without fastclip._C: one warning that says why, backend() 'python', same results."""
    script = r"""
import importlib.abc, sys, warnings, torch
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "fastclip._C":
            raise ImportError("blocked by the test")
sys.meta_path.insert(0, Block())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fastclip
assert [str(w.message) for w in caught if "fastclip" in str(w.message)][0].count("blocked by the test") == 1, caught
assert fastclip.backend() == "python"
torch.manual_seed(0)
ps = [torch.nn.Parameter(torch.randn(s)) for s in [(5, 3), (7,)]]
qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
for p, q in zip(ps, qs):
    p.grad = torch.randn_like(p) * 10
    q.grad = p.grad.clone()
torch.testing.assert_close(fastclip.clip_grad_norm_(ps, 1.0), torch.nn.utils.clip_grad_norm_(qs, 1.0))
for p, q in zip(ps, qs):
    torch.testing.assert_close(p.grad, q.grad)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
