"""Run unchanged code with fastclip: torch's clipping functions replaced by fastclip's.

    with fastclip.patch():                      # restores torch's on exit
        train()
    fastclip.patch(); ...; fastclip.unpatch()
    fastclip.patch(["clip_grad_value_"])        # only some of the four
    fastclip.patch(rebind=True)                 # also names bound before the patch
    fastclip.patch(timm_agc=True)               # also timm's adaptive_clip_grad (opt-in)

What it replaces, found by identity (never by name):
- torch's clip_grad_norm_, clip_grad_value_, get_total_norm and clip_grads_with_norm_,
  wherever torch.nn.utils and torch.nn.utils.clip_grad hold them (in clip_grad,
  get_total_norm is _get_total_norm, which torch's own clip_grad_norm_ calls);
- with rebind=True, also every module-level name in any loaded module that holds
  torch's function, such as rl_games' `from torch.nn.utils import clip_grad_norm_`
  run before the patch. Without it such names keep torch's: patch before importing
  them (`python -m fastclip.run` does: fastclip/run.py);
- with timm_agc=True, timm.utils.agc.adaptive_clip_grad, by fastclip.adaptive_clip_grad_
  (the differences that remain: docs/unchanged_trainers.md). timm binds it at import, so
  patch before importing timm (timm.utils.agc is patched the moment it is imported) or
  pass rebind=True.

Undoing restores every binding the patch changed and every module-level name bound
to a fastclip replacement while patched (`from torch.nn.utils import clip_grad_norm_`
inside the `with` block), except in fastclip's own modules and those bound before
the patch. A module imported while patched that imports fastclip's function from
fastclip itself cannot be told apart from one that took it from torch: it gets
torch's back too.

Patches nest and overlap: each function stays replaced while any patch that selected
it is active (rebound names: while any that asked for rebind is), whatever the order
of exits; unpatch() ends them all. Thread-safe. The first patch of a function and the
last exit each scan the loaded modules (~12 ms each with torch and its distributed
packages loaded, ~1,700 modules), as does rebind=True; a patch inside another costs
microseconds. Patch around training, not around each step.
"""

import sys
import threading

import torch.nn.utils
import torch.nn.utils.clip_grad

from . import _bindings
from .agc import adaptive_clip_grad_
from .clip import clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, get_total_norm

TORCH_FUNCTIONS = ("clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_")
TIMM_AGC = "timm_agc"

REPLACEMENTS = {
    "clip_grad_norm_": clip_grad_norm_,
    "clip_grad_value_": clip_grad_value_,
    "get_total_norm": get_total_norm,
    "clip_grads_with_norm_": clip_grads_with_norm_,
    TIMM_AGC: adaptive_clip_grad_,
}
_TORCH_HOMES = ("torch.nn.utils", "torch.nn.utils.clip_grad")
_TIMM_HOME = "timm.utils.agc"


def _is_fastclip(module_name):
    return module_name == "fastclip" or module_name.startswith("fastclip.")


class _Route:
    """One replaced function while any patch selects it."""

    def __init__(self, name, replacement):
        self.name, self.replacement = name, replacement
        self.homes = _TORCH_HOMES if name in TORCH_FUNCTIONS else (_TIMM_HOME,)
        # torch's (or timm's) function; timm's is known only once timm.utils.agc is imported.
        if name in TORCH_FUNCTIONS:
            self.original = getattr(torch.nn.utils, name)
        else:
            self.original = getattr(sys.modules.get(_TIMM_HOME), "adaptive_clip_grad", None)
        self.patches = 0  # active patches that selected it
        self.rebinders = 0  # ... and asked for rebind
        self.installed = []  # bindings in its homes
        self.rebound = []  # bindings elsewhere, replaced for rebind
        self.before = set()  # keys of the bindings to the replacement made before the patch

    def install(self, found):
        """Bind the replacement in the homes, where `found` (bindings of loaded modules
        to the original and the replacement) says they hold the original."""
        self.before = {_bindings.key(b) for b, obj in found if obj is self.replacement}
        for binding, obj in found:
            if obj is self.original and binding[0] in self.homes and _bindings.replace(binding, obj, self.replacement):
                self.installed.append(binding)
        if self.name == TIMM_AGC and self.original is None:
            _bindings.after_import(_TIMM_HOME, self._on_import)

    def _on_import(self, module):
        """timm.utils.agc was just executed: replace its function before anyone imports it."""
        with _lock:
            if _routes.get(self.name) is not self:
                return
            self.original = module.adaptive_clip_grad
            binding = (module.__name__, vars(module), "adaptive_clip_grad")
            if _bindings.replace(binding, self.original, self.replacement):
                self.installed.append(binding)

    def rebind(self, found):
        for binding, obj in found:
            if obj is self.original and binding[0] not in self.homes:
                if _bindings.replace(binding, obj, self.replacement):
                    self.rebound.append(binding)

    def unbind(self, bindings):
        for binding in bindings:
            _bindings.replace(binding, self.replacement, self.original)
        bindings.clear()

    def uninstall(self, found):
        """Torch's function back in the homes, in every rebound name, and in every other
        name bound to the replacement while patched (`found`: the loaded modules'
        bindings to the replacement)."""
        if self.name == TIMM_AGC:
            _bindings.after_import(_TIMM_HOME, None)
        self.unbind(self.installed)
        self.unbind(self.rebound)
        if self.original is None:
            return  # timm.utils.agc was never imported: nothing can hold either function
        for binding, obj in found:
            if obj is self.replacement and _bindings.key(binding) not in self.before:
                _bindings.replace(binding, obj, self.original)


class _Patch:
    """One patch() call; `with` ends it."""

    def __init__(self, names, rebind):
        self.names, self.rebind, self.active = names, rebind, True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        with _lock:
            if self.active:
                _end([self])
        return False


_lock = threading.RLock()
_routes = {}  # name -> _Route, while some patch selects it
_patches = []  # the active _Patch objects


def selection(functions, timm_agc):
    names = (functions,) if isinstance(functions, str) else tuple(functions)
    unknown = [n for n in names if n not in TORCH_FUNCTIONS]
    if unknown:
        raise ValueError(f"fastclip.patch: unknown function(s) {unknown}; choose among {list(TORCH_FUNCTIONS)}")
    return tuple(dict.fromkeys(names)) + ((TIMM_AGC,) if timm_agc else ())


def patch(functions=TORCH_FUNCTIONS, *, rebind: bool = False, timm_agc: bool = False) -> "_Patch":
    """Replace torch's clipping functions with fastclip's until unpatch() or the end of
    the `with` block; see the module docstring.

    Args:
        functions (str or iterable of str): which of torch.nn.utils' clip_grad_norm_,
            clip_grad_value_, get_total_norm, clip_grads_with_norm_. Default: all four
        rebind (bool, keyword-only): also replace module-level names that already hold
            torch's functions in modules imported before the patch. Default: False
        timm_agc (bool, keyword-only): also route timm's adaptive_clip_grad to
            fastclip.adaptive_clip_grad_. Default: False
    """
    return patch_with(selection(functions, timm_agc), rebind, REPLACEMENTS)


def patch_with(names, rebind, replacements):
    """patch() with the replacement objects given (fastclip/run.py installs counting ones);
    a function already replaced keeps the replacement it has."""
    with _lock:
        handle = _Patch(names, rebind)
        new = {n: _Route(n, replacements[n]) for n in names if n not in _routes}
        # One scan for both: the originals (the homes'; the rest for rebind) and the
        # replacements' bindings made before the patch.
        wanted = [r.original for r in (_routes.get(n) or new[n] for n in names) if r.original is not None]
        wanted += [r.replacement for r in new.values()]
        found = _bindings.find(wanted, skip=_is_fastclip) if new or rebind else []
        for route in new.values():
            route.install(found)
            _routes[route.name] = route
        for name in names:
            route = _routes[name]
            route.patches += 1
            if rebind:
                route.rebinders += 1
                route.rebind(found)
        _patches.append(handle)
        return handle


def _end(handles):
    """End these active patches: what no remaining patch selects goes back."""
    ending = []
    for handle in handles:
        handle.active = False
        _patches.remove(handle)
        for name in handle.names:
            route = _routes[name]
            route.patches -= 1
            if handle.rebind:
                route.rebinders -= 1
                if route.rebinders == 0:
                    route.unbind(route.rebound)
            if route.patches == 0:
                ending.append(route)
    if not ending:
        return
    found = _bindings.find([r.replacement for r in ending], skip=_is_fastclip)
    for route in ending:
        route.uninstall(found)
        del _routes[route.name]


def unpatch() -> None:
    """End every active patch: torch's functions back everywhere the patches put fastclip's."""
    with _lock:
        _end(list(_patches))


def is_patched() -> bool:
    """Whether any of torch's (or timm's) functions is replaced now."""
    return bool(_routes)
