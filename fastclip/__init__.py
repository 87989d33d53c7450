"""fastclip: global-norm gradient clipping for PyTorch in one fused op.

import fastclip
norm = fastclip.clip_(model.parameters(), max_norm=0.5)   # = torch.nn.utils.clip_grad_norm_
norm = fastclip.clip_and_step_(optimizer, max_norm=0.5)  # the clip inside a fused optimizer's step
opt = fastclip.optim.AdamW(params, max_grad_norm=0.5)    # the clip inside fastclip's own AdamW
"""

from . import _ops, optim  # _ops first: it checks the torch version, then loads the extension
from ._version import __version__
from .agc import adaptive_clip_grad_
from .clip import clip_, clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, get_total_norm
from .monitor import Explosion, GradMonitor
from .patch import is_patched, patch, unpatch
from .per_layer import clip_grad_norm_per_layer_, per_tensor_norms
from .step import clip_and_step_
from .thresholds import AutoClip, ZClip


def backend() -> str:
    """What runs: "cuda" (CUDA kernels built and a GPU present), "cpu" (compiled
    CPU operator) or "python" (extension not loaded: the reference path)."""
    if not _ops.LOADED:
        return "python"
    import torch

    return "cuda" if _ops.CUDA_BUILT and torch.cuda.is_available() else "cpu"


__all__ = [
    "__version__",
    "adaptive_clip_grad_",
    "AutoClip",
    "ZClip",
    "backend",
    "clip_",
    "clip_and_step_",
    "clip_grad_norm_",
    "clip_grad_norm_per_layer_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "Explosion",
    "get_total_norm",
    "GradMonitor",
    "is_patched",
    "optim",
    "patch",
    "per_tensor_norms",
    "unpatch",
]
