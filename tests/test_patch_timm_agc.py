"""timm's adaptive_clip_grad routed to fastclip.adaptive_clip_grad_ (patch(timm_agc=True),
`python -m fastclip.run --timm-agc`).

timm is not a dependency: a stand-in package named `timm`, written to a temporary
folder, has timm's layout and import-time bindings (timm/utils/__init__.py and
timm/utils/clip_grad.py both `from ...agc import adaptive_clip_grad`;
dispatch_clip_grad calls the name bound in clip_grad) and timm's formula, written
here from timm/utils/agc.py."""

import importlib
import importlib.machinery
import subprocess
import sys
import textwrap

import pytest
import torch

import fastclip
from helpers import assert_grads_close, clone_params

STANDIN = {
    "timm/__init__.py": "",
    "timm/utils/__init__.py": """
        from .agc import adaptive_clip_grad
        from .clip_grad import dispatch_clip_grad
    """,
    "timm/utils/agc.py": """
        import torch

        def unitwise_norm(x, norm_type=2.0):
            # a unit: a row over all other dims of a >= 2-D tensor, else the whole tensor
            if x.ndim <= 1:
                return x.norm(norm_type)
            return x.norm(norm_type, dim=tuple(range(1, x.ndim)), keepdim=True)

        def adaptive_clip_grad(parameters, clip_factor=0.01, eps=1e-3, norm_type=2.0):
            if isinstance(parameters, torch.Tensor):
                parameters = [parameters]
            for p in parameters:
                if p.grad is None:
                    continue
                bound = unitwise_norm(p.detach(), norm_type).clamp_(min=eps).mul_(clip_factor)
                g_norm = unitwise_norm(p.grad.detach(), norm_type)
                scaled = p.grad.detach() * (bound / g_norm.clamp(min=1e-6))
                p.grad.detach().copy_(torch.where(g_norm < bound, p.grad.detach(), scaled))
    """,
    "timm/utils/clip_grad.py": """
        import torch
        from timm.utils.agc import adaptive_clip_grad

        def dispatch_clip_grad(parameters, value, mode="norm", norm_type=2.0):
            if mode == "norm":
                torch.nn.utils.clip_grad_norm_(parameters, value, norm_type=norm_type)
            elif mode == "value":
                torch.nn.utils.clip_grad_value_(parameters, value)
            elif mode == "agc":
                adaptive_clip_grad(parameters, value, norm_type=norm_type)
    """,
}
# Where the stand-in holds adaptive_clip_grad once imported: its home and two import-time bindings.
NAMES = [("timm.utils.agc", "adaptive_clip_grad"), ("timm.utils", "adaptive_clip_grad")]
NAMES += [("timm.utils.clip_grad", "adaptive_clip_grad")]


def write_standin(folder):
    for rel, source in STANDIN.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))


def forget_timm():
    for name in [n for n in sys.modules if n == "timm" or n.startswith("timm.")]:
        del sys.modules[name]


@pytest.fixture
def timm_standin(tmp_path, monkeypatch):
    """Makes the stand-in importable as `timm` (not imported yet)."""
    write_standin(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    forget_timm()
    yield
    fastclip.unpatch()
    forget_timm()


def bound():
    """What each of the stand-in's names holds: 'fastclip', or the function object itself."""
    values = [getattr(sys.modules[m], attr) for m, attr in NAMES]
    return ["fastclip" if v is fastclip.adaptive_clip_grad_ else v for v in values]


def agc_params(seed=0):
    """Weights and grads whose units straddle AGC's bound (some clipped, some not)."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in [(16, 8), (16,), (4, 16, 3, 3), (1,)]:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen))
        p.grad = torch.randn(shape, generator=gen) * torch.rand(shape[:1] + (1,) * (len(shape) - 1), generator=gen)
        p.grad.mul_(0.02 * p.detach().norm() / p.grad.norm())
        params.append(p)
    return params


def test_patched_before_import_routes_every_binding_and_undoes_them(timm_standin):
    with fastclip.patch(timm_agc=True):
        import timm.utils

        assert bound() == ["fastclip"] * 3
        module = sys.modules["timm.utils.agc"]  # the hook left the module its own loader
        assert isinstance(module.__loader__, importlib.machinery.SourceFileLoader)
        assert module.__spec__.loader is module.__loader__
        params = agc_params()
        theirs = clone_params(params)
        timm.utils.dispatch_clip_grad(params, 0.01, mode="agc")
    timms = sys.modules["timm.utils.agc"].adaptive_clip_grad
    assert timms.__module__ == "timm.utils.agc" and bound() == [timms] * 3
    timm.utils.dispatch_clip_grad(theirs, 0.01, mode="agc")
    assert_grads_close(params, theirs)
    assert any(not torch.equal(a.grad, b.grad) for a, b in zip(params, agc_params()))  # some unit was clipped


def test_imported_before_the_patch_needs_rebind(timm_standin):
    import timm.utils

    timms = timm.utils.adaptive_clip_grad
    with fastclip.patch(timm_agc=True):
        assert bound() == ["fastclip", timms, timms]  # dispatch_clip_grad keeps timm's
    with fastclip.patch(timm_agc=True, rebind=True):
        assert bound() == ["fastclip"] * 3
    assert bound() == [timms] * 3


def test_opt_in_only_and_no_hook_left_behind(timm_standin):
    hooks = list(sys.meta_path)
    with fastclip.patch():  # timm_agc not asked for
        importlib.import_module("timm.utils")
    assert "fastclip" not in bound()
    forget_timm()
    with fastclip.patch(timm_agc=True):  # timm not imported while patched
        pass
    assert sys.meta_path == hooks
    importlib.import_module("timm.utils")
    assert "fastclip" not in bound()


def test_through_the_launcher(tmp_path):
    """python -m fastclip.run --timm-agc: a script importing timm after the launcher
    patched reaches fastclip through dispatch_clip_grad; without the option it does not."""
    write_standin(tmp_path)
    (tmp_path / "train.py").write_text(
        textwrap.dedent(
            """
            import torch
            from timm.utils import dispatch_clip_grad
            import timm.utils.clip_grad as clip_grad

            p = torch.nn.Parameter(torch.ones(3, 2))
            p.grad = torch.ones(3, 2)
            dispatch_clip_grad([p], 0.01, mode="agc")
            print("bound:", clip_grad.adaptive_clip_grad.__module__)
            """
        )
    )
    for option, module, calls in (["--timm-agc"], "fastclip.agc", "timm_agc=1"), ([], "timm.utils.agc", None):
        cmd = [sys.executable, "-m", "fastclip.run", "--summary", *option, "train.py"]
        out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert f"bound: {module}" in out.stdout
        assert (calls in out.stderr) if calls else "timm_agc" not in out.stderr
