"""Run unchanged code with fastclip: swap torch.nn.utils.clip_grad_norm_ for ours.

    with fastclip.patch():      # restores torch's on exit
        train()
    fastclip.patch(); ...; fastclip.unpatch()

Code that bound torch's function before the patch (`from torch.nn.utils import
clip_grad_norm_` at import time) keeps torch's: patch before importing it.
"""

import torch.nn.utils
import torch.nn.utils.clip_grad

from .clip import clip_grad_norm_

_TARGETS = (torch.nn.utils, torch.nn.utils.clip_grad)
_saved = {}  # module -> torch's function, while patched
_depth = 0


class _Patch:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _depth
        _depth -= 1
        if _depth == 0:
            unpatch()
        return False


def patch() -> "_Patch":
    """Replace torch's clip_grad_norm_ with fastclip's; nestable; a context manager too."""
    global _depth
    if _depth == 0:
        for module in _TARGETS:
            _saved[module] = module.clip_grad_norm_
            module.clip_grad_norm_ = clip_grad_norm_
    _depth += 1
    return _Patch()


def unpatch() -> None:
    """Put torch's clip_grad_norm_ back, however many patches are active."""
    global _depth
    for module, original in _saved.items():
        module.clip_grad_norm_ = original
    _saved.clear()
    _depth = 0


def is_patched() -> bool:
    return bool(_saved)
