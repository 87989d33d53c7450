"""fastclip.patch() in this process: which bindings it replaces (all four of torch's
clipping functions, by identity), rebind=True for names bound before the patch, the
exact undo (including names bound while patched), nesting in any order, threads.

Modules that bind at import are real files imported from a temporary folder."""

import importlib
import sys
import textwrap
import threading

import pytest
import torch
import torch.nn.utils.clip_grad as torch_clip_grad
from op_counts import CountOps
from torchtitan_clip import titan_clip

import fastclip
from helpers import assert_grads_close, clone_params, make_params

FUNCTIONS = ("clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_")
TORCH = {name: getattr(torch.nn.utils, name) for name in FUNCTIONS}
OURS = {name: getattr(fastclip, name) for name in FUNCTIONS}
# Where torch itself holds each function: torch.nn.utils, and clip_grad under its own names
# (torch's clip_grad_norm_ calls _get_total_norm and _clip_grads_with_norm_ there).
HOMES = {
    "clip_grad_norm_": [(torch.nn.utils, "clip_grad_norm_"), (torch_clip_grad, "clip_grad_norm_")],
    "clip_grad_value_": [(torch.nn.utils, "clip_grad_value_"), (torch_clip_grad, "clip_grad_value_")],
    "get_total_norm": [(torch.nn.utils, "get_total_norm"), (torch_clip_grad, "_get_total_norm")],
    "clip_grads_with_norm_": [(torch.nn.utils, "clip_grads_with_norm_"), (torch_clip_grad, "_clip_grads_with_norm_")],
}
# What a library writes at its top: every name bound at import, one of them under an alias.
BINDS_AT_IMPORT = """
from torch.nn.utils import clip_grad_norm_, clip_grad_value_, get_total_norm
from torch.nn.utils import clip_grads_with_norm_ as scale_by_norm
"""
BOUND = {"clip_grad_norm_": "clip_grad_norm_", "clip_grad_value_": "clip_grad_value_"}
BOUND |= {"get_total_norm": "get_total_norm", "clip_grads_with_norm_": "scale_by_norm"}


def holds(module, which):
    """{function: whether `module`'s bound name holds `which`'s version}."""
    return {name: getattr(module, attr) is which[name] for name, attr in BOUND.items()}


def all_torch(module=None):
    homes = all(getattr(m, attr) is TORCH[name] for name, pairs in HOMES.items() for m, attr in pairs)
    return homes and (module is None or all(holds(module, TORCH).values()))


@pytest.fixture(autouse=True)
def torch_restored_after_each_test():
    yield
    fastclip.unpatch()
    assert all_torch() and not fastclip.is_patched()


@pytest.fixture
def write_module(tmp_path, monkeypatch):
    """write_module(source) -> the name of a new module holding `source`, importable."""
    monkeypatch.syspath_prepend(str(tmp_path))
    names = []

    def write(source):
        name = f"reach_module_{len(names)}_{id(tmp_path):x}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)


def test_all_four_replaced_where_torch_holds_them_and_restored():
    with fastclip.patch():
        for name, pairs in HOMES.items():
            for module, attr in pairs:
                assert getattr(module, attr) is OURS[name], (module.__name__, attr)
        assert fastclip.is_patched()
    assert all_torch()


def test_patched_functions_give_torchs_results():
    params = make_params([(6, 5), (5,), (3, 6)], scale=3.0)
    theirs, scaled, value = clone_params(params), clone_params(params), clone_params(params)
    with fastclip.patch():
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        torch.nn.utils.clip_grads_with_norm_(params, 1.0, norm)
        clipped = torch.nn.utils.clip_grad_norm_(scaled, 1.0)
        torch.nn.utils.clip_grad_value_(value, 0.5)
    torch.testing.assert_close(norm, TORCH["get_total_norm"]([p.grad for p in theirs]))
    expected = clone_params(theirs)
    TORCH["clip_grad_norm_"](expected, 1.0)
    assert_grads_close(params, expected)
    assert_grads_close(scaled, expected)
    torch.testing.assert_close(clipped, norm)
    TORCH["clip_grad_value_"](theirs, 0.5)
    assert_grads_close(value, theirs)


def test_a_selection_replaces_only_those():
    with fastclip.patch("clip_grad_value_"):
        assert torch.nn.utils.clip_grad_value_ is fastclip.clip_grad_value_
        assert torch.nn.utils.clip_grad_norm_ is TORCH["clip_grad_norm_"]
    with fastclip.patch(["get_total_norm", "clip_grads_with_norm_"]):
        # torch's own clip_grad_norm_ stays, and now runs fastclip's two halves
        assert torch.nn.utils.clip_grad_norm_ is TORCH["clip_grad_norm_"]
        assert torch_clip_grad._get_total_norm is fastclip.get_total_norm
        assert torch_clip_grad._clip_grads_with_norm_ is fastclip.clip_grads_with_norm_
    assert all_torch()
    with pytest.raises(ValueError, match="clip_grad_nrm_.*choose among"):
        fastclip.patch(["clip_grad_nrm_"])
    assert not fastclip.is_patched()


def test_names_bound_before_the_patch_need_rebind(write_module):
    module = importlib.import_module(write_module(BINDS_AT_IMPORT))
    with fastclip.patch():
        assert not any(holds(module, OURS).values())  # the negative control: plain patch() misses them
    with fastclip.patch(rebind=True):
        assert all(holds(module, OURS).values())
    assert all_torch(module)


def test_rebind_goes_by_identity_never_by_name(write_module):
    module = importlib.import_module(
        write_module(
            """
            import torch
            def clip_grad_norm_(parameters, max_norm):  # the library's own function of the same name
                return "own"
            torch_clip = torch.nn.utils.clip_grad_norm_  # torch's, under another name
            """
        )
    )
    own = module.clip_grad_norm_
    with fastclip.patch(rebind=True):
        assert module.clip_grad_norm_ is own and module.torch_clip is fastclip.clip_grad_norm_
    assert module.torch_clip is TORCH["clip_grad_norm_"]


def test_rebind_only_the_selected_functions(write_module):
    module = importlib.import_module(write_module(BINDS_AT_IMPORT))
    with fastclip.patch(["clip_grad_norm_", "get_total_norm"], rebind=True):
        assert holds(module, OURS) == {
            "clip_grad_norm_": True,
            "clip_grad_value_": False,
            "get_total_norm": True,
            "clip_grads_with_norm_": False,
        }
    assert all_torch(module)


def test_names_bound_while_patched_get_torchs_back(write_module):
    name = write_module(BINDS_AT_IMPORT)
    with fastclip.patch():
        module = importlib.import_module(name)
        assert all(holds(module, OURS).values())
    assert all_torch(module)
    fastclip.patch()
    importlib.reload(module)
    fastclip.unpatch()
    assert all_torch(module)


def test_fastclips_own_bindings_are_left_alone(write_module):
    """fastclip's modules, and a module that imported fastclip's function before the
    patch, keep fastclip's function after it."""
    user = importlib.import_module(write_module("from fastclip import clip_grad_norm_, clip_"))
    with fastclip.patch():
        pass
    assert user.clip_grad_norm_ is user.clip_ is fastclip.clip_grad_norm_
    assert fastclip.clip.clip_grad_norm_ is fastclip.clip_ is fastclip.clip_grad_norm_
    assert fastclip.clip_grad_value_ is fastclip.clip.clip_grad_value_


def test_nested_patches_end_in_any_order(write_module):
    module = importlib.import_module(write_module(BINDS_AT_IMPORT))
    outer = fastclip.patch(["clip_grad_norm_"])
    with fastclip.patch(rebind=True):
        assert all(holds(module, OURS).values())
    # the inner one ended: what only it selected is torch's again, rebound names too
    assert torch.nn.utils.clip_grad_norm_ is fastclip.clip_grad_norm_
    assert torch.nn.utils.get_total_norm is TORCH["get_total_norm"]
    assert all(holds(module, TORCH).values())

    first, second, third = fastclip.patch(rebind=True), fastclip.patch(), fastclip.patch(rebind=True)
    first.__exit__(None, None, None)  # the first ends before the others
    assert all(holds(module, OURS).values())  # third still asks for rebind
    third.__exit__(None, None, None)
    assert all(holds(module, TORCH).values())  # no patch asks for rebind now
    assert torch.nn.utils.get_total_norm is fastclip.get_total_norm  # second still holds
    second.__exit__(None, None, None)
    second.__exit__(None, None, None)  # twice: nothing more
    assert torch.nn.utils.clip_grad_norm_ is fastclip.clip_grad_norm_  # outer still holds
    outer.__exit__(None, None, None)
    assert all_torch(module) and not fastclip.is_patched()


def test_unpatch_ends_every_patch_and_later_exits_do_nothing():
    with fastclip.patch():
        with fastclip.patch(rebind=True):
            fastclip.unpatch()
            assert all_torch() and not fastclip.is_patched()
            fastclip.patch("clip_grad_value_")  # a new patch after unpatch()
        assert torch.nn.utils.clip_grad_value_ is fastclip.clip_grad_value_  # the old exits left it
    fastclip.unpatch()
    assert all_torch()


def test_repeated_patch_and_unpatch(write_module):
    module = importlib.import_module(write_module(BINDS_AT_IMPORT))
    for i in range(50):
        with fastclip.patch(rebind=i % 2 == 0):
            assert holds(module, OURS)["clip_grad_norm_"] == (i % 2 == 0)
            fastclip.patch()
        assert fastclip.is_patched()
        fastclip.unpatch()
        assert all_torch(module)
    state = sys.modules["fastclip.patch"]
    assert not state._patches and not state._routes


def test_threads_patching_at_once(write_module):
    """Threads entering and leaving overlapping patches with their own selections: inside
    its block each sees its functions replaced; at the end everything is torch's."""
    module = importlib.import_module(write_module(BINDS_AT_IMPORT))
    errors = []

    def worker(k):
        selection = [FUNCTIONS[k % 4], FUNCTIONS[(k + 1) % 4]]
        try:
            for i in range(30):
                with fastclip.patch(selection, rebind=(i + k) % 3 == 0) as p:
                    for name in selection:
                        assert getattr(torch.nn.utils, name) is OURS[name], name
                        if p.rebind:
                            assert getattr(module, BOUND[name]) is OURS[name], name
        except Exception as exc:  # any: a thread's exception would otherwise only be printed
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all_torch(module) and not fastclip.is_patched()


def test_total_norm_then_scale_is_two_fused_passes_and_no_host_read():
    params = make_params([(64, 4), (64,), (64, 64)], scale=2.0)
    theirs = clone_params(params)
    with fastclip.patch(), CountOps() as ops:
        norm = titan_clip(params, 1.0)
    assert ops.fused == ["total_norm", "scale_"] and ops.host_reads == 0, (ops.fused, ops.host_reads)
    torch.testing.assert_close(norm, titan_clip(theirs, 1.0))
    assert_grads_close(params, theirs)
    # the counts can fail: torch's path runs no fused op; error_if_nonfinite reads the norm
    with CountOps() as ops:
        titan_clip(clone_params(params), 1.0)
    assert ops.fused == []
    with fastclip.patch(), CountOps() as ops:
        titan_clip(params, 1.0, error_if_nonfinite=True)
    assert ops.host_reads == 1
