"""Loads the compiled extension and holds the handles of its ops.

If fastclip._C cannot be loaded, everything still works through the pure-torch
reference path; one warning says why, and `fastclip.backend()` says "python".
"""

import glob
import os
import warnings

import torch

from ._version import torch_too_old

# Before loading _C: built against an older torch, it would fail with an
# undefined symbol instead of saying what is wrong.
_TOO_OLD = torch_too_old(torch.__version__)
if _TOO_OLD:
    raise ImportError(_TOO_OLD)


def _why_not_loaded(exc):
    """What happened and what to do, for the one warning: where this fastclip was
    imported from, and whether it is a source checkout that was never built."""
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    built = glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "_C*.pyd"))
    if built:  # there, but it does not load: built against another torch, usually
        return (
            f"fastclip imported from {here} has a compiled extension ({os.path.basename(built[0])}) that does "
            f"not load with torch {torch.__version__} ({type(exc).__name__}: {exc}); rebuild it against this "
            "torch: `make setup` in the checkout, or `pip install --no-build-isolation .`"
        )
    if os.path.isfile(os.path.join(root, "setup.py")) and os.path.isdir(os.path.join(root, "csrc")):
        return (
            f"fastclip was imported from {here}, the source folder of a checkout, which holds no compiled "
            f"extension (no fastclip/_C*.so): Python finds that folder first when you run from {root}. "
            "Run from another folder to use an installed fastclip, or build the checkout in place with "
            "`make setup` (or `pip install --no-build-isolation -e .`)"
        )
    return (
        f"fastclip imported from {here} has no compiled extension (no _C*.so); reinstall it with "
        "`pip install --no-build-isolation .`"
    )


LOAD_ERROR = None
try:
    from . import _C  # noqa: F401  (registers torch.ops.fastclip.*)
except ImportError as exc:  # not built, or built against another torch
    _C = None
    LOAD_ERROR = _why_not_loaded(exc)
    warnings.warn(
        f"{LOAD_ERROR}. Until then the pure-torch reference path runs: correct, but not fused.",
        RuntimeWarning,
        stacklevel=2,
    )

LOADED = _C is not None
CUDA_BUILT = LOADED and _C.cuda_built()

# The eager hot path's entry (csrc/eager_params.h), None without the extension.
clip_params = _C.clip_params if LOADED else None
# Those of fastclip/per_layer.py's and agc.py's functions (csrc/eager_params.h).
tensor_norms = _C.tensor_norms if LOADED else None
per_layer_params = _C.per_layer_params if LOADED else None
agc_params = _C.agc_params if LOADED else None
# fastclip.optim's step (csrc/eager_adam.h).
adam_groups = _C.adam_groups if LOADED else None

if LOADED:
    # OpOverload handles: calling these skips the torch.ops attribute lookups.
    total_norm = torch.ops.fastclip.total_norm.default
    scale_ = torch.ops.fastclip.scale_.default
    clip_grad_norm_ = torch.ops.fastclip.clip_grad_norm_.default
    per_tensor_norms = torch.ops.fastclip.per_tensor_norms.default
    clip_grad_norm_per_layer_ = torch.ops.fastclip.clip_grad_norm_per_layer_.default
    adaptive_clip_grad_ = torch.ops.fastclip.adaptive_clip_grad_.default
    adam_step_ = torch.ops.fastclip.adam_step_.default

    def _norm_like(grads):
        dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
        device = grads[0].device if grads else torch.device("cpu")
        return torch.empty((), dtype=dtype, device=device)

    # Fake kernels: shapes and dtypes only, so torch.compile can trace the ops.
    @torch.library.register_fake("fastclip::total_norm")
    def _(grads, norm_type, norm_dtype=None):
        norm = _norm_like(grads)
        return norm if norm_dtype is None else norm.to(norm_dtype)

    @torch.library.register_fake("fastclip::scale_")
    def _(grads, coef):
        return None

    @torch.library.register_fake("fastclip::clip_grad_norm_")
    def _(grads, max_norm, norm_type, norm_dtype=None):
        norm = _norm_like(grads)
        return norm if norm_dtype is None else norm.to(norm_dtype)

    def _norms_like(tensors):
        """One norm per tensor: the 1-D result of the per-tensor ops."""
        return _norm_like(tensors).new_empty((len(tensors),))

    @torch.library.register_fake("fastclip::per_tensor_norms")
    def _(tensors, norm_type):
        return _norms_like(tensors)

    @torch.library.register_fake("fastclip::clip_grad_norm_per_layer_")
    def _(grads, groups, max_norm, norm_type):
        return _norms_like(grads)

    @torch.library.register_fake("fastclip::adaptive_clip_grad_")
    def _(params, grads, clip_factor, eps, norm_type):
        return None

    @torch.library.register_fake("fastclip::adam_step_")
    def _(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        steps,
        groups,
        lrs,
        beta1s,
        beta2s,
        epss,
        weight_decays,
        lr_tensors,
        amsgrad,
        maximize,
        decoupled_weight_decay,
        max_norm,
        norm_type,
        grad_scale=None,
        found_inf=None,
        norm_dtype=None,
    ):
        norm = _norm_like(grads)
        return norm if norm_dtype is None else norm.to(norm_dtype)


def has_kernels(device_type):
    """Whether the fused ops are compiled for this device type ("cpu", "cuda"): a fact
    of the build. Whether they run on given tensors is _grads.runs_fused()."""
    return LOADED and (device_type == "cpu" or (device_type == "cuda" and CUDA_BUILT))
